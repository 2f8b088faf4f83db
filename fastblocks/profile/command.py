"""``fastblocks summary`` and ``fastblocks memory``: arguments and entry points.

``fastblocks summary MODEL``: the papers' per-stage table, parameters and multiply-adds counted
two ways (:mod:`fastblocks.profile.flops`). ``fastblocks memory MODEL``: the memory of one
training step per implementation (:mod:`fastblocks.profile.memory`). An unknown model name
exits with status 2 and the list of names, as argparse does for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

_DTYPES = ("float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16", "half")


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _impls(text: str) -> list[str]:
    from fastblocks.profile.memory import IMPLS

    impls = [p.strip() for p in text.split(",") if p.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad or not impls:
        raise argparse.ArgumentTypeError(f"--impl takes a comma list of {', '.join(IMPLS)}; got {text!r}")
    return impls


def _emit(text: str) -> None:
    """Print to stdout; a closed pipe (``| head``) ends the output quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _unknown_model(command: str, name: str) -> int:
    from fastblocks.models.registry import list_models

    names = list_models()
    listing = ", ".join(names) if names else "(none: no model module could be imported)"
    print(f"fastblocks {command}: error: unknown model {name!r}; available: {listing}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------


def add_summary_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastblocks summary``."""
    p.add_argument("model", help="model name, e.g. resnet50, densenet201, resnet56 (see `fastblocks summary list`)")
    p.add_argument(
        "--input-size", type=int, default=None, help="input height and width (default 224; 32 for CIFAR models)"
    )
    p.add_argument(
        "--stride-on-1x1",
        action="store_true",
        help="He et al.'s v1 bottleneck (stride 2 on the first 1x1, the paper's FLOPs) instead of torchvision's v1.5",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--markdown", action="store_true", help="print a Markdown table")


def run_summary(args: argparse.Namespace) -> int:
    """``fastblocks summary``: exit 0 when both counts agree, 1 on a mismatch, 2 for an unknown model."""
    from fastblocks.models.registry import list_models
    from fastblocks.profile import flops

    if args.model == "list":
        _emit("\n".join(list_models()))
        return 0
    if args.model not in list_models():
        return _unknown_model("summary", args.model)
    summary = flops.summarize(args.model, args.input_size, stride_on_1x1=args.stride_on_1x1)
    if args.json:
        _emit(json.dumps(summary.to_dict(), indent=2))
    else:
        _emit(flops.format_table(summary, markdown=args.markdown))
    return 0 if summary.match else 1


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastblocks memory``."""
    p.add_argument("model", help="model name, e.g. densenet201, resnet50")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 32; 4 on --device cpu)")
    p.add_argument(
        "--image-size", type=int, default=None, help="input height and width (default 224; 32 for CIFAR models)"
    )
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="model and input dtype (not autocast)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    p.add_argument(
        "--device",
        choices=("cuda", "cpu", "meta"),
        default=None,
        help="cuda: allocator statistics; cpu: tracked tensors + peak RSS, one process per implementation; "
        "meta: estimate without allocating (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--impl",
        type=_impls,
        default=["eager", "checkpoint", "fused"],
        help="comma list of eager (fused=False), checkpoint (eager + memory_efficient=True, DenseNet only), fused",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        nargs="?",
        const="",
        default=None,
        help="plot peak vs batch size and saved bytes along the depth (default file: a new "
        "runs/memory/<timestamp>/memory_<model>.png)",
    )
    p.add_argument(
        "--sweep",
        type=_positive_ints,
        default=None,
        help="batch sizes of the plot's peak-vs-batch curve (default: a quarter, a half and all of --batch-size)",
    )
    p.add_argument(
        "--snapshot", metavar="FILE", default=None, help="CUDA: dump the allocator history of the measured step"
    )
    p.add_argument("--max-batch", action="store_true", help="find the largest batch that fits in --budget")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="GiB",
        help="memory budget for --max-batch (default: the GPU's memory; on cpu the available memory; required on meta)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def memory_headline(config: object, results: Sequence[object]) -> str:
    """One line: each implementation's bytes saved for backward and peak of one training step, as
    a ratio of the eager model's (``results``: :class:`fastblocks.profile.memory.StepMemory`)."""
    ok = {r.impl: r for r in results if r.status == "ok"}
    where = f"{config.model}, batch {config.batch_size}, {config.device}"
    eager = ok.get("eager")
    if eager is None or not eager.saved_for_backward:
        return f"headline ({where}): no eager measurement to compare with"
    parts = []
    for impl, r in ok.items():
        if impl == "eager":
            continue
        peak = f", peak {r.total_peak / eager.total_peak:.2f}x" if eager.total_peak and r.total_peak else ""
        parts.append(f"{impl} saved for backward {r.saved_for_backward / eager.saved_for_backward:.2f}x{peak}")
    gone = [f"{r.impl} {r.status}" for r in results if r.status != "ok"]
    body = "; ".join(parts) if parts else "nothing else measured"
    return f"headline ({where}), of eager's: {body}" + (f" ({', '.join(gone)})" if gone else "")


