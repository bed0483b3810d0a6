"""GPU check: forward + backward samples/s of every interaction module, reference vs fast path, in bf16
autocast and fp32, on one GPU with stock PyTorch (no CUDA FBGEMM, no TorchRec needed).

    python -m din_torchrec.bench.gpu_check [--out DIR] [--small] [--device cuda|cpu] [--cases A,B]

Writes ``gpu_check.json`` and ``gpu_check.png`` into ``--out`` (default ``runs/bench``) and prints a table.
The JSON is rewritten (atomically) after every case with ``"complete": false`` until the last: a run cut off
by a time limit, as a lent GPU's is, still leaves the cases it finished.
On a machine without a GPU it runs on the CPU (``--small``: tiny sizes, seconds), which is what the test
suite does.

It imports only pure-PyTorch modules of this package (``din_torchrec.modules.*`` and
``din_torchrec.bench.kernels``), never TorchRec or FBGEMM (the modules use plain-torch offsets and segment
softmax for this reason). ``install_fbgemm_fallback`` still registers a pure-PyTorch
``fbgemm::asynchronous_complete_cumsum`` when ``fbgemm_gpu`` is missing, for code that calls it.
``--cases`` runs a subset (``python -m din_torchrec.bench.gpu_check --cases din_attention,dien_extractor``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from din_torchrec.utils.io import atomic_write_json

_FALLBACK_LIB: Any = None


def _complete_cumsum(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.new_zeros(1), torch.cumsum(t, 0)])


def install_fbgemm_fallback(device: torch.device | None = None) -> bool:
    """Make ``import fbgemm_gpu`` and ``torch.ops.fbgemm.asynchronous_complete_cumsum`` work without a
    (CUDA) FBGEMM.

    * ``fbgemm_gpu`` not importable: an empty ``fbgemm_gpu`` module goes into ``sys.modules`` and the op is
      defined in pure PyTorch for every device;
    * importable but without a kernel for ``device`` (the CPU build on a GPU machine): a pure-PyTorch kernel
      is registered for that device's dispatch key.

    Returns True when a fallback was installed.
    """
    global _FALLBACK_LIB
    try:
        import fbgemm_gpu  # noqa: F401

        real = not getattr(sys.modules["fbgemm_gpu"], "_din_torchrec_stub", False)
    except Exception:  # noqa: BLE001  (not installed, or a broken install)
        stub = types.ModuleType("fbgemm_gpu")
        stub._din_torchrec_stub = True  # type: ignore[attr-defined]
        sys.modules["fbgemm_gpu"] = stub
        real = False
    if not real:
        if _FALLBACK_LIB is None:
            lib = torch.library.Library("fbgemm", "DEF")
            lib.define("asynchronous_complete_cumsum(Tensor t_in) -> Tensor")
            lib.impl("asynchronous_complete_cumsum", _complete_cumsum, "CompositeExplicitAutograd")
            _FALLBACK_LIB = lib
        return True
    if device is not None and device.type != "cpu":
        try:
            torch.ops.fbgemm.asynchronous_complete_cumsum(torch.ones(2, dtype=torch.int64, device=device))
        except (RuntimeError, NotImplementedError):
            lib = torch.library.Library("fbgemm", "IMPL")
            lib.impl("asynchronous_complete_cumsum", _complete_cumsum, device.type.upper())
            _FALLBACK_LIB = lib
            return True
    return False


CASES = [
    "din_attention",
    "din_attention_softmax",
    "din_scores",
    "dien_extractor",
    "dien_extractor_vs_packed_gru",
    "dien_evolution_vs_padded",
    "dien_evolution_vs_autograd_loop",
    "dien_augru",
    "dien_evolution",
    "dien_aux_loss",
    "dien_aux_fused",
    "dsin_extractor",
    "dsin_sessions",
]


def run(
    out_dir: str | Path,
    small: bool,
    device: str | None = None,
    activation: str = "dice",
    log=print,
    cases: list[str] | None = None,
) -> dict[str, Any]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stubbed = install_fbgemm_fallback(dev)
    from din_torchrec.bench import kernels

    preset = dict(kernels.PRESETS["small" if small else "full"])
    if not small and dev.type == "cuda":
        preset.update(batch=4096, loop_batch=16)
    s = kernels.KernelSettings(**preset)
    s.cases = list(cases or CASES)
    s.activation = activation
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "fbgemm": "pure-PyTorch fallback for asynchronous_complete_cumsum" if stubbed else "fbgemm_gpu",
        "torchrec_imported": "torchrec" in sys.modules,
        "preset": "small" if small else "full",
        "settings": {k: v for k, v in s.__dict__.items()},
        "timing": "forward + backward per call, best of interleaved rounds; samples/s = batch / seconds",
        "results": results,
        "complete": False,
    }

    def save() -> None:
        report["wall_seconds"] = time.perf_counter() - t0
        report["torchrec_imported"] = "torchrec" in sys.modules
        atomic_write_json(out / "gpu_check.json", report)

    for dtype in ("fp32", "bf16"):

        def context(dtype: str = dtype) -> Any:
            if dtype == "bf16":
                return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        with torch.device(dev):
            cases = kernels.build_cases(s)
        for case in cases:
            try:
                diffs = kernels.check(case, context)
                timing = kernels.time_case(case, s.rounds, s.target_s, context, sync)
            except Exception as e:  # noqa: BLE001  (recorded: e.g. a module that fails under autocast)
                results.append(
                    {
                        "name": case.name,
                        "dtype": dtype,
                        "batch": case.batch,
                        "error": f"{type(e).__name__}: {e}",
                    }
                )
                log(f"{dtype:<5} {case.name:<26} FAILED: {results[-1]['error']}")
                save()
                continue
            results.append(
                {
                    "name": case.name,
                    "reference": case.reference_name,
                    "dtype": dtype,
                    "batch": case.batch,
                    "rows": case.rows,
                    **diffs,
                    **timing,
                }
            )
            r = results[-1]
            log(
                f"{dtype:<5} {case.name:<26} B={case.batch:<5} fast {r['samples_per_s_fast']:>12,.0f} samples/s  "
                f"ref {r['samples_per_s_reference']:>12,.0f} samples/s  x{r['speedup']:.1f}  "
                f"max diff {r['max_abs_diff']:.1e}"
            )
            save()
    report["complete"] = True
    save()
    from din_torchrec.bench.plots import plot_speedups

    plot_speedups(
        report,
        out / "gpu_check.png",
        f"interaction modules on {report['device_name']}: fast path vs reference",
    )
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m din_torchrec.bench.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--small", action="store_true", help="tiny sizes (seconds), e.g. on a CPU")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--activation", default="dice", choices=["dice", "prelu", "relu"], help="of the attention MLPs"
    )
    p.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    a = p.parse_args(argv)
    cases = [c for c in a.cases.split(",") if c] if a.cases else None
    report = run(a.out, a.small, a.device, a.activation, cases=cases)
    print(f"written: {Path(a.out) / 'gpu_check.json'}, {Path(a.out) / 'gpu_check.png'}")
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
