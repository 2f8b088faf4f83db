"""``fastblocks bench``: op-level and model-level comparisons against eager PyTorch.

Prints a markdown table and a one-line headline, writes ``ops.json`` / ``models.json`` (merged by
key, see :mod:`fastblocks.bench.results`) and PNG charts into the output folder: ``--output``, else
a new ``runs/bench/<timestamp>/`` (git ignores ``runs/``). Only ``--record`` writes the project's
recorded results, ``benchmarks/results/<device-slug>``, and regenerates the README's tables from
them; a user's run never rewrites them.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

_DTYPES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
}  # fmt: skip
_QUICK_MODELS = ("resnet18", "densenet121")
_DEFAULT_MODELS = ("resnet50", "densenet201")


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(p) for p in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _dtype(text: str) -> str:
    key = text.strip().lower()
    if key not in _DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(sorted(_DTYPES))}, got {text!r}")
    return _DTYPES[key]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastblocks bench``."""
    p.description = (
        "Compare fastblocks with eager PyTorch (and torch.compile, checkpointing): op-level and model-level "
        "speed and memory. Prints a markdown table; writes JSON and PNG charts to --output."
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few repetitions (resnet18 + densenet121; a few minutes on a CPU)",
    )
    p.add_argument("--ops", action="store_true", help="op-level benchmarks only (add_relu, BatchNorm-ReLU, ...)")
    p.add_argument(
        "--models",
        type=_csv,
        default=None,
        help="model-level benchmarks only, for these models (e.g. resnet50,densenet201)",
    )
    p.add_argument(
        "--batch-size",
        type=_ints,
        default=None,
        help="model batch size(s), comma-separated (default: 256 ResNet / 64 DenseNet on GPU, 8 on CPU)",
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="model input resolution (default 224; --quick on CPU: 112)"
    )
    p.add_argument(
        "--dtype",
        type=_dtype,
        default=None,
        help="bf16 | fp16 | fp32 (models: the autocast dtype; default bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC layout (default: on for GPU; ops run both layouts unless this is given)",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument(
        "--providers",
        type=_csv,
        default=None,
        help="comma-separated subset of eager,compile,checkpoint,fused,fused-compile,folded "
        "(folded: inference only; default: all on GPU; eager,checkpoint,fused,folded on CPU, where compiling "
        "takes minutes)",
    )
    p.add_argument(
        "--modes",
        type=_csv,
        default=None,
        help="model-level modes, comma-separated subset of train,infer (default: both)",
    )
    p.add_argument(
        "--baseline",
        default="eager",
        help="the provider the tables' speed-up column compares with (default eager; the README's tables "
        "always use eager)",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="exactly this many timed samples per provider (rounds, on the CPU) instead of the time-bounded "
        "default; more rounds narrow the speed-up intervals",
    )
    p.add_argument("--output", default=None, help="results folder (default: a new runs/bench/<timestamp>/)")
    p.add_argument(
        "--record",
        action="store_true",
        help="write the project's recorded results (benchmarks/results/<device-slug>) and regenerate the "
        "README's benchmark tables from them (run from the repository root)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU (default: torch's)")
    p.add_argument("--no-charts", action="store_true", help="do not write PNG charts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--check",
        action="store_true",
        help="first run the accuracy harness (fastblocks.testing.accuracy: every op and block against eager "
        "PyTorch, judged by float64) on this device; stop with exit status 1 if it fails",
    )
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny shapes, one repetition


def _with_reps(timing: dict, reps: int | None) -> dict:
    """``timing`` (keyword arguments of ``measure_interleaved``) set to exactly ``reps`` samples."""
    if reps is None:
        return timing
    return {**timing, "min_reps": reps, "max_reps": reps, "min_time_s": 0.0, "max_time_s": math.inf}


def _timing(device_type: str, quick: bool, tiny: bool) -> dict:
    if tiny:
        return {"warmup": 1, "min_reps": 2, "min_time_s": 0.0, "max_time_s": 0.2}
    if quick:
        return {"warmup": 2, "min_reps": 5, "min_time_s": 0.2, "max_time_s": 2.0}
    return {"warmup": 5 if device_type == "cuda" else 3, "min_reps": 10, "min_time_s": 1.0, "max_time_s": 10.0}


class _Progress:
    """Progress on stderr: a tqdm bar on a terminal; elsewhere (a log file, CI) one plain line per
    case, ``[i/total] case``, since carriage-return bars become one very long line there. Notes
    are written between the bar's redraws (terminal) or as their own lines (log)."""

    def __init__(self, total: int, disable: bool, stream=None) -> None:
        self.bar = None
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done = total, 0
        self.lines = not disable and not _isatty(self.stream)
        if not disable and not self.lines:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", file=self.stream, dynamic_ncols=True)
            except ImportError:
                self.lines = True

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60], refresh=False)
            self.bar.update(1)
        elif self.lines:
            print(f"[{self.done}/{self.total}] {label}", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _record_readme(results_root: Path) -> str:
    """``--record``: regenerate README.md's benchmark section (in the working directory) from
    ``results_root``; returns what happened, for the log."""
    from fastblocks.bench.report import readme_section, replace_between_markers

    readme = Path("README.md")
    if not readme.exists():
        return "README.md not found in the working directory: tables not regenerated"
    text = readme.read_text()
    updated = replace_between_markers(text, readme_section(results_root))
    if updated is None:
        return "README.md has no benchmark markers: tables not regenerated"
    if updated == text:
        return "README.md tables already up to date"
    readme.write_text(updated)
    return "regenerated the README.md benchmark tables"


def _accuracy_check(device_type: str, *, tiny: bool) -> bool:
    """``--check``: the accuracy harness's quick set on every backend of this device; True if it passes."""
    from fastblocks.testing import accuracy

    t0 = time.perf_counter()
    cases = ["batch_norm_relu", "bn_relu_conv3x3"] if tiny else None
    report = accuracy.run_suite(device_type, cases=cases)
    print(f"accuracy check ({time.perf_counter() - t0:.0f} s): {report.summary()}")
    try:
        report.check()
    except AssertionError as exc:
        print(f"fastblocks bench: accuracy check FAILED, nothing measured\n{exc}", file=sys.stderr)
        return False
    return True


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Run ``fastblocks bench`` with parsed ``args``; ``command`` is recorded as the command line."""
    import torch

    from fastblocks.bench import models as model_bench
    from fastblocks.bench import ops as op_bench
    from fastblocks.bench import report
    from fastblocks.bench.env import busy_warning, contention_warning, cpu_snapshot, environment, summary_line
    from fastblocks.bench.memory import max_rss_bytes
    from fastblocks.bench.rates import yardsticks
    from fastblocks.bench.results import default_output_dir, results_path, run_output_dir, write_results

    if args.record and args.output:
        print("fastblocks bench: --record writes benchmarks/results/<device-slug>; do not give --output too",
              file=sys.stderr)  # fmt: skip
        return 2
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"fastblocks bench: --device {args.device}: no CUDA device is available", file=sys.stderr)
        return 2
    if device.type not in {"cpu", "cuda"}:
        print(f"fastblocks bench: --device {args.device}: only cpu and cuda are supported", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"fastblocks bench: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    providers = args.providers or (list(model_bench.PROVIDERS) if cuda else ["eager", "checkpoint", "fused", "folded"])
    unknown = [p for p in providers if p not in model_bench.PROVIDERS]
    if unknown:
        print(f"fastblocks bench: unknown provider(s) {', '.join(unknown)}; "
              f"choose from {', '.join(model_bench.PROVIDERS)}", file=sys.stderr)  # fmt: skip
        return 2
    if args.baseline not in model_bench.PROVIDERS:
        print(f"fastblocks bench: --baseline must be one of {', '.join(model_bench.PROVIDERS)}, got {args.baseline!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.reps is not None and args.reps < 1:
        print(f"fastblocks bench: --reps must be >= 1, got {args.reps}", file=sys.stderr)
        return 2
    model_modes = tuple(args.modes or model_bench.MODES)
    if any(m not in model_bench.MODES for m in model_modes):
        print(f"fastblocks bench: --modes must be a subset of {','.join(model_bench.MODES)}, got {args.modes}",
              file=sys.stderr)  # fmt: skip
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else None
    notes: list[str] = []
    if args.check and not _accuracy_check(device.type, tiny=args.tiny):
        return 1

    do_models = not args.ops
    do_ops = args.ops or args.models is None
    module = None
    if do_models:
        module, reason = model_bench.load_models()
        if module is None:
            if args.models is not None:
                print(f"fastblocks bench: {reason}; cannot run --models", file=sys.stderr)
                return 2
            notes.append(f"model-level benchmarks skipped: {reason}; ran the op-level comparison only")
            do_models = False

    env = environment(device, command=command)
    env.update(yardsticks(device, small=args.tiny))
    if args.record:
        out_dir = default_output_dir(env["device_slug"])
    else:
        out_dir = Path(args.output) if args.output else run_output_dir()
    print(f"fastblocks bench on {summary_line(env)}")
    busy = busy_warning(env) if not cuda else None
    snapshot = cpu_snapshot()
    if busy:
        notes.append(busy)
    for n in notes:
        print(f"note: {n}")

    # ------------------------------------------------------------------ plan
    op_units: list[tuple] = []
    if do_ops:
        layouts = (False, True) if args.channels_last is None else (bool(args.channels_last),)
        cases = op_bench.default_cases(device, quick=args.quick, tiny=args.tiny, dtype=dtype, layouts=layouts)
        op_modes = ("fwd", "full") if (args.quick or args.tiny) else op_bench.MODES
        for case in cases:
            for prov in providers:
                if prov in op_bench.PROVIDERS:
                    op_units.append((case, prov, op_modes))
    model_units: list[tuple] = []
    if do_models:
        names = args.models or list(_QUICK_MODELS if args.quick or args.tiny else _DEFAULT_MODELS)
        for name in names:
            builder = model_bench.builder_for(module, name)
            if builder is None:
                notes.append(f"{name}: fastblocks.models has no builder of that name, skipped")
                continue
            base = model_bench.default_config(device, name, quick=args.quick or args.tiny)
            for bs in args.batch_size or [base.batch_size]:
                cfg = model_bench.ModelConfig(
                    batch_size=2 if args.tiny and not args.batch_size else bs,
                    image_size=args.image_size or (32 if args.tiny else base.image_size),
                    dtype=dtype or base.dtype,
                    channels_last=base.channels_last if args.channels_last is None else bool(args.channels_last),
                    timing=_with_reps(_timing(device.type, True, True) if args.tiny else base.timing, args.reps),
                )
                model_units.append((name, builder, cfg))
    model_cases = sum(len(model_bench.provider_modes(p, model_modes)) for p in providers)
    total = sum(len(m) for *_, m in op_units) + model_cases * len(model_units)
    progress = _Progress(total, args.no_progress)

    # ------------------------------------------------------------------ measure
    op_rows: list[dict] = []
    timing = _with_reps(_timing(device.type, args.quick, args.tiny), args.reps)
    # The providers of one case are timed together, samples in alternation (measure_interleaved).
    by_case: dict[op_bench.OpCase, list[tuple[str, tuple[str, ...]]]] = {}
    for case, prov, modes in op_units:
        by_case.setdefault(case, []).append((prov, modes))
    for case, provs in by_case.items():
        preps = []
        for prov, _ in provs:
            reason = op_bench.provider_available(prov, device, allow_cpu_compile=args.providers is not None)
            if reason is not None:
                continue
            try:
                preps.append(op_bench.prepare(case, prov, device))
            except Exception as exc:  # report and go on: one failing case must not lose the rest
                notes.append(f"{case.id} {prov}: failed, {type(exc).__name__}: {exc}")
                progress.note(notes[-1])
        for mode in provs[0][1]:
            if preps:
                try:
                    op_rows.extend(op_bench.run_interleaved(preps, mode, device, yardsticks=env, timing=timing))
                except Exception as exc:
                    notes.append(f"{case.id} {mode}: failed, {type(exc).__name__}: {exc}")
                    progress.note(notes[-1])
            for prov, _ in provs:
                progress.step(f"{case.id} {prov} {mode}")
        del preps
    model_rows: list[dict] = []
    for name, builder, cfg in model_units:
        ran = model_bench.run_model(
            name, builder, providers, device, cfg, yardsticks=env, modes=model_modes,
            on_skip=lambda m: (notes.append(m), progress.note(m)), progress=progress.step,
        )  # fmt: skip
        model_rows.extend(ran)
        missing = model_cases - len(ran)
        for _ in range(missing):
            progress.step(f"{name} skipped")
    progress.close()

    # ------------------------------------------------------------------ write and report
    env["max_rss_bytes"] = max_rss_bytes()
    late = None if cuda or busy else contention_warning(snapshot, env.get("cpu_count"))
    if late:
        notes.append(late)
    written: list[Path] = []
    history: list[dict] = []
    for suite, rows in (("ops", op_rows), ("models", model_rows)):
        if rows:
            path = results_path(out_dir, suite)
            history += write_results(path, suite, env, rows)["rows"]
            written.append(path)
    if not args.no_charts and (op_rows or model_rows):
        try:
            written += report.write_charts(op_rows + model_rows, out_dir, title=env["device_name"], history=history)
        except ImportError as exc:
            notes.append(f"charts skipped: {exc}")
    print()
    print(report.tables(op_rows + model_rows, args.baseline))
    print()
    for n in notes:
        print(f"note: {n}")
    for path in written:
        print(f"wrote {path}")
    if args.record and written:
        print(_record_readme(out_dir.parent))
    print(f"fastblocks bench: {len(op_rows) + len(model_rows)} measurements in {time.perf_counter() - start:.1f} s")
    charts = [p for p in written if p.suffix == ".png"]
    if charts:
        print(f"charts: {', '.join(str(p) for p in charts)}")
    print(report.headline(op_rows + model_rows, env.get("device_name") or device.type, busy or late))
    return 0