def run_memory(args: argparse.Namespace) -> int:
    """``fastblocks memory``: exit 0 (out-of-memory is a result, reported), 1 on an error, 2 on bad input."""
    from fastblocks.bench.results import run_output_dir
    from fastblocks.models.registry import list_models
    from fastblocks.profile import memory

    if args.model not in list_models():
        return _unknown_model("memory", args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "fastblocks memory: error: --device cuda but no CUDA device is available (try --device cpu or meta)",
            file=sys.stderr,
        )
        return 2
    if args.max_batch and device == "meta" and args.budget is None:
        print("fastblocks memory: error: --max-batch on --device meta needs --budget GiB", file=sys.stderr)
        return 2
    batch = args.batch_size or (4 if device == "cpu" else 32)
    config = memory.MemoryConfig(
        args.model, args.impl[0], batch, args.image_size, memory.dtype_name(args.dtype),
        args.channels_last, device,
    )  # fmt: skip
    notes: list[str] = []
    if args.snapshot and device != "cuda":
        notes.append("--snapshot needs --device cuda (the CUDA caching allocator's history); no snapshot written")

    if args.max_batch:
        import dataclasses

        found = []
        for impl in args.impl:
            try:
                found.append(memory.max_batch(dataclasses.replace(config, impl=impl), args.budget, quiet=args.quiet))
            except Exception as exc:  # reported per implementation
                found.append({"impl": impl, "status": "error", "message": f"{type(exc).__name__}: {exc}"})
        if args.json:
            _emit(json.dumps({"config": dataclasses.asdict(config), "max_batch": found, "notes": notes}, indent=2))
        else:
            _emit("\n".join([memory.format_max_batch(config, found), *[f"note: {n}" for n in notes]]))
        return 0

    results = memory.profile(
        args.model, args.impl, batch_size=batch, image_size=args.image_size, dtype=config.dtype,
        channels_last=args.channels_last, device=device, snapshot=args.snapshot if device == "cuda" else None,
        quiet=args.quiet,
    )  # fmt: skip
    peaks = None
    if args.plot is not None:
        path = Path(args.plot) if args.plot else run_output_dir(Path("runs") / "memory") / f"memory_{args.model}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        peaks = memory.sweep(config, args.impl, args.sweep or memory.default_sweep(batch), quiet=args.quiet)
        memory.plot(str(path), config, results, peaks)
        notes.append(f"plot written to {path}")
    if args.json:
        _emit(json.dumps(memory.report_dict(config, results, peaks, notes), indent=2))
    else:
        _emit("\n".join([memory.format_report(config, results), *[f"note: {n}" for n in notes]]))
        _emit(memory_headline(config, results))
    return 1 if any(r.status == "error" for r in results) else 0
