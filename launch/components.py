"""TorchX components for din_torchrec: train, evaluate, plan, bench.

Each one is ``torchx.components.dist.ddp`` (torchrun under the scheduler) running
``python -m din_torchrec.cli <command> --config CONFIG [--set KEY=VALUE ...]``; the config path, the
overrides (positional, after ``--``) and the saved plan pass straight through.

    torchx run -s local_cwd launch/components.py:train --config configs/demo.yaml -j 1x2 \\
        --plan plan.json -- training.output_dir=runs/din2 training.epochs=1

The same job without TorchX (TorchX 0.7 is in maintenance; plain torchrun always works):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m din_torchrec.cli train \\
        --config configs/demo.yaml --set training.plan_path=plan.json \\
        --set training.output_dir=runs/din2 --set training.epochs=1

See docs/launching.md for Slurm and Kubernetes.
"""

# TorchX reads these signatures at run time (typing.Dict/List/Optional, no postponed annotations).
# ruff: noqa: UP006, UP007, UP035, UP045
from typing import Dict, List, Optional

import torchx
import torchx.specs as specs
from torchx.components.dist import ddp

MODULE = "din_torchrec.cli"
DEFAULT_CONFIG = "configs/demo.yaml"


def _cli_args(command: str, config: str, overrides: tuple, plan: Optional[str]) -> List[str]:
    args = [command, "--config", config]
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected KEY=VALUE, e.g. training.epochs=1")
        args += ["--set", item]
    if plan:
        args += ["--set", f"training.plan_path={plan}"]
    return args


def _job(
    cli_args: List[str],
    name: str,
    j: str,
    image: str,
    h: Optional[str],
    cpu: int,
    gpu: int,
    memMB: int,
    env: Optional[Dict[str, str]],
    max_retries: int,
    rdzv_port: int,
    mounts: Optional[List[str]],
    threads_per_rank: int,
) -> specs.AppDef:
    env = dict(env or {})
    if threads_per_rank > 0:
        env.setdefault("OMP_NUM_THREADS", str(threads_per_rank))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return ddp(
        *cli_args,
        m=MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )


def train(
    *overrides: str,
    config: str = DEFAULT_CONFIG,
    plan: Optional[str] = None,
    name: str = "/din-train",
    j: str = "1x2",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    threads_per_rank: int = 1,
) -> specs.AppDef:
    """Train and evaluate a model: ``din-torchrec train`` on every rank (gloo on CPU, nccl on GPUs).

    Args:
        overrides: config overrides KEY=VALUE (after ``--``), each passed as ``--set KEY=VALUE``
        config: experiment YAML, a path inside the job's working directory or image
        plan: a plan saved by ``din-torchrec plan`` (sets ``training.plan_path``); its world size must be
            nnodes x nproc_per_node
        name: job name, ``{experiment}/{run}``
        j: {nnodes}x{nproc_per_node}, e.g. 1x2, 2x8 (on GPU hosts nproc_per_node <= GPUs per host)
        image: container image (ignored by local_cwd)
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        cpu: CPUs per replica (host)
        gpu: GPUs per replica (host)
        memMB: memory per replica in MB
        env: extra environment variables, e.g. NCCL_DEBUG=INFO
        max_retries: scheduler retries
        rdzv_port: rendezvous port on the first host (multi-host jobs only)
        mounts: mounts for container schedulers, type=bind,src=/data,dst=/data
        threads_per_rank: OMP_NUM_THREADS for each rank (0 keeps the environment's; the trainer then
            splits the cores between local ranks)
    """
    return _job(
        _cli_args("train", config, overrides, plan),
        name, j, image, h, cpu, gpu, memMB, env, max_retries, rdzv_port, mounts, threads_per_rank,
    )  # fmt: skip


def evaluate(
    *overrides: str,
    config: str = DEFAULT_CONFIG,
    plan: Optional[str] = None,
    checkpoint: Optional[str] = None,
    output: Optional[str] = None,
    name: str = "/din-evaluate",
    j: str = "1x2",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    threads_per_rank: int = 1,
) -> specs.AppDef:
    """Evaluate a checkpoint on the eval split (any number of ranks loads a checkpoint of any other).

    Args:
        overrides: config overrides KEY=VALUE (after ``--``)
        config: experiment YAML
        plan: a saved plan for this job's world size (sets ``training.plan_path``)
        checkpoint: checkpoint folder (default: <training.output_dir>/checkpoint)
        output: also write the metrics to this JSON file
        name: job name
        j: {nnodes}x{nproc_per_node}
        image: container image (ignored by local_cwd)
        h: a registered named resource
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        env: extra environment variables
        max_retries: scheduler retries
        rdzv_port: rendezvous port on the first host (multi-host jobs only)
        mounts: mounts for container schedulers
        threads_per_rank: OMP_NUM_THREADS for each rank (0 keeps the environment's)
    """
    args = _cli_args("evaluate", config, overrides, plan)
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    if output:
        args += ["--output", output]
    return _job(
        args, name, j, image, h, cpu, gpu, memMB, env, max_retries, rdzv_port, mounts, threads_per_rank
    )


def plan(
    *overrides: str,
    config: str = DEFAULT_CONFIG,
    topology: str = "configs/topologies/gpu_64x8_h100.yaml",
    out: str = "plan.json",
    report_json: Optional[str] = None,
    name: str = "/din-plan",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Plan the tables for a topology (one process, meta device: no GPU and little memory needed).

    Args:
        overrides: config overrides KEY=VALUE (after ``--``)
        config: experiment YAML
        topology: topology YAML (configs/topologies/)
        out: where to write the plan
        report_json: also write the report as JSON here
        name: job name
        image: container image (ignored by local_cwd)
        h: a registered named resource
        cpu: CPUs
        memMB: memory in MB
        env: extra environment variables
        mounts: mounts for container schedulers
    """
    args = _cli_args("plan", config, overrides, None) + ["--topology", topology, "--out", out]
    if report_json:
        args += ["--report-json", report_json]
    return _job(args, name, "1x1", image, h, cpu, 0, memMB, env, 0, 29500, mounts, 0)


def bench(
    *bench_args: str,
    config: str = DEFAULT_CONFIG,
    name: str = "/din-bench",
    j: str = "1x1",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    threads_per_rank: int = 0,
) -> specs.AppDef:
    """Run ``din-torchrec bench`` (the benchmark command) on every rank.

    Args:
        bench_args: arguments after ``--`` passed unchanged to ``din-torchrec bench`` (KEY=VALUE items
            become ``--set KEY=VALUE``; anything else, e.g. ``--what embedding``, is passed as is)
        config: experiment YAML
        name: job name
        j: {nnodes}x{nproc_per_node}
        image: container image (ignored by local_cwd)
        h: a registered named resource
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        env: extra environment variables
        rdzv_port: rendezvous port on the first host (multi-host jobs only)
        mounts: mounts for container schedulers
        threads_per_rank: OMP_NUM_THREADS for each rank (0 keeps the environment's)
    """
    args = ["bench", "--config", config]
    for item in bench_args:
        if "=" in item and not item.startswith("-"):
            args += ["--set", item]
        else:
            args.append(item)
    return _job(args, name, j, image, h, cpu, gpu, memMB, env, 0, rdzv_port, mounts, threads_per_rank)
