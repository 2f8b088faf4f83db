"""Memory of one training step, broken down, for each implementation of a model.

``fastblocks memory densenet201 --batch-size 32 --device cuda --impl eager,checkpoint,fused``
runs one training step (forward, cross-entropy loss, backward, SGD-with-momentum step) of
each implementation and reports, in bytes:

- ``parameters``, ``buffers`` (BN running statistics), ``gradients`` (``.grad`` after
  backward), ``optimizer_state`` (SGD momentum buffers; they exist before the measured step, as
  in every step but the first);
- ``saved_for_backward``: the storages autograd's saved-tensor hooks see during forward
  (:func:`torch.autograd.graph.saved_tensors_hooks`), de-duplicated by storage, parameters and
  buffers left out, the network input and the labels included; ``per_module_saved`` attributes
  each storage to the innermost module running when it was first packed. (Non-reentrant
  ``torch.utils.checkpoint`` passes its inputs through these hooks too; what it recomputes
  is not saved.) An op that keeps tensors by other means than ``save_for_backward`` would
  escape them: ``activations_held`` does not depend on hooks;
- ``activations_held``: live bytes after forward minus live bytes before it (what the graph
  actually keeps, plus the logits and the loss, minus the input and labels, which existed
  before);
- ``lower_bound``: what any implementation, recomputation included, must keep between forward
  and backward (see :func:`lower_bound`): DenseNet, the network input and every dense block's
  output (the block buffer ``[N, C0 + L*k, H, W]``: all a block's layers read it, so a block's
  backward needs all of it); ResNet, the network input, the stem's output and every residual
  block's output (the checkpoints of block-wise recomputation);
- ``total_peak``: the most bytes live at any moment of the step, and its ``phases`` (the peak
  within forward, backward and the optimizer step, each reset at the phase's start);
- ``transient_peak``: ``total_peak`` minus the highest *resting* level (live bytes at the end
  of forward, of backward or of the step): the memory that exists only inside a phase (the
  gradients of activations in flight, temporaries, workspaces). Never negative.

How "live bytes" is measured, per ``--device``:

- ``cuda``: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (peak reset per phase),
  after one warm-up step; ``--snapshot FILE`` records the allocator's history of the measured
  step (``torch.cuda.memory._record_memory_history``/``_dump_snapshot``; open the pickle at
  https://pytorch.org/memory_viz). Implementations run one after another in this process
  (``empty_cache`` between them).
- ``cpu``: each implementation runs in its own fresh Python process (``subprocess``), so they do
  not pollute each other. Two measurements: the live bytes of every tensor storage, tracked by
  a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees every op's outputs
  (forward and backward) and a ``weakref.finalize`` on their storages (exact at the tensor
  level; kernel-internal scratch memory is not seen), and the process's peak resident set
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), reported as ``rss_total_peak`` = state bytes
  + (peak RSS during the step - RSS just before it): allocator overhead and oneDNN scratch
  included. The meta estimate is computed beside it and its error reported.
- ``meta``: an estimate without allocating anything: the same step on meta tensors (every
  fastblocks op has a fake kernel), with the same storage tracking. The transient peak is
  modelled by the op outputs alive at each moment -- kernel workspaces (cuDNN, cuBLAS) and the
  caching allocator's rounding are not modelled.

Meta estimate against the CPU measurement, DenseNet-201, batch 2, 224x224, float32
(``fastblocks memory densenet201 --device cpu --batch-size 2``, torch 2.13 CPU, 2 cores):

================  ==========  ===========  ==========  =================  ==================
implementation    meta (MiB)  CPU tracked  CPU RSS     error vs tracked   error vs RSS
================  ==========  ===========  ==========  =================  ==================
eager             550.6       550.6        590.4       +0.0%              -6.8%
checkpoint        334.9       334.9        383.9       +0.0%              -12.8%
fused             275.2       262.8        314.5       +4.7%              -12.5%
================  ==========  ===========  ==========  =================  ==================

(total peaks; RSS = state + the peak RSS growth during the step.) Eager and checkpoint run
the same aten ops on meta and on CPU, so the tracked numbers agree exactly; the fused blocks
run their reference (PyTorch) kernels on meta and the C++ CPU kernels on CPU, whose scratch
tensors the tracker does not see. The estimate stays below the RSS by the memory it does
not model (oneDNN scratch and weight reorders, allocator overhead): 40-50 MiB here, a
smaller share at larger batches.

``--max-batch`` finds the largest batch whose step fits in ``--budget`` GiB: on CUDA measured,
by bisection with a clean retry after ``torch.cuda.OutOfMemoryError`` (``gc.collect``,
``empty_cache``; the budget defaults to the device's memory); on meta by bisection of the
estimate; on CPU also by the estimate (a CPU step that does not fit swaps or is killed, so it is
not tried), against ``--budget`` or the machine's available memory.

Precision: ``--dtype`` converts the model and the input (parameters, gradients, momentum and
activations all in that dtype); it is not autocast.

This module runs the measurements (in this process or a fresh one, per implementation, the
batch sweep and the ``--max-batch`` search) and re-exports the rest of the profiler:
:mod:`~fastblocks.profile.memory_config` (what to measure: :class:`MemoryConfig`,
:func:`build_impl`, :func:`lower_bound`), :mod:`~fastblocks.profile.memory_step` (measuring one
step: :class:`StepMemory`, :func:`measure_step`) and :mod:`~fastblocks.profile.memory_report`
(the table, the JSON and the plot).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastblocks.profile.memory_config import (  # noqa: F401  (re-exported: what to measure)
    _DTYPE_ALIASES,
    _DTYPES,
    _GIB,
    _MIB,
    IMPLS,
    MemoryConfig,
    _parameters,
    build_impl,
    dtype_name,
    dtype_of,
    lower_bound,
)
from fastblocks.profile.memory_report import (  # noqa: F401  (re-exported: the output)
    _ROWS,
    _mib,
    _pct,
    format_max_batch,
    format_report,
    plot,
    report_dict,
)
from fastblocks.profile.memory_step import (  # noqa: F401  (re-exported: measuring one step)
    LiveTensorBytes,
    StepMemory,
    _Meter,
    _num_classes,
    _rss_now,
    _rss_peak,
    _SavedBytes,
    _storage_key,
    _unique_bytes,
    is_oom,
    measure_step,
)

__all__ = [
    "IMPLS",
    "MemoryConfig",
    "StepMemory",
    "build_impl",
    "format_report",
    "lower_bound",
    "max_batch",
    "measure",
    "measure_step",
    "plot",
    "profile",
]

# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------


def measure(config: MemoryConfig, *, snapshot: str | None = None) -> StepMemory:
    """Build ``config.impl`` of ``config.model`` on ``config.device`` and measure one step, in this process.

    Out-of-memory becomes ``status="oom"``; an implementation the model lacks, ``"skipped"``.
    """
    device = torch.device(config.device)
    dtype = dtype_of(config.dtype)
    model, reason = build_impl(config.model, config.impl, device)
    if model is None:
        return StepMemory(impl=config.impl, status="skipped", message=reason, batch_size=config.batch_size)
    bound = lower_bound(config.model, config.batch_size, config.size, dtype)
    try:
        return measure_step(
            model, config.batch_size, config.size, dtype=dtype, channels_last=config.channels_last,
            impl=config.impl, lower_bound=bound[0] if bound else None, snapshot=snapshot,
        )  # fmt: skip
    except Exception as exc:  # reported, not raised
        if not is_oom(exc):
            raise
        message = f"out of memory at batch {config.batch_size}: {str(exc).splitlines()[0][:300]}"
    del model
    _clean(device)
    return StepMemory(impl=config.impl, status="oom", message=message, batch_size=config.batch_size)


def _clean(device: torch.device) -> None:
    if device.type != "meta":
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _child_main() -> None:
    """Entry point of the measuring subprocess: config JSON on stdin, result JSON on stdout's last line."""
    config = MemoryConfig(**json.loads(sys.stdin.read()))
    try:
        result = measure(config)
    except Exception as exc:  # the parent reports it
        result = StepMemory(impl=config.impl, status="error", message=f"{type(exc).__name__}: {exc}")
    sys.stdout.write("\n" + json.dumps(result.to_dict()) + "\n")


