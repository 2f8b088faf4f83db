"""The accuracy harness: fastblocks against eager PyTorch, both judged by a float64 truth.

Every comparison runs one computation three times on the same weights and the same data:

- the **truth**: the eager module (plain ``torch.nn`` layers) in float64;
- **eager**: the same eager module in the dtype under test ``D``;
- **fused**: its fastblocks twin (same state_dict) in ``D``, on one forced backend.

Inputs and weights are made in float64 and rounded to ``D`` first, so all three start from the
same values. For every output, input gradient, parameter gradient and BatchNorm buffer (after the
forward's update) the error of a result ``r`` against the truth ``t`` is

    err(r) = max|r - t| / max|t|           (0 when both are 0)

and the fused result is accepted when

    err(fused) <= factor * err(eager) + floor(D)

(ARCHITECTURE.md's rule; FlashAttention's tests use the same form). ``num_batches_tracked`` must
be equal. :data:`TOLERANCES` gives the numbers and why.

Model-level runs (:func:`compare`, ``steps > 1``) take a few SGD steps: before each step the
fp64 truth's weights and buffers are copied (rounded) into the eager and fused twins, so each step
is compared at identical weights; after the steps one eval-mode forward is compared.

Chaos, measured (``tests/accuracy/``, ``python -m fastblocks.testing.accuracy --help``): at small
batches a ReLU whose pre-activation lies within the accumulated fp32 forward error of 0
(~4e-6 relative in ResNet-18's layer4) decides differently in two fp32 computations, and layer4's
BatchNorms (16 values per channel at 4x64x64 inputs) spread that one element into every gradient
below it. Eager PyTorch's own fp32 gradients then differ from float64 by 1e-3 to 4e-2
(``python benchmarks/accuracy_models.py --batches 8``: ResNet-50 on 8 of 8 batches, ResNet-18 on
3 of 8, DenseNet-121 on 8 of 8, eager and fused alike), and which of two fp32 implementations is
hit on a given batch is luck. So whole-model comparisons here use :func:`condition` (BatchNorm affine
parameters that keep pre-activations away from 0) and the block- and op-level comparisons use
adversarial data on purpose (exact zeros, BN outputs exactly at 0, constant channels) where the
decision is exact in every implementation.

This module runs the cases and models (:func:`run_case`, :func:`compare_model`, :func:`run_suite`,
the command line) and re-exports the rest of the harness: :mod:`~fastblocks.testing.accuracy_rule`
(the rule, :func:`rel_err`, :class:`Report`), :mod:`~fastblocks.testing.accuracy_cases` (input
distributions, :func:`condition`, :data:`CASES`) and :mod:`~fastblocks.testing.accuracy_trial`
(:class:`Setting`, :func:`compare`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastblocks import _backend
from fastblocks.testing.accuracy_cases import (  # noqa: F401  (re-exported: data and cases)
    _BLOCK,
    _BLOCK_DATA,
    _CONV,
    _TINY,
    CASES,
    DISTRIBUTIONS,
    Case,
    Maker,
    _block_case,
    _bn_case,
    _BNAct,
    _conv_case,
    _convert,
    _fused_class,
    _fused_postact,
    _fused_preact,
    _FusedBNAct,
    _normal,
    _post_relu,
    _PostAct,
    _PreAct,
    _randomize_params,
    _shifted,
    _sparse,
    _ties,
    condition,
)
from fastblocks.testing.accuracy_rule import (  # noqa: F401  (re-exported: the rule)
    TOLERANCES,
    Record,
    Report,
    Tolerance,
    _ulps,
    rel_err,
)
from fastblocks.testing.accuracy_trial import (  # noqa: F401  (re-exported: one trial)
    Setting,
    _compare,
    _place,
    _round_state_,
    _run,
    _sync,
    _tf32,
    compare,
)

# ----------------------------------------------------------------------------- running the cases


def run_case(case: Case, setting: Setting, *, seeds: Sequence[int] = (0,), limit: int | None = None) -> Report:
    """Every (shape, data, seed) trial of ``case`` under ``setting`` (the first ``limit`` of them).

    Per seed every (data, shape) pair is one trial, ordered so that the first ``max(len(data),
    len(shapes))`` trials already meet every distribution and every shape.
    """
    report = Report()
    nd, ns = len(case.data), len(case.shapes)
    trials = [
        (seed, case.data[j % nd], case.shapes[(j // nd + j) % ns]) for seed in seeds for j in range(nd * ns)
    ]  # j -> (data, shape) is a bijection; the first max(nd, ns) trials meet every data and shape
    for i, (seed, data, shape) in enumerate(trials[:limit]):
        g = torch.Generator().manual_seed(1000 * seed + i)
        eager, fuse, xs = case.make(shape, g, data)
        name = f"{tuple(shape)} {data} seed {seed}"
        report.extend(compare(eager, fuse, xs, setting, grad_seed=seed, steps=case.steps, group=case.name, name=name))
    return report


# ----------------------------------------------------------------------------- models
#: Model families: builder name, input size and batch. Small inputs keep the CPU run short;
#: every family of the package is here (basic and bottleneck ResNets, ResNeXt, wide, the block
#: variants, CIFAR ResNets, DenseNet and DenseNet-BC).
MODELS: dict[str, tuple[str, dict, int, int]] = {
    "resnet18": ("resnet18", {}, 64, 4),
    "resnet50": ("resnet50", {}, 64, 4),
    "resnext50_32x4d": ("resnext50_32x4d", {}, 64, 2),
    "wide_resnet50_2": ("wide_resnet50_2", {}, 64, 2),
    "resnet18_bn_after_add": ("resnet18", {"block_variant": "bn_after_add"}, 64, 4),
    "resnet18_relu_before_add": ("resnet18", {"block_variant": "relu_before_add"}, 64, 4),
    "resnet18_preact": ("resnet18", {"block_variant": "preact"}, 64, 4),
    "resnet20": ("resnet20", {}, 32, 4),
    "densenet121": ("densenet121", {}, 64, 4),
    "densenet_bc_100_12": ("densenet_bc_100_12", {}, 32, 4),
}


def compare_model(name: str, setting: Setting, *, seed: int = 0, steps: int = 2, num_classes: int = 10) -> Report:
    """Train ``steps`` SGD steps of a model of :data:`MODELS`, fused vs eager vs float64 truth.

    The eager twin is the package's own model with ``fused=False`` (torchvision's modules and
    forward), conditioned by :func:`condition`; the fused model is built with ``fused=True`` and
    loads the twin's state_dict.
    """
    from fastblocks.models import registry

    builder, kwargs, size, batch = MODELS[name]
    torch.manual_seed(seed)
    eager = registry.get_model(builder, num_classes=num_classes, fused=False, **kwargs)
    condition(eager, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)

    def fuse(m: nn.Module) -> nn.Module:
        fused = registry.get_model(builder, num_classes=num_classes, fused=True, **kwargs)
        fused.load_state_dict(m.state_dict())
        if not any(
            type(sub).__module__.startswith("fastblocks.nn") or "Fused" in type(sub).__name__ for sub in fused.modules()
        ):
            raise AssertionError(f"{name}: the fused model has no fused module")
        return fused

    return compare(eager, fuse, [x], setting, grad_seed=seed, steps=steps, group=name, name=f"seed {seed}")


def available_backends(device: str = "cpu") -> list[str]:
    """The fastblocks backends that can run every op on ``device`` here."""
    ops = _backend.registered_ops()
    return [b for b in _backend.BACKENDS if all(_backend.unavailable_reason(op, b, device) is None for op in ops)]


def settings_for(device: str, backends: Sequence[str] | None = None) -> list[Setting]:
    """The settings a device is checked in: every backend available, NCHW and channels_last, and
    on CUDA fp32 (TF32 off and on), fp16 and bf16 (pure and autocast); fp32 on the CPU."""
    backends = [b for b in (backends or available_backends(device)) if b != "reference" or device == "cpu"]
    out = []
    for b in backends:
        for cl in (False, True):
            if device == "cuda":
                out += [Setting(b, torch.float32, device, cl), Setting(b, torch.float32, device, cl, tf32=True)]
                for dt in (torch.float16, torch.bfloat16):
                    out += [Setting(b, dt, device, cl), Setting(b, dt, device, cl, autocast=True)]
            else:
                out.append(Setting(b, torch.float32, device, cl))
    return out


def run_suite(
    device: str = "cpu",
    *,
    backends: Sequence[str] | None = None,
    cases: Sequence[str] | None = None,
    models: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    quick: bool = True,
    log: Callable[[str], None] | None = None,
    time_limit_s: float | None = None,
) -> Report:
    """The harness over every setting of :func:`settings_for` (``fastblocks bench --check``, the GPU check).

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        backends: backends to check (default: every one available on ``device``).
        cases: names of :data:`CASES` (default: all).
        models: names of :data:`MODELS` checked too (two steps each; fp32 and the first backend only
            on the CPU, every setting on CUDA).
        seeds: seeds of each case.
        quick: the shortest run per case that meets every shape and distribution.
        log: called with one line per case and setting.
        time_limit_s: start no new case after this many seconds (the log says what was skipped).
    """
    report = Report()
    start = time.perf_counter()
    for setting in settings_for(device, backends):
        for name in cases or list(CASES):
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                if log:
                    log(f"{name} [{setting}]: NOT RUN (time limit of {time_limit_s:.0f} s reached)")
                continue
            case = CASES[name]
            limit = max(len(case.data), len(case.shapes)) if quick else None
            part = run_case(case, setting, seeds=seeds, limit=limit)
            report.extend(part)
            if log:
                log(f"{name} [{setting}]: {part.summary()}")
        for name in models:
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                if log:
                    log(f"{name} [{setting}]: NOT RUN (time limit of {time_limit_s:.0f} s reached)")
                continue
            if device == "cpu" and (
                setting.channels_last or setting.backend != settings_for(device, backends)[0].backend
            ):
                continue
            part = compare_model(name, setting)
            report.extend(part)
            if log:
                log(f"{name} [{setting}]: {part.summary()}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastblocks.testing.accuracy``: run the harness here and print its verdict."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastblocks.testing.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="comma-separated (default: every one available)")
    p.add_argument("--cases", default=None, help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--models", default="", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds per case")
    p.add_argument("--full", action="store_true", help="every trial of every case (default: the quick set)")
    p.add_argument("--time-limit", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--json", default=None, help="also write every record to this JSON file")
    args = p.parse_args(argv)
    report = run_suite(
        args.device,
        backends=args.backends.split(",") if args.backends else None,
        cases=args.cases.split(",") if args.cases else None,
        models=[m for m in args.models.split(",") if m],
        seeds=range(args.seeds),
        quick=not args.full,
        log=lambda line: print(line, flush=True),
        time_limit_s=args.time_limit,
    )
    print(report.summary())
    if args.json:
        rows = [{**dataclasses.asdict(r), "tol": dataclasses.asdict(r.tol), "ok": r.ok} for r in report.records]
        with open(args.json, "w") as f:
            json.dump({"summary": report.summary(), "mean_ratios": report.mean_ratios(), "records": rows}, f)
    try:
        report.check()
    except AssertionError as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
