"""The ``fastblocks`` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from fastblocks import info

    print(json.dumps(info.collect(), indent=2) if args.json else info.report())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastblocks.bench.command import run

    return run(args, command=args.command_line)


def _cmd_summary(args: argparse.Namespace) -> int:
    from fastblocks.profile.command import run_summary

    return run_summary(args)


def _cmd_memory(args: argparse.Namespace) -> int:
    from fastblocks.profile.command import run_memory

    return run_memory(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from fastblocks.train.command import run

    return run(args)


def _cmd_experiment(args: argparse.Namespace) -> int:
    from fastblocks.experiments.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fastblocks", description="Fused ResNet/DenseNet building blocks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, and the backends of every op")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)
    from fastblocks.bench.command import add_arguments as _bench_arguments

    p = sub.add_parser("bench", help="benchmark the fused ops and models against eager PyTorch")
    _bench_arguments(p)
    p.set_defaults(func=_cmd_bench)
    from fastblocks.profile.command import add_memory_arguments, add_summary_arguments

    p = sub.add_parser("summary", help="parameters and multiply-adds per stage, analytic vs counted")
    add_summary_arguments(p)
    p.set_defaults(func=_cmd_summary)
    p = sub.add_parser("memory", help="memory of one training step per implementation (eager, checkpoint, fused)")
    add_memory_arguments(p)
    p.set_defaults(func=_cmd_memory)
    from fastblocks.train.command import add_arguments as _train_arguments

    p = sub.add_parser("train", help="train a model: one process, or DDP with synchronized BN under torchrun")
    _train_arguments(p)
    p.set_defaults(func=_cmd_train)
    from fastblocks.experiments.command import add_arguments as _experiment_arguments

    p = sub.add_parser("experiment", help="paper experiments (degradation: plain vs residual nets, He et al. Fig. 6)")
    _experiment_arguments(p)
    p.set_defaults(func=_cmd_experiment)
    return parser


#: The optional dependencies of the tooling, and the extra that installs each (setup.py).
EXTRA_OF = {"matplotlib": "bench", "tqdm": "bench", "numpy": "train", "sklearn": "train"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastblocks`` console script."""
    args = build_parser().parse_args(argv)
    args.command_line = "fastblocks " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRA_OF:
            raise
        extra = "train" if args.command in ("train", "experiment") else EXTRA_OF[top]
        print(
            f"fastblocks {args.command}: needs {top}, which is not installed: pip install 'fastblocks[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