def measure_isolated(config: MemoryConfig, timeout: float | None = None) -> StepMemory:
    """:func:`measure` in a fresh Python process (CPU: peak RSS then belongs to this step only)."""
    cmd = [sys.executable, "-c", "from fastblocks.profile.memory import _child_main; _child_main()"]
    env = dict(os.environ)
    # The child imports what this process can (a "module:builder" model from the tests, say).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    # glibc raises its mmap threshold after the first large free and then serves tensors from
    # the heap, which keeps freed memory: the peak RSS would follow fragmentation, not live
    # bytes. A fixed threshold returns every freed tensor >= 128 KiB to the OS. Measured on
    # densenet_bc_100_12, batch 16 (RSS total peak - tracked total peak): eager 75 -> 26 MiB,
    # fused 165 -> 47 MiB.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    proc = subprocess.run(
        cmd, input=json.dumps(dataclasses.asdict(config)), capture_output=True, text=True, timeout=timeout,
        check=False, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        if proc.returncode in (-9, 137):
            return StepMemory(
                impl=config.impl, status="oom", batch_size=config.batch_size,
                message=f"the measuring process was killed (signal 9: out of memory?) at batch {config.batch_size}",
            )  # fmt: skip
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return StepMemory(impl=config.impl, status="error", message="measuring process failed: " + " | ".join(tail))
    last = proc.stdout.strip().splitlines()[-1]
    return StepMemory.from_dict(json.loads(last))


