"""The training loop behind ``fastblocks train``: one process or many (DDP), exact resume.

:func:`train` runs a :class:`TrainConfig`: SGD (weight decay on weights only), a per-step
cosine or step schedule with warmup, label smoothing, bf16/fp16 autocast (a GradScaler for
fp16), channels_last, ``torch.compile``, and per-epoch evaluation with metrics written to
``DIR/metrics.csv`` and ``DIR/metrics.json``.

Many processes: under ``torchrun`` (or in a process group the caller created) the model's
BatchNorm layers synchronize their statistics over the group
(:func:`fastblocks.nn.batchnorm.convert_sync_batchnorm`, gloo on CPU too), the model is wrapped
in ``DistributedDataParallel``, each rank trains on its shard of every global batch
(:class:`fastblocks.train.data.ShardedBatches`) and only rank 0 writes files. ``--batch-size`` is
the global batch. One process on a batch of B and N processes on B/N each compute the same step
up to floating-point summation order.

Checkpoints (``DIR/checkpoint.pt``, written atomically) hold the model, optimizer, scheduler,
scaler, epoch, step, position in the epoch, the training accumulators of the current epoch, the
metrics history, and every rank's Python/NumPy/torch/CUDA generator states. The data order and
the augmentation are functions of ``(seed, epoch, sample)``, so with ``deterministic=True`` a
run stopped at any checkpoint and resumed ends bitwise identical to an uninterrupted one on CPU
(tests/train/test_checkpoint.py). On GPU the same holds as far as the kernels are deterministic.

A non-finite loss (NaN/Inf, checked on every step before the update, over all ranks) stops the
run with :class:`NonFiniteLossError` naming the step; the last checkpoint is left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastblocks.train import distributed as fdist
from fastblocks.train.checkpoint import (
    CheckpointError,
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fastblocks.train.data import DataError, Dataset, ShardedBatches, iterate_batches, load_data
from fastblocks.train.optim import make_optimizer, make_scheduler

__all__ = ["METRIC_FIELDS", "NonFiniteLossError", "TrainConfig", "TrainResult", "build_model", "train"]

CHECKPOINT = "checkpoint.pt"
METRIC_FIELDS = (
    "epoch", "step", "partial", "lr", "train_loss", "train_top1", "train_top5", "test_loss", "test_top1",
    "test_top5", "train_images", "images_per_s", "epoch_time_s", "peak_memory_mb", "memory_kind",
)  # fmt: skip
# Fields that change what a run computes: resuming with another value would not continue the run.
_RESUME_KEYS = ("model", "model_kwargs", "data", "image_size", "batch_size", "seed", "fused", "schedule")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; ``step`` is the 1-based optimizer step that produced it."""

    def __init__(self, step: int, epoch: int, value: float) -> None:
        super().__init__(
            f"loss is {value} at step {step} (epoch {epoch + 1}); stopping before the update. "
            "Lower --lr, add --warmup-epochs, or use --amp bf16 instead of fp16; the last checkpoint is unchanged"
        )
        self.step, self.epoch, self.value = step, epoch, value


