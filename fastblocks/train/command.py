"""``fastblocks train``: arguments and entry point.

One process::

    fastblocks train --model resnet20 --data cifar10:~/data/cifar-10-batches-py --epochs 164 \\
        --batch-size 128 --lr 0.1 --schedule step --milestones 0.5 0.75 --output runs/resnet20

Many processes (``--batch-size`` is the global batch, split over the ranks)::

    torchrun --nproc_per_node 8 -m fastblocks train --model resnet50 --data imagefolder:/data/imagenet \\
        --epochs 90 --batch-size 1024 --lr 0.4 --warmup-epochs 5 --label-smoothing 0.1 --amp bf16 \\
        --channels-last --output runs/resnet50

Errors a user can fix (a bad data path, a NaN loss, a checkpoint of another run) print one line
``fastblocks train: error: ...`` and exit with status 1, without a traceback
(``FASTBLOCKS_TRACEBACK=1`` shows it).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastblocks.train.trainer import TrainConfig

__all__ = ["add_arguments", "config_from_args", "run"]


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--model-arg takes KEY=VALUE (e.g. widths=(8,16,32)), got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare word: a string
    return key, parsed


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _pos_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastblocks train``."""
    p.description = (
        "Train a model of the registry with SGD, on one process or many (torchrun: DDP with synchronized BN). "
        "Writes DIR/checkpoint.pt (atomically, every epoch), DIR/metrics.csv and DIR/metrics.json."
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet20", help="a registry name (fastblocks summary list), default resnet20")
    g.add_argument(
        "--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
        help="extra builder keyword argument (Python literal), repeatable: --model-arg 'widths=(8,16,32)'",
    )  # fmt: skip
    fused = g.add_mutually_exclusive_group()
    fused.add_argument("--fused", dest="fused", action="store_true", default=True, help="fused blocks (default)")
    fused.add_argument("--eager", dest="fused", action="store_false", help="the eager twin (fused=False)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and inputs")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data", default="synthetic",
        help="synthetic | digits (scikit-learn's 8x8 digits, upsampled) | cifar10:DIR (python batches) | "
        "imagefolder:DIR (DIR/train/<class>/*, DIR/val/<class>/*); default synthetic",
    )  # fmt: skip
    g.add_argument(
        "--image-size", type=_pos_int, default=None,
        help="image height/width (default: 32; 224 for imagefolder; CIFAR is resized if set)",
    )  # fmt: skip
    g.add_argument("--num-workers", type=_nonneg_int, default=0, help="batch-loading worker processes (default 0)")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=_pos_int, default=1, help="epochs (the schedule's length), default 1")
    g.add_argument("--batch-size", type=_pos_int, default=128, help="global batch size (all ranks), default 128")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate, default 0.1")
    g.add_argument("--schedule", choices=("cosine", "step"), default="cosine", help="per-step schedule (cosine)")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warmup length in epochs (default 0)")
    g.add_argument(
        "--milestones", type=float, nargs="+", default=[0.5, 0.75], metavar="FRACTION",
        help="step schedule: multiply the lr by --gamma at these fractions of training (default 0.5 0.75)",
    )  # fmt: skip
    g.add_argument("--gamma", type=float, default=0.1, help="step schedule factor (default 0.1)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument(
        "--weight-decay", type=float, default=1e-4,
        help="L2 on conv/linear weights only; BN parameters and biases get none (default 1e-4)",
    )  # fmt: skip
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (default 0)")
    g.add_argument(
        "--amp", choices=("none", "bf16", "fp16"), default="none",
        help="autocast dtype; fp16 adds a GradScaler (default none)",
    )  # fmt: skip

    g = p.add_argument_group("run")
    g.add_argument("--output", default=None, metavar="DIR", help="output directory (default runs/<model>)")
    g.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    g.add_argument(
        "--checkpoint-every", type=_nonneg_int, default=0, metavar="STEPS",
        help="also checkpoint every STEPS optimizer steps (default: at the end of each epoch only)",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of initialization, data order and augmentation")
    g.add_argument(
        "--deterministic", action="store_true",
        help="deterministic algorithms: a resumed run ends bitwise equal to an uninterrupted one (CPU)",
    )  # fmt: skip
    g.add_argument("--max-steps", type=_pos_int, default=None, help="stop after this many optimizer steps in total")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when not a TTY)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~fastblocks.train.trainer.TrainConfig` of parsed ``fastblocks train`` arguments."""
    from fastblocks.train.trainer import TrainConfig

    return TrainConfig(
        model=args.model,
        model_kwargs=dict(args.model_arg),
        data=args.data,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        milestones=tuple(args.milestones),
        gamma=args.gamma,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        amp=args.amp,
        channels_last=args.channels_last,
        fused=args.fused,
        compile=args.compile,
        output=args.output if args.output is not None else os.path.join("runs", args.model),
        resume=args.resume,
        seed=args.seed,
        deterministic=args.deterministic,
        max_steps=args.max_steps,
        num_workers=args.num_workers,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        progress=False if args.no_progress else None,
    )


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story for a user (printed without a traceback)."""
    from fastblocks.train.checkpoint import CheckpointError
    from fastblocks.train.data import DataError
    from fastblocks.train.trainer import NonFiniteLossError

    return (DataError, CheckpointError, NonFiniteLossError, ValueError)


def report_error(command: str, e: BaseException) -> int:
    """Print ``fastblocks COMMAND: error: ...`` (rank-prefixed under torchrun) and return status 1."""
    if os.environ.get("FASTBLOCKS_TRACEBACK"):
        raise e
    rank = os.environ.get("RANK")
    where = f" [rank {rank}]" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    print(f"fastblocks {command}{where}: error: {e}", file=sys.stderr, flush=True)
    return 1


def run(args: argparse.Namespace) -> int:
    """Run ``fastblocks train``; 0 on success, 1 with a one-line message on a user error."""
    from fastblocks.train.trainer import train

    try:
        train(config_from_args(args))
    except user_errors() as e:
        return report_error("train", e)
    return 0