def _progress(iterable: Sequence[Any], desc: str, quiet: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc=desc, disable=quiet or None, leave=False, file=sys.stderr)


def profile(
    model: str,
    impls: Sequence[str] = IMPLS,
    *,
    batch_size: int = 32,
    image_size: int | None = None,
    dtype: str = "float32",
    channels_last: bool = False,
    device: str = "cpu",
    snapshot: str | None = None,
    estimate: bool = True,
    quiet: bool = False,
) -> list[StepMemory]:
    """Measure each implementation of ``model`` (see the module docstring for what and how).

    On CPU each implementation runs in its own process, and (``estimate``) the meta estimate
    of the same configuration is added to ``result.estimate`` with its relative error.
    """
    results = []
    for impl in _progress(list(impls), f"{model} memory", quiet):
        config = MemoryConfig(model, impl, batch_size, image_size, dtype, channels_last, device)
        if device == "cpu":
            result = measure_isolated(config)
            if estimate and result.status == "ok":
                try:
                    est = measure(dataclasses.replace(config, device="meta"))
                    result.estimate = _estimate_error(est, result)
                except Exception as exc:  # the measurement stands without its estimate
                    result.estimate = {"error": f"meta estimate failed: {type(exc).__name__}: {exc}"}
        else:
            path = _snapshot_path(snapshot, impl, len(impls)) if snapshot and device.startswith("cuda") else None
            try:
                result = measure(config, snapshot=path)
            except Exception as exc:  # one failing implementation must not hide the others
                result = StepMemory(
                    impl=impl, status="error", message=f"{type(exc).__name__}: {exc}", batch_size=batch_size
                )
            if path and result.status == "ok":
                result.message = f"allocator snapshot: {path}"
        results.append(result)
        _clean(torch.device(device))
    return results


def _estimate_error(est: StepMemory, measured: StepMemory) -> dict[str, Any]:
    out: dict[str, Any] = {"total_peak": est.total_peak, "saved_for_backward": est.saved_for_backward}
    out["error_vs_tracked"] = (
        (est.total_peak - measured.total_peak) / measured.total_peak if measured.total_peak else None
    )
    rss = measured.rss.get("rss_total_peak")
    out["error_vs_rss"] = (est.total_peak - rss) / rss if rss else None
    return out


def _snapshot_path(path: str, impl: str, count: int) -> str:
    if count == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{impl}{ext or '.pickle'}"


# ----------------------------------------------------------------------------------------------
# Max-batch search
# ----------------------------------------------------------------------------------------------


def _fits_estimate(model: str, impl: str, batch: int, base: MemoryConfig, budget: int) -> tuple[bool, int]:
    r = measure(dataclasses.replace(base, impl=impl, batch_size=batch, device="meta"))
    return r.status == "ok" and r.total_peak <= budget, r.total_peak


def _fits_cuda(model: nn.Module, impl: str, batch: int, base: MemoryConfig, budget: int) -> tuple[bool, int]:
    device = next(model.parameters()).device
    _clean(device)
    try:
        r = measure_step(
            model,
            batch,
            base.size,
            dtype=dtype_of(base.dtype),
            channels_last=base.channels_last,
            impl=impl,
            warmup=False,
        )
        peak = r.total_peak
    except Exception as exc:
        if not is_oom(exc):
            raise
        peak = -1
    # Out of the except block: the exception (and the frames holding the failed step's tensors)
    # is gone before memory is released.
    for p in model.parameters():
        p.grad = None
    _clean(device)
    return 0 <= peak <= budget, peak


