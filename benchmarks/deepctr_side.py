"""The DeepCTR-Torch side of ``din-torchrec bench compare``: trains DeepCTR-Torch's DIN or DIEN on arrays
exported from the same generated dataset and prints one JSON line (AUC, samples/s, peak memory).

Runs inside its own virtualenv (``benchmarks/.venv-deepctr``: torch==2.13.0 CPU, deepctr-torch --no-deps, requests,
scikit-learn, tqdm), never imports din_torchrec. Usage (``din-torchrec bench compare`` does this):

    benchmarks/.venv-deepctr/bin/python benchmarks/deepctr_side.py --data DIR --model din \\
        --dim 16 --history 50 --att-hidden 80,40 --mlp-hidden 200,80 --batch 1024 --epochs 2 --out peer.json

``DIR`` holds ``train.npz`` and ``test.npz`` (see ``din_torchrec.bench.compare.export_arrays``). Timing:
each epoch is one ``model.fit(..., epochs=1)`` call (DeepCTR's own loop: DataLoader over in-memory tensors,
forward, loss, backward, Adam step); evaluation (``model.predict`` + sklearn AUC) is outside the clock.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def build(
    model: str,
    sizes: dict,
    dim: int,
    history: int,
    att_hidden,
    mlp_hidden,
    att_activation: str,
    mlp_activation: str,
):
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

    feats = [
        SparseFeat("user_id", int(sizes["user"]), embedding_dim=dim),
        SparseFeat("user_age", int(sizes["age"]), embedding_dim=dim),
        SparseFeat("user_gender", int(sizes["gender"]), embedding_dim=dim),
        SparseFeat("item_id", int(sizes["item"]), embedding_dim=dim),
        SparseFeat("cate_id", int(sizes["category"]), embedding_dim=dim),
    ]
    hist = [
        VarLenSparseFeat(
            SparseFeat("hist_item_id", int(sizes["item"]), embedding_dim=dim, embedding_name="item_id"),
            maxlen=history,
            length_name="seq_length",
        ),
        VarLenSparseFeat(
            SparseFeat("hist_cate_id", int(sizes["category"]), embedding_dim=dim, embedding_name="cate_id"),
            maxlen=history,
            length_name="seq_length",
        ),
    ]
    if model == "din":
        from deepctr_torch.models import DIN

        return DIN(
            feats + hist,
            ["item_id", "cate_id"],
            dnn_hidden_units=mlp_hidden,
            dnn_activation=mlp_activation,
            att_hidden_size=att_hidden,
            att_activation=att_activation,
            device="cpu",
        )
    from deepctr_torch.models import DIEN

    neg = [
        VarLenSparseFeat(
            SparseFeat("neg_hist_item_id", int(sizes["item"]), embedding_dim=dim, embedding_name="item_id"),
            maxlen=history,
            length_name="seq_length",
        ),
        VarLenSparseFeat(
            SparseFeat(
                "neg_hist_cate_id", int(sizes["category"]), embedding_dim=dim, embedding_name="cate_id"
            ),
            maxlen=history,
            length_name="seq_length",
        ),
    ]
    return DIEN(
        feats + hist + neg,
        ["item_id", "cate_id"],
        gru_type="AUGRU",
        use_negsampling=True,
        alpha=1.0,
        dnn_hidden_units=mlp_hidden,
        dnn_activation=mlp_activation,
        att_hidden_units=att_hidden,
        att_activation=att_activation,
        att_weight_normalization=True,
        device="cpu",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", choices=["din", "dien"], default="din")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--att-hidden", default="80,40")
    p.add_argument("--mlp-hidden", default="200,80")
    p.add_argument("--att-activation", default="dice")
    p.add_argument("--mlp-activation", default="relu")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    from sklearn.metrics import log_loss, roc_auc_score

    train = dict(np.load(f"{a.data}/train.npz"))
    test = dict(np.load(f"{a.data}/test.npz"))
    sizes = json.loads(open(f"{a.data}/sizes.json").read())
    y, yt = train.pop("label").astype(np.float32), test.pop("label").astype(np.float32)
    if a.model == "din":
        for d in (train, test):
            d.pop("neg_hist_item_id", None)
            d.pop("neg_hist_cate_id", None)
    model = build(
        a.model,
        sizes,
        a.dim,
        a.history,
        _ints(a.att_hidden),
        _ints(a.mlp_hidden),
        a.att_activation,
        a.mlp_activation,
    )
    model.compile("adam", "binary_crossentropy")
    epochs = []
    fit_seconds = 0.0
    n = len(y)
    for e in range(a.epochs):
        t0 = time.perf_counter()
        model.fit(train, y, batch_size=a.batch, epochs=1, verbose=0, shuffle=True)
        dt = time.perf_counter() - t0
        fit_seconds += dt
        pred = model.predict(test, batch_size=4096).reshape(-1)
        epochs.append(
            {
                "epoch": e,
                "auc": float(roc_auc_score(yt, pred)),
                "logloss": float(log_loss(yt, np.clip(pred, 1e-7, 1 - 1e-7))),
                "train_seconds": dt,
                "train_samples_per_s": n / dt,
            }
        )
        print(
            f"[deepctr {a.model}] epoch {e + 1}: AUC {epochs[-1]['auc']:.4f} ({n / dt:,.0f} samples/s)",
            file=sys.stderr,
        )
    result = {
        "implementation": "deepctr_torch",
        "model": a.model,
        "auc": epochs[-1]["auc"],
        "logloss": epochs[-1]["logloss"],
        "train_samples_per_s": n * a.epochs / fit_seconds,
        "train_seconds": fit_seconds,
        "epochs": epochs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    try:
        import deepctr_torch

        result["deepctr_torch"] = deepctr_torch.__version__
    except Exception:  # noqa: BLE001
        pass
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
