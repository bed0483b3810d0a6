"""One trainer for one process and for many: DistributedModelParallel over gloo (CPU) or nccl (GPU)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import ShardingPlan
from tqdm import tqdm

from din_torchrec.config import ExperimentConfig, dump_config, to_dict
from din_torchrec.data.batch import Batch
from din_torchrec.data.negatives import NegativeSampler, load_item_features
from din_torchrec.data.reader import BehaviorReader, load_frequencies
from din_torchrec.data.referenced import open_reader
from din_torchrec.distributed.env import DistEnv, init_distributed
from din_torchrec.distributed.sharding import (
    clipped_parameters,
    combined_optimizer,
    dense_optimizer,
    describe_plan,
    shard_model,
)
from din_torchrec.models import build_model
from din_torchrec.models.output import ModelOutput
from din_torchrec.modules.prefetch import Prefetcher
from din_torchrec.ops import native, tbe
from din_torchrec.training.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from din_torchrec.training.losses import click_loss
from din_torchrec.training.metrics import ctr_metrics
from din_torchrec.training.plots import plot_training_curve
from din_torchrec.training.regularization import mba_penalty
from din_torchrec.utils.allocator import tune_malloc, tune_numpy_hugepages
from din_torchrec.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# Fault injection for resilience drills and tests: SIGKILL this process right after this global step.
_KILL_AT_STEP = int(os.environ.get("DIN_TORCHREC_KILL_AT_STEP", "-1"))

# A progress bar redraws every 0.1 s on a terminal; written to a log file that is one line per redraw.
_BAR_INTERVAL = 0.1 if sys.stderr.isatty() else 10.0


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights, which DMP then shards."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch CPU generator states as JSON (for checkpoints).

    Every rank is seeded alike and draws alike, so rank 0's state stands for all; the data order and the
    negatives are seeded from (seed, epoch, rank) and need no state at all.
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class StepLoss:
    """The parts of one step's loss (python floats, for logging)."""

    total: float
    click: float
    reg: float
    aux: float


@dataclass
class TrainState:
    """What the trainer keeps across epochs."""

    step: int = 0
    history: dict[str, Any] = field(default_factory=lambda: {"steps": [], "loss": [], "epochs": []})


def compute_loss(
    out: ModelOutput, batch: Batch, cfg: ExperimentConfig, world_size: int, accumulation: int = 1
) -> tuple[torch.Tensor, StepLoss]:
    """Click loss + auxiliary loss + mini-batch-aware regularization, scaled for backward.

    The click and auxiliary terms are per-sample means; the regularizer is a sum over the batch. With
    gradients averaged over ``world_size`` ranks and accumulated over ``accumulation`` micro-batches, the
    means are divided by ``accumulation`` and the sum is multiplied by ``world_size``, so the update equals
    that of one global batch of ``world_size * accumulation`` micro-batches.
    """
    t = cfg.training
    click = click_loss(
        out.logits, batch.labels, batch.valid, t.loss, t.focal_alpha, t.focal_gamma, t.label_smoothing
    )
    means = click
    reg_value = 0.0
    aux_value = 0.0
    if out.aux_loss is not None:
        means = means + out.aux_loss
        aux_value = float(out.aux_loss.detach())
    total = means / accumulation if accumulation > 1 else means
    reg_cfg = t.regularization
    if reg_cfg.coefficient > 0 and batch.reg_weights:
        reg = reg_cfg.coefficient * mba_penalty(out.embeddings, batch.reg_weights)
        total = total + world_size * reg
        reg_value = float(reg.detach())
    logged = float(means.detach()) + reg_value
    return total, StepLoss(logged, float(click.detach()), reg_value, aux_value)


def needs_negatives(cfg: ExperimentConfig) -> bool:
    """Whether the model's batches carry negative behaviours (DIEN with its auxiliary loss)."""
    return cfg.model.name == "dien" and cfg.model.dien.aux_loss_weight > 0


def saved_plan(cfg: ExperimentConfig, env: DistEnv) -> ShardingPlan | None:
    """The sharding plan saved by ``din-torchrec plan`` (``training.plan_path``), or None to plan now."""
    if not cfg.training.plan_path:
        return None
    from din_torchrec.distributed.planning import load_plan

    return load_plan(
        cfg.training.plan_path,
        world_size=env.world_size,
        features=cfg.features,
        compute_device=env.device.type,
    )