def max_batch(
    config: MemoryConfig, budget_gib: float | None = None, *, limit: int = 1 << 16, quiet: bool = False
) -> dict[str, Any]:
    """Largest batch of ``config`` (its ``impl`` and ``device``) whose training step fits in the budget.

    Doubling from 1 to the first batch that does not fit, then bisection. CUDA: measured (a
    batch fits when its step runs without ``OutOfMemoryError`` and its peak is within the
    budget, default the device's total memory). meta and CPU: the meta estimate against the
    budget (CPU default: ``MemAvailable``).

    Returns:
        ``{"impl", "max_batch", "peak_bytes", "budget_bytes", "method", "trials": {batch: peak}}``;
        ``max_batch`` is 0 when even batch 1 does not fit.
    """
    device = torch.device(config.device)
    if budget_gib is not None:
        budget = int(budget_gib * _GIB)
    elif device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu":
        budget = _mem_available() or 0
    else:
        raise ValueError("--max-batch on the meta device needs --budget GiB")
    if device.type == "cuda":
        model, reason = build_impl(config.model, config.impl, device)
        if model is None:
            return {"impl": config.impl, "status": "skipped", "message": reason}

        def fits(b: int) -> tuple[bool, int]:
            return _fits_cuda(model, config.impl, b, config, budget)

        method = "measured on CUDA (bisection, clean retry after out-of-memory)"
    else:
        if build_impl(config.model, config.impl, "meta")[0] is None:
            return {
                "impl": config.impl,
                "status": "skipped",
                "message": build_impl(config.model, config.impl, "meta")[1],
            }

        def fits(b: int) -> tuple[bool, int]:
            return _fits_estimate(config.model, config.impl, b, config, budget)

        method = "meta estimate against the budget (bisection)" + (
            "; on CPU not measured: a step that does not fit would swap or be killed" if device.type == "cpu" else ""
        )
    trials: dict[int, int] = {}
    try:
        from tqdm import tqdm

        bar: Any = tqdm(
            desc=f"max batch {config.impl}", unit="trial", disable=quiet or None, leave=False, file=sys.stderr
        )
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None

    def trial(b: int) -> bool:
        ok, peak = fits(b)
        trials[b] = peak
        if bar is not None:
            bar.set_postfix_str(f"batch {b}: {'fits' if ok else 'does not fit'}")
            bar.update(1)
        return ok

    good, bad = 0, None
    b = 1
    while b <= limit:
        if trial(b):
            good, b = b, b * 2
        else:
            bad = b
            break
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if trial(mid):
                good = mid
            else:
                bad = mid
    if bar is not None:
        bar.close()
    return {
        "impl": config.impl,
        "status": "ok",
        "max_batch": good,
        "peak_bytes": trials.get(good),
        "budget_bytes": budget,
        "method": method,
        "limit_reached": bad is None,
        "trials": dict(sorted(trials.items())),
    }


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


# ----------------------------------------------------------------------------------------------
# Batch sweep (the plot's data)
# ----------------------------------------------------------------------------------------------


def sweep(
    config: MemoryConfig, impls: Sequence[str], batches: Sequence[int], quiet: bool = False
) -> dict[str, list[tuple[int, int | None]]]:
    """Total peak per implementation at each batch size (``None`` where it does not fit)."""
    out: dict[str, list[tuple[int, int | None]]] = {impl: [] for impl in impls}
    jobs = [(impl, b) for b in batches for impl in impls]
    for impl, b in _progress(jobs, "batch sweep", quiet):
        c = dataclasses.replace(config, impl=impl, batch_size=b)
        r = measure_isolated(c) if c.device == "cpu" else measure(c)
        if r.status != "skipped":
            out[impl].append((b, r.total_peak if r.status == "ok" else None))
        _clean(torch.device(c.device))
    return {k: v for k, v in out.items() if v}


def default_sweep(batch_size: int) -> list[int]:
    """Batch sizes of the plot's sweep: a quarter, half and all of ``batch_size``."""
    return sorted({max(1, batch_size // 4), max(1, batch_size // 2), batch_size})