@dataclass
class TrainConfig:
    """Everything that defines a training run (the ``fastblocks train`` options).

    Sizes: ``batch_size`` is the global batch (split over the ranks). ``epochs`` sets the length
    of the schedule; ``max_steps`` stops earlier (the schedule is unchanged, so a run stopped by
    ``max_steps`` can be resumed to the end). ``schedule_steps`` overrides the schedule length.
    """

    model: str = "resnet20"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "synthetic"
    image_size: int | None = None
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    schedule_steps: int | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    amp: str = "none"
    channels_last: bool = False
    fused: bool = True
    compile: bool = False
    output: str | None = None
    resume: bool = False
    seed: int = 0
    deterministic: bool = False
    max_steps: int | None = None
    num_workers: int = 0
    checkpoint_every: int = 0
    eval_batch_size: int | None = None
    device: str = "auto"
    progress: bool | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"--schedule must be cosine or step, got {self.schedule!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"--amp must be bf16, fp16 or none, got {self.amp!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.momentum < 0:
            raise ValueError("--warmup-epochs, --weight-decay and --momentum must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.resume and not self.output:
            raise ValueError("--resume needs --output DIR (the directory holding checkpoint.pt)")
        if self.num_workers < 0 or self.checkpoint_every < 0:
            raise ValueError("--num-workers and --checkpoint-every must be >= 0")


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank).

    Attributes:
        model: the trained model, unwrapped (no DDP/compile wrapper), on its training device.
        history: one metrics row per evaluation (:data:`METRIC_FIELDS`).
        step_losses: the loss of every optimizer step, averaged over ranks (since the start of the run,
            also across resumes).
        step: optimizer steps done; epoch: completed epochs.
        world_size: processes that trained.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    step_losses: list[float]
    step: int
    epoch: int
    world_size: int


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``get_model(cfg.model, fused=cfg.fused, num_classes=..., **cfg.model_kwargs)``."""
    from fastblocks.models.registry import get_model

    kwargs = {"num_classes": num_classes, **cfg.model_kwargs, "fused": cfg.fused}
    try:
        return get_model(cfg.model, **kwargs)
    except TypeError as e:  # a --model-arg the builder does not take (or takes twice)
        raise ValueError(f"cannot build {cfg.model} with {kwargs}: {e}") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seed the legacy global generator user code may draw from)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms while training; restores the process-wide flags afterwards."""
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if enabled:
        # cuBLAS needs a fixed workspace for reproducible GEMMs (read when the handle is created).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: some CUDA backward kernels (adaptive pooling) have no deterministic version.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


def _peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB: allocated on the GPU since the last reset, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "cpu_max_rss"


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, k5: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct top-1 and top-``k5`` predictions. ``logits [B, K]``, ``target [B]`` -> two 0-d counts."""
    top = logits.topk(k5, dim=1).indices
    hit = top == target[:, None]
    return hit[:, 0].sum(), hit.any(dim=1).sum()


class _Log:
    def __init__(self, info: fdist.DistInfo, log: Callable[[str], None] | None) -> None:
        self.main = info.is_main
        self.fn = log if log is not None else (lambda s: print(s, flush=True))

    def __call__(self, text: str) -> None:
        if self.main:
            self.fn(text)


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    lines = [",".join(METRIC_FIELDS)]
    for row in history:
        cells = []
        for k in METRIC_FIELDS:
            v = row.get(k, "")
            cells.append(f"{v:.6g}" if isinstance(v, float) else str(v))
        lines.append(",".join(cells))
    atomic_write_text(out / "metrics.csv", "\n".join(lines) + "\n")
    atomic_write_text(out / "metrics.json", json.dumps(history, indent=1) + "\n")


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["milestones"] = list(d["milestones"])
    return d


def train(
    cfg: TrainConfig,
    *,
    model_fn: Callable[[int], nn.Module] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` and return the model and its metrics.

    Args:
        cfg: the run (see :class:`TrainConfig`).
        model_fn: build the model instead of the registry: ``model_fn(num_classes) -> nn.Module``
            (called after seeding, on every rank).
        log: where rank 0's progress lines go (default ``print``).

    Raises:
        DataError, CheckpointError, NonFiniteLossError, ValueError: with a message for the user.
    """
    cfg.validate()
    info = fdist.setup(cfg.device)
    ok = False
    try:
        with _determinism(cfg.deterministic, info.device):
            result = _train(cfg, info, model_fn, _Log(info, log))
        ok = True
        return result
    finally:
        if ok:
            fdist.teardown(info)
        elif info.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: the other ranks may be elsewhere


def _train(
    cfg: TrainConfig, info: fdist.DistInfo, model_fn: Callable[[int], nn.Module] | None, log: _Log
) -> TrainResult:
    device, world, rank = info.device, info.world_size, info.rank
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {world} processes")
    local_batch = cfg.batch_size // world
    eval_batch = max(1, (cfg.eval_batch_size or cfg.batch_size) // world)
    out = Path(cfg.output) if cfg.output else None

    _seed_everything(cfg.seed)
    train_set, test_set = load_data(cfg.data, cfg.image_size, seed=cfg.seed)
    steps_per_epoch = len(ShardedBatches(len(train_set), local_batch, rank=rank, world_size=world))
    if steps_per_epoch == 0:
        raise DataError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    total_steps = cfg.schedule_steps or cfg.epochs * steps_per_epoch

    model = model_fn(train_set.num_classes) if model_fn is not None else build_model(cfg, train_set.num_classes)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    raw = model
    if info.distributed:
        from fastblocks.nn.batchnorm import convert_sync_batchnorm

        # Also the BatchNorms inside the fused DenseNet nodes (blocks, transitions, stem): they read
        # the group from their modules and all-reduce their statistics (fastblocks/ops/dense_block.py).
        raw = model = convert_sync_batchnorm(model, torch.distributed.group.WORLD)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = make_optimizer(
        raw, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
    scheduler = make_scheduler(
        optimizer,
        total_steps=total_steps,
        schedule=cfg.schedule,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        milestones=tuple(cfg.milestones),
        gamma=cfg.gamma,
    )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    epoch, batch_in_epoch, step = 0, 0, 0
    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    accum_state: dict[str, float] | None = None
    if cfg.resume:
        assert out is not None
        ckpt = load_checkpoint(out / CHECKPOINT)
        saved = ckpt.get("config", {})
        for key in _RESUME_KEYS:
            mine = _config_dict(cfg)[key]
            if key in saved and saved[key] != mine:
                raise CheckpointError(
                    f"{out / CHECKPOINT} was written by a run with {key}={saved[key]!r}, this one has {mine!r}"
                )
        if ckpt["world_size"] != world:
            raise CheckpointError(
                f"{out / CHECKPOINT} was written by {ckpt['world_size']} process(es), this run has {world}: "
                "the data shards and per-rank generators would differ"
            )
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        epoch, batch_in_epoch, step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        history, step_losses = list(ckpt["history"]), list(ckpt["step_losses"])
        mine_state = ckpt["ranks"][rank]
        accum_state = mine_state["accum"]
        restore_rng(mine_state["rng"])
        log(f"resumed from {out / CHECKPOINT}: epoch {epoch + 1}, batch {batch_in_epoch}, step {step}")
    if out is not None and info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(_config_dict(cfg), indent=1) + "\n")
        if cfg.resume:
            _write_metrics(out, history)

    fmodel: nn.Module = torch.compile(model) if cfg.compile else model
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    k5 = min(5, train_set.num_classes)
    show_progress = info.is_main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    log(
        f"training {cfg.model} ({'fused' if cfg.fused else 'eager'}, "
        f"{sum(p.numel() for p in raw.parameters()):,} parameters) on {train_set.name}: {len(train_set)} train / "
        f"{len(test_set)} test images of {train_set.image_size}x{train_set.image_size}, {world} process(es) on "
        f"{device.type}, global batch {cfg.batch_size}, {steps_per_epoch} steps/epoch, {total_steps} scheduled"
    )

    def checkpoint(acc: dict[str, float] | None) -> None:
        # Every rank's generators and (mid-epoch) its share of the epoch's training sums.
        ranks = fdist.all_gather_objects({"rng": capture_rng(), "accum": acc}, info)
        if out is None or not info.is_main:
            return
        state = {
            "model": raw.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "step": step,
            "world_size": world,
            "history": history,
            "step_losses": step_losses,
            "ranks": ranks,
            "config": _config_dict(cfg),
        }
        save_checkpoint(out / CHECKPOINT, state)

    stop = cfg.max_steps is not None and step >= cfg.max_steps
    while epoch < cfg.epochs and not stop:
        batches = ShardedBatches(len(train_set), local_batch, seed=cfg.seed, epoch=epoch, rank=rank, world_size=world)
        acc = accum_state or {"loss": 0.0, "correct1": 0.0, "correct5": 0.0, "count": 0.0, "time": 0.0}
        accum_state = None
        sums = torch.tensor([acc["loss"], acc["correct1"], acc["correct5"], acc["count"]], dtype=torch.float64)
        sums = sums.to(device)
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bar = _progress(show_progress, len(batches), batch_in_epoch, epoch, cfg.epochs)
        t0, time_before = time.perf_counter(), acc["time"]
        batches_iter = iterate_batches(
            train_set, batches, train=True, seed=cfg.seed, epoch=epoch, start=batch_in_epoch,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        )  # fmt: skip
        for x, y in batches_iter:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = fmodel(x)
            loss = loss_fn(logits.float(), y)
            # One small all-reduce per step: every rank sees the same value, so all stop together.
            global_loss = fdist.all_reduce_sum(loss.detach().to(torch.float64).reshape(1), info).item() / world
            if not math.isfinite(global_loss):
                if bar is not None:
                    bar.close()
                raise NonFiniteLossError(step + 1, epoch, global_loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            batch_in_epoch += 1
            step_losses.append(global_loss)
            with torch.no_grad():
                c1, c5 = _topk_correct(logits.detach().float(), y, k5)
                n = sums.new_tensor(y.numel())
                sums += torch.stack([loss.detach().double() * n, c1.double(), c5.double(), n])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stop = True
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batch_in_epoch < len(batches):
                elapsed = time_before + time.perf_counter() - t0
                checkpoint(_accum(sums, elapsed))
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time_before + time.perf_counter() - t0
        local_sums = sums.clone()
        totals = fdist.all_reduce_sum(sums, info).tolist()
        partial = batch_in_epoch < len(batches)
        row = _epoch_row(
            epoch, step, partial, optimizer.param_groups[0]["lr"], totals, train_time, device,
            _evaluate(raw, test_set, eval_batch, info, cfg, amp_dtype, loss_fn, k5),
        )  # fmt: skip
        history.append(row)
        log(_format_row(row, cfg.epochs))
        acc_out = _accum(local_sums, train_time) if partial else None
        if not partial:
            epoch, batch_in_epoch = epoch + 1, 0
        checkpoint(acc_out)
        if out is not None and info.is_main:
            _write_metrics(out, history)
    return TrainResult(raw, history, step_losses, step, epoch, world)


def _accum(sums: torch.Tensor, elapsed: float) -> dict[str, float]:
    """This rank's running training sums ``[loss*n, top1, top5, n]`` and time, for a mid-epoch checkpoint."""
    return dict(zip(("loss", "correct1", "correct5", "count"), sums.tolist())) | {"time": elapsed}


def _progress(show: bool, total: int, initial: int, epoch: int, epochs: int) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    dataset: Dataset,
    local_batch: int,
    info: fdist.DistInfo,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None,
    loss_fn: nn.Module,
    k5: int,
) -> tuple[float, float, float]:
    """Test loss, top-1 and top-k5 accuracy (%) over the whole test set, sharded over the ranks."""
    was_training = model.training
    model.eval()
    device = info.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    batches = ShardedBatches(
        len(dataset), local_batch, rank=info.rank, world_size=info.world_size, drop_last=False, shuffle=False
    )
    for x, y in iterate_batches(dataset, batches, train=False, seed=cfg.seed, epoch=0, num_workers=cfg.num_workers):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        c1, c5 = _topk_correct(logits, y, k5)
        loss = loss_fn(logits, y).double() * y.numel()
        sums += torch.stack([loss, c1.double(), c5.double(), sums.new_tensor(y.numel())])
    model.train(was_training)
    loss_sum, c1, c5, n = fdist.all_reduce_sum(sums, info).tolist()
    n = max(n, 1.0)
    return loss_sum / n, 100.0 * c1 / n, 100.0 * c5 / n


def _epoch_row(
    epoch: int,
    step: int,
    partial: bool,
    lr: float,
    totals: list[float],
    train_time: float,
    device: torch.device,
    test: tuple[float, float, float],
) -> dict[str, Any]:
    loss_sum, c1, c5, n = totals
    n_safe = max(n, 1.0)
    peak, kind = _peak_memory(device)
    return {
        "epoch": epoch + 1,
        "step": step,
        "partial": partial,
        "lr": lr,
        "train_loss": loss_sum / n_safe,
        "train_top1": 100.0 * c1 / n_safe,
        "train_top5": 100.0 * c5 / n_safe,
        "test_loss": test[0],
        "test_top1": test[1],
        "test_top5": test[2],
        "train_images": int(n),
        "images_per_s": n / train_time if train_time > 0 else 0.0,
        "epoch_time_s": train_time,
        "peak_memory_mb": peak,
        "memory_kind": kind,
    }


def _format_row(row: dict[str, Any], epochs: int) -> str:
    tag = " (partial)" if row["partial"] else ""
    return (
        f"epoch {row['epoch']}/{epochs}{tag} step {row['step']}: train loss {row['train_loss']:.4f} "
        f"top1 {row['train_top1']:.2f}% | test loss {row['test_loss']:.4f} top1 {row['test_top1']:.2f}% "
        f"top5 {row['test_top5']:.2f}% | {row['images_per_s']:.1f} img/s | peak {row['peak_memory_mb']:.0f} MiB "
        f"({row['memory_kind']}) | lr {row['lr']:.4g}"
    )