def make_negative_sampler(
    cfg: ExperimentConfig, frequencies: dict[str, np.ndarray] | None, seed_offset: int = 0
) -> NegativeSampler | None:
    """DIEN's negative sampler, or None when the model needs no negatives."""
    if not needs_negatives(cfg):
        return None
    dien = cfg.model.dien
    item_features = load_item_features(cfg.data.resolve(dien.item_features_path), cfg.features)
    item_freq = None
    if dien.negative_sampling == "popularity":
        freq = frequencies or load_frequencies(cfg.data.resolve(cfg.data.frequency_path), cfg.features)
        item_freq = freq[cfg.features.sequence[0].name]
    return NegativeSampler(
        cfg.features,
        item_features,
        dien.negative_sampling,
        item_frequencies=item_freq,
        seed=cfg.training.seed + seed_offset,
    )


def make_reader(
    cfg: ExperimentConfig, env: DistEnv, split: str, frequencies: dict[str, np.ndarray] | None
) -> BehaviorReader:
    """The reader of ``split`` (``train`` or ``eval``) for this rank."""
    d = cfg.data
    negatives = make_negative_sampler(cfg, frequencies, seed_offset=0 if split == "train" else 1)
    if split == "train":
        return open_reader(
            d.resolve(d.train_path),
            cfg.features,
            max_history=d.max_history,
            batch_size=d.batch_size,
            rank=env.rank,
            world_size=env.world_size,
            shuffle_buffer=d.shuffle_buffer,
            seed=cfg.training.seed,
            drop_last=True,
            frequencies=frequencies,
            reg_mode=cfg.training.regularization.mode,
            read_chunk_rows=d.read_chunk_rows,
            negatives=negatives,
            cache_in_memory=d.cache_in_memory,
        )
    return open_reader(
        d.resolve(d.eval_path),
        cfg.features,
        max_history=d.max_history,
        batch_size=d.eval_batch_size,
        rank=env.rank,
        world_size=env.world_size,
        shuffle_buffer=0,
        seed=cfg.training.seed,
        drop_last=False,
        pad_last=True,
        read_chunk_rows=d.read_chunk_rows,
        negatives=negatives,
        cache_in_memory=d.cache_in_memory,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, reader: BehaviorReader, env: DistEnv, progress: bool = False
) -> dict[str, float]:
    """Metrics over the whole evaluation split, gathered from every rank.

    Every rank runs the same number of padded batches (sharded lookups are collective); padding rows carry
    ``valid == 0`` and are dropped before the metrics.
    """
    was_training = model.training
    model.eval()
    logits, labels, users, valid = [], [], [], []
    for batch in tqdm(reader, desc="eval", disable=not (progress and env.is_main), leave=False):
        batch = batch.to(env.device)
        out = model(batch)
        logits.append(out.logits.float().cpu())
        labels.append(batch.labels.cpu())
        users.append(batch.user_ids.cpu())
        valid.append(batch.valid_mask().cpu())
    model.train(was_training)
    local = (
        torch.stack([torch.cat(logits), torch.cat(labels), torch.cat(users).double(), torch.cat(valid)])
        if logits
        else torch.zeros(4, 0)
    )
    local = local.double()
    if env.world_size > 1:
        gathered = [torch.empty_like(local) for _ in range(env.world_size)]
        dist.all_gather(gathered, local)
        local = torch.cat(gathered, dim=1)
    keep = local[3] > 0
    return ctr_metrics(local[0][keep], local[1][keep], local[2][keep].long())


def _autocast(cfg: ExperimentConfig, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast of the dense part when ``training.precision`` is bf16 (CPU or GPU)."""
    if cfg.training.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prefetch_depth(setting: int, device: torch.device) -> int:
    """``data.prefetch_batches`` resolved: ``-1`` (auto) reads 2 batches ahead on a thread when a core is free
    for it, else inline.

    The reader is Python (numpy on small arrays, KJT building) and holds the GIL for most of its time, so the
    thread pays only beside a GPU or with a spare core: DIN bf16 in ``Trainer.fit`` on the 2-vCPU development
    machine with one torch thread read inline at 29,270-31,359 samples/s and with the thread at 27,943-27,950
    (its steps 10 % slower; docs/benchmarks.md, section 4).
    """
    if setting >= 0:
        return setting
    if device.type == "cuda":
        return 2
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return 2 if cpus - torch.get_num_threads() >= 2 else 0


def train_micro_step(
    model: nn.Module,
    dense_opt: torch.optim.Optimizer,
    dense_params: list[torch.Tensor],
    batch: Batch,
    cfg: ExperimentConfig,
    env: DistEnv,
    micro_step: int = 0,
) -> StepLoss:
    """Forward and backward of one micro-batch; the dense optimizer steps every
    ``training.grad_accumulation_steps`` micro-batches (dense gradients accumulate in between). Embedding
    rows are updated by their fused optimizer inside every backward: they never hold a gradient to
    accumulate."""
    t = cfg.training
    k = t.grad_accumulation_steps
    batch = batch.to(env.device)
    if micro_step % k == 0:
        dense_opt.zero_grad()
    with _autocast(cfg, env.device):
        out = model(batch)
    loss, parts = compute_loss(out, batch, cfg, env.world_size, k)
    loss.backward()  # sparse tables are updated here, by the fused optimizer
    if micro_step % k == k - 1:
        if t.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(dense_params, t.grad_clip_norm)
        dense_opt.step()
    return parts


class Trainer:
    """Builds the sharded model, runs epochs, evaluates, and writes metrics, curve and checkpoint.

    Outputs in ``training.output_dir``: ``config.yaml``, ``plan.json``, ``metrics.json``,
    ``training_curve.png``, ``checkpoint/`` (DCP). Only rank 0 writes files other than checkpoint shards.
    """

    def __init__(self, cfg: ExperimentConfig, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        if cfg.training.malloc_tuning:
            tune_malloc()  # before the first large allocation
            tune_numpy_hugepages()
        self.env = env or init_distributed(cfg.training.backend, cfg.training.num_threads)
        seed_everything(cfg.training.seed)
        self.out_dir = Path(cfg.training.output_dir)
        reg = cfg.training.regularization
        freq_path = cfg.data.resolve(cfg.data.frequency_path)
        self.frequencies = load_frequencies(freq_path, cfg.features) if reg.coefficient > 0 else None
        self.train_reader = make_reader(cfg, self.env, "train", self.frequencies)
        self.eval_reader = make_reader(cfg, self.env, "eval", None)
        if cfg.data.cache_in_memory:
            # Read and checked now, before any step: the epochs then batch from memory.
            t0 = time.perf_counter()
            held = self.train_reader.load() + self.eval_reader.load()
            self._log(
                f"data.cache_in_memory: {self.train_reader.num_rows + self.eval_reader.num_rows:,} rows in "
                f"memory ({held / 2**20:,.0f} MiB, {time.perf_counter() - t0:.1f} s)"
            )
        model = build_model(cfg, device=self.env.device if self.env.device.type != "cpu" else None)
        native.set_enabled(cfg.training.native_kernels)
        if cfg.training.native_kernels and self.env.device.type == "cpu":
            # Built (or loaded from the cache) now, so that no step pays for it.
            t0 = time.perf_counter()
            built = native.kernels() is not None
            if built:
                tbe.install()  # the tables' forward lookups and the sequence tables' backward, in place of FBGEMM's
            self._log(
                "native CPU kernels (Dice, attention, recurrences, DIEN auxiliary loss, embedding lookups and "
                "sequence-table backward): "
                f"{'ready' if built else 'unavailable, PyTorch paths'} ({time.perf_counter() - t0:.1f} s)"
            )
        self.model = shard_model(
            model, self.env, cfg.features, cfg.training, cfg.data.batch_size, plan=saved_plan(cfg, self.env)
        )
        self.dense_opt = dense_optimizer(self.model, cfg.training)
        self.dense_params = clipped_parameters(self.model)
        self.optimizer = combined_optimizer(self.model, self.dense_opt)
        self.state = TrainState()
        if cfg.training.compile:
            from din_torchrec.training.compile import compile_hot_paths

            compiled = compile_hot_paths(self.model)
            self._log(f"torch.compile (dynamic shapes): {', '.join(compiled) or 'nothing found to compile'}")
            if self.env.device.type == "cpu" and native.kernels() is not None:
                self._log(
                    "note: compiled regions run Inductor's code instead of the native CPU kernels; measured "
                    "slower than the kernels on the CPU (docs/benchmarks.md, section 2)"
                )

    def _log(self, msg: str) -> None:
        if self.env.is_main:
            tqdm.write(msg)

    def train_step(self, batch: Batch, micro_step: int = 0) -> StepLoss:
        return train_micro_step(
            self.model, self.dense_opt, self.dense_params, batch, self.cfg, self.env, micro_step
        )

    def _checkpoint_meta(self, epoch: int, batches_done: int, epochs: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything besides tensors that a resume needs: where in the data we are and the curves so far.

        Randomness needs no saved state: shuffling and negative sampling are seeded from (seed, epoch,
        rank), and the model has no dropout.
        """
        return {
            "model": self.cfg.model.name,
            "epoch": epoch,
            "batches_done_in_epoch": batches_done,
            "step": self.state.step,
            "world_size": self.env.world_size,
            "batch_size": self.cfg.data.batch_size,
            "history": self.state.history,
            "epochs_done": epochs,
            "rng": rng_state(),
        }

    def save(self, epoch: int, batches_done: int, epochs: list[dict[str, Any]]) -> Path:
        """Sharded checkpoint of model + fused and dense optimizer state + data position. Collective."""
        return save_checkpoint(
            self.out_dir / "checkpoint",
            self.model,
            self._checkpoint_meta(epoch, batches_done, epochs),
            optimizer=self.optimizer,
        )

    def _resume(self) -> tuple[int, int, list[dict[str, Any]]]:
        """Load ``<output_dir>/checkpoint`` if ``training.resume`` and it exists: ``(epoch, batches done in
        that epoch, finished epochs)``. A checkpoint from another world size resumes at the same fraction of
        the epoch (each rank then owns a different slice of the rows)."""
        path = self.out_dir / "checkpoint"
        if not (self.cfg.training.resume and path.exists()):
            return 0, 0, []
        self.dense_opt.init_state()  # Adam's moments are lazy; DCP loads in place
        saved_world = int(read_checkpoint_meta(path, verify=False).get("world_size", self.env.world_size))
        meta = load_checkpoint(
            path, self.model, self.optimizer, partial_optimizer=saved_world != self.env.world_size
        )
        if meta["reinitialised_optimizer_state"]:
            self._log(
                f"world size {saved_world} -> {self.env.world_size}: the plan moved tables between fused and "
                f"data-parallel sharding; {len(meta['reinitialised_optimizer_state'])} optimizer states start fresh"
            )
        self.state.step = int(meta["step"])
        if "rng" in meta:
            set_rng_state(meta["rng"])
        self.state.history = meta.get("history") or self.state.history
        done = int(meta["batches_done_in_epoch"])
        if saved_world != self.env.world_size:
            done = done * saved_world // self.env.world_size
        self._log(
            f"resumed from {path}: epoch {int(meta['epoch']) + 1}, batch {done}, step {self.state.step}"
        )
        return int(meta["epoch"]), done, list(meta.get("epochs_done") or [])

    def fit(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.yaml", dump_config(cfg))
            atomic_write_json(self.out_dir / "plan.json", describe_plan(self.model.plan))
        steps_per_epoch = len(self.train_reader)
        if cfg.training.max_steps_per_epoch > 0:
            steps_per_epoch = min(steps_per_epoch, cfg.training.max_steps_per_epoch)
        k = cfg.training.grad_accumulation_steps
        if steps_per_epoch >= k:
            steps_per_epoch -= steps_per_epoch % k  # every epoch ends on an optimizer step
        global_batch = cfg.data.batch_size * env.world_size
        every = cfg.training.checkpoint_every_steps
        first_epoch, skip, epochs = self._resume()
        self._log(
            f"training {cfg.model.name}: {steps_per_epoch} steps/epoch x {cfg.training.epochs} epochs, "
            f"global batch {global_batch}, world size {env.world_size}, device {env.device}"
        )
        train_seconds = 0.0
        train_samples = 0
        for epoch in range(first_epoch, cfg.training.epochs):
            self.train_reader.set_epoch(epoch)
            self.model.train()
            start = skip if epoch == first_epoch else 0
            bar = tqdm(
                total=steps_per_epoch,
                initial=start,
                desc=f"{cfg.model.name} epoch {epoch + 1}/{cfg.training.epochs}",
                disable=not (cfg.training.progress and env.is_main),
                unit="step",
                dynamic_ncols=True,
                mininterval=_BAR_INTERVAL,
            )
            t0 = time.perf_counter()
            running: list[float] = []
            done = start
            # A background thread reads the next batches while this one trains (pipelined input).
            depth = prefetch_depth(cfg.data.prefetch_batches, env.device)
            batches: Any = (
                iter(Prefetcher(self.train_reader, depth=depth)) if depth > 0 else iter(self.train_reader)
            )
            for i, batch in enumerate(batches):
                if i >= steps_per_epoch:
                    break
                if i < start:
                    continue  # consumed before the resumed checkpoint: same order, skipped exactly
                parts = self.train_step(batch, i)
                if not math.isfinite(parts.total):
                    raise FloatingPointError(
                        f"loss became {parts.total} at step {self.state.step} (epoch {epoch})"
                    )
                self.state.step += 1
                done = i + 1
                running.append(parts.total)
                elapsed = time.perf_counter() - t0
                rate = (done - start) * global_batch / max(elapsed, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{parts.total:.4f}", samples_s=f"{rate:,.0f}")
                if self.state.step % max(cfg.training.log_every, 1) == 0:
                    self.state.history["steps"].append(self.state.step)
                    self.state.history["loss"].append(float(np.mean(running)))
                    running = []
                    if not cfg.training.progress:
                        eta = (steps_per_epoch - done) * elapsed / max(done - start, 1)
                        self._log(
                            f"epoch {epoch + 1} step {done}/{steps_per_epoch} loss {parts.total:.4f} "
                            f"(click {parts.click:.4f} reg {parts.reg:.2e} aux {parts.aux:.4f}) "
                            f"{rate:,.0f} samples/s ETA {eta:.0f}s"
                        )
                if every > 0 and self.state.step % every == 0 and done < steps_per_epoch and done % k == 0:
                    self.save(epoch, done, epochs)
                if self.state.step == _KILL_AT_STEP:
                    # Fault drill (resilience tests): die the way a preempted or OOM-killed job does.
                    os.kill(os.getpid(), signal.SIGKILL)
            if hasattr(batches, "close"):
                batches.close()  # stops the read-ahead thread when the epoch ended early
            bar.close()
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            train_samples += (steps_per_epoch - start) * global_batch
            if running:
                self.state.history["steps"].append(self.state.step)
                self.state.history["loss"].append(float(np.mean(running)))
            metrics = evaluate(self.model, self.eval_reader, env, progress=cfg.training.progress)
            row = {
                "epoch": epoch,
                **metrics,
                "train_seconds": epoch_seconds,
                "train_samples_per_s": (steps_per_epoch - start) * global_batch / max(epoch_seconds, 1e-9),
            }
            epochs.append(row)
            self.state.history["epochs"] = list(epochs)
            self._log(
                f"[{cfg.model.name}] epoch {epoch + 1}: AUC {metrics['auc']:.4f}  gAUC {metrics['gauc']:.4f}  "
                f"logloss {metrics['logloss']:.4f}  ({row['train_samples_per_s']:,.0f} samples/s)"
            )
            # End-of-epoch checkpoint: a resume starts the next epoch.
            ckpt = self.save(epoch + 1, 0, epochs)
        if first_epoch >= cfg.training.epochs:
            ckpt = self.out_dir / "checkpoint"
        result = {
            "model": cfg.model.name,
            "world_size": env.world_size,
            "final": epochs[-1] if epochs else {},
            "epochs": epochs,
            "train_samples_per_s": train_samples / max(train_seconds, 1e-9)
            if train_samples
            else float("nan"),
            "train_seconds": train_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "steps": self.state.step,
            "checkpoint": str(ckpt),
            "config": to_dict(cfg),
        }
        if env.world_size > 1:
            peaks = [None] * env.world_size
            dist.all_gather_object(peaks, result["peak_rss_mb"])
            result["peak_rss_mb_per_rank"] = peaks
        if env.is_main:
            atomic_write_json(self.out_dir / "metrics.json", result)
            plot_training_curve(
                self.state.history, self.out_dir / "training_curve.png", title=f"{cfg.model.name}"
            )
        return result


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg``; returns (and writes) the metrics."""
    return Trainer(cfg).fit()


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path) -> dict[str, Any]:
    """Load a checkpoint into a freshly sharded model (any world size) and evaluate the eval split."""
    env = init_distributed(cfg.training.backend, cfg.training.num_threads)
    seed_everything(cfg.training.seed)
    model = build_model(cfg, device=env.device if env.device.type != "cpu" else None)
    dmp = shard_model(
        model, env, cfg.features, cfg.training, cfg.data.eval_batch_size, plan=saved_plan(cfg, env)
    )
    meta = load_checkpoint(checkpoint, dmp)
    reader = make_reader(cfg, env, "eval", None)
    metrics = evaluate(dmp, reader, env, progress=cfg.training.progress)
    return {"model": cfg.model.name, "checkpoint": str(checkpoint), "checkpoint_meta": meta, **metrics}
