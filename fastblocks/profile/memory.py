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
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastblocks.profile import flops
from fastblocks.profile._meta import MetaInit, fast_meta

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

#: Implementations ``--impl`` accepts: the eager twin, the eager twin with torchvision's
#: checkpointed bottlenecks (DenseNet only), the fused model.
IMPLS = ("eager", "checkpoint", "fused")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}
_MIB = 1024**2
_GIB = 1024**3


def dtype_name(name: str) -> str:
    """``"fp16"``/``"half"``/``"float16"`` -> ``"float16"`` (the canonical name)."""
    key = _DTYPE_ALIASES.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return key


def dtype_of(name: str) -> torch.dtype:
    """``"float32"``/``"fp16"``/``"bf16"``/... -> ``torch.dtype``."""
    return _DTYPES[dtype_name(name)]


@dataclass
class MemoryConfig:
    """One measurement: which model, implementation, batch, and where."""

    model: str
    impl: str = "eager"
    batch_size: int = 32
    image_size: int | None = None
    dtype: str = "float32"
    channels_last: bool = False
    device: str = "cpu"

    @property
    def size(self) -> int:
        return self.image_size or flops.default_input_size(self.model)


@dataclass
class StepMemory:
    """The breakdown of one training step (bytes); ``status`` is ``ok``, ``oom``, ``skipped`` or ``error``.

    ``per_module_saved`` lists ``(module name, bytes)`` in forward order: the saved-for-backward
    bytes first packed while that module (the innermost one running) was executing.
    """

    impl: str
    status: str = "ok"
    message: str = ""
    method: str = ""
    batch_size: int = 0
    parameters: int = 0
    buffers: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    inputs: int = 0
    saved_for_backward: int = 0
    activations_held: int = 0
    lower_bound: int | None = None
    transient_peak: int = 0
    total_peak: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    resting: dict[str, int] = field(default_factory=dict)
    rss: dict[str, int | None] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)
    per_module_saved: list[tuple[str, int]] = field(default_factory=list)
    module_order: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self, *, per_module: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["per_module_saved"] = [list(x) for x in self.per_module_saved] if per_module else None
        if not per_module:
            d.pop("module_order")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepMemory:
        d = dict(d)
        d["per_module_saved"] = [tuple(x) for x in d.get("per_module_saved") or []]
        d.setdefault("module_order", {})
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> int:
    # The StorageImpl's address: unique among live storages on every device (meta storages all
    # have data_ptr 0, so data_ptr cannot be the key).
    return t.untyped_storage()._cdata


def _unique_bytes(tensors: Iterator[torch.Tensor | None]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of every storage created by an op while active, until it is freed.

    Storages that existed before (``static``: parameters, buffers, inputs, optimizer state)
    are not counted when ops return views of them. ``live`` is the current total of tracked
    storages, ``peak`` its maximum since the last :meth:`reset_peak`.
    """

    def __init__(self, static: Sequence[torch.Tensor] = (), *, shortcuts: bool = True) -> None:
        super().__init__()
        self.shortcuts = shortcuts
        self._static = {_storage_key(t) for t in static}
        self._sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = fast_meta(func, args, kwargs) if self.shortcuts else NotImplemented
        if out is NotImplemented:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._static or key in self._sizes:
            return
        n = st.nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live


class _Meter:
    """Live bytes and their peak since the last reset, on one device."""

    def __init__(self, device: torch.device, static: Sequence[torch.Tensor], static_bytes: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.tracker = None if self.cuda else LiveTensorBytes(static)
        self.static_bytes = static_bytes

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.tracker is None:
            yield
        else:
            with self.tracker:
                yield

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        assert self.tracker is not None
        return self.static_bytes + self.tracker.live

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            assert self.tracker is not None
            self.tracker.reset_peak()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        assert self.tracker is not None
        return self.static_bytes + self.tracker.peak


class _SavedBytes:
    """Saved-tensor hooks that count storages (once each) and attribute them to the running module."""

    def __init__(self, model: nn.Module, exclude: Sequence[torch.Tensor]) -> None:
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: set[int] = set()
        self.total = 0
        self.per_module: dict[str, int] = {}
        self._stack: list[str] = []
        self._model = model
        self._handles: list[Any] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = st._cdata
        if key not in self._exclude and key not in self._seen:
            self._seen.add(key)
            n = st.nbytes()
            self.total += n
            where = self._stack[-1] if self._stack else "(loss)"
            self.per_module[where] = self.per_module.get(where, 0) + n
        return t

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        def enter(name: str) -> Callable[..., None]:
            def hook(*_: object) -> None:
                self._stack.append(name)

            return hook

        def leave(*_: object) -> None:  # must return None: a forward hook's result replaces the output
            if self._stack:
                self._stack.pop()

        for name, module in self._model.named_modules():
            self._handles.append(module.register_forward_pre_hook(enter(name or "(model)")))
            self._handles.append(module.register_forward_hook(leave))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()


def _rss_now() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _rss_peak() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _num_classes(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 1000


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA, or the CPU allocator failing)."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def measure_step(
    model: nn.Module,
    batch_size: int,
    image_size: int | tuple[int, int],
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    in_channels: int = 3,
    impl: str = "model",
    lower_bound: int | None = None,
    warmup: bool | None = None,
    snapshot: str | None = None,
) -> StepMemory:
    """Measure one training step of ``model`` (already on its device) on a random batch.

    The model is converted to ``dtype`` (and channels_last) in place. Input
    ``[batch_size, in_channels, H, W]``, labels ``[batch_size]`` in ``[0, num_classes)``,
    loss ``F.cross_entropy``, optimizer ``SGD(lr=0.01, momentum=0.9)`` with its momentum
    buffers created before the step. ``warmup`` (default: on CUDA only) runs one step first.

    Returns:
        The breakdown; raises what the step raises (out-of-memory included).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    param = next(iter(model.parameters()))
    device = param.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(dtype=dtype, memory_format=fmt)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = list(model.buffers())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    for p in params:
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    x = torch.randn(batch_size, in_channels, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
    y = torch.randint(0, _num_classes(model), (batch_size,), device=device)
    momentum = [opt.state[p]["momentum_buffer"] for p in params]

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        return out, F.cross_entropy(out.float(), y)

    if warmup if warmup is not None else device.type == "cuda":
        step()[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    if device.type != "meta":  # nothing to free on meta, and a full collection costs ~0.3 s
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if snapshot:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)

    result = StepMemory(impl=impl, batch_size=batch_size, lower_bound=lower_bound)
    result.parameters = _unique_bytes(iter(params))
    result.buffers = _unique_bytes(iter(buffers))
    result.optimizer_state = _unique_bytes(iter(momentum))
    result.inputs = _unique_bytes(iter((x, y)))
    static = [*params, *buffers, *momentum, x, y]
    meter = _Meter(device, static, _unique_bytes(iter(static)))
    saved = _SavedBytes(model, exclude=[*params, *buffers])
    order = {name or "(model)": i for i, (name, _) in enumerate(model.named_modules())}

    rss_before, rss_peak_before = _rss_now(), _rss_peak()
    t0 = time.perf_counter()
    try:
        with meter.active():
            m0 = meter.current()
            meter.reset_peak()
            with saved.active():
                out, loss = step()
            m_fwd, p_fwd = meter.current(), meter.peak()
            meter.reset_peak()
            loss.backward()
            del out, loss
            m_bwd, p_bwd = meter.current(), meter.peak()
            result.gradients = _unique_bytes(p.grad for p in params)
            meter.reset_peak()
            opt.step()
            m_opt, p_opt = meter.current(), meter.peak()
    finally:
        if device.type == "cuda" and snapshot:
            try:  # dumped after an out-of-memory error too: the snapshot then shows what filled memory
                torch.cuda.memory._dump_snapshot(snapshot)
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)
    result.seconds = time.perf_counter() - t0
    rss_after = _rss_peak()

    result.method = {
        "cuda": "cuda caching allocator (memory_allocated / max_memory_allocated)",
        "meta": "estimate: storages of op outputs on meta tensors",
    }.get(device.type, "tracked tensor storages (TorchDispatchMode) + peak RSS")
    result.saved_for_backward = saved.total
    result.per_module_saved = list(saved.per_module.items())
    result.module_order = order
    result.activations_held = m_fwd - m0
    result.phases = {"forward": p_fwd, "backward": p_bwd, "optimizer": p_opt}
    result.resting = {"start": m0, "after_forward": m_fwd, "after_backward": m_bwd, "after_step": m_opt}
    result.total_peak = max(p_fwd, p_bwd, p_opt)
    result.transient_peak = result.total_peak - max(m0, m_fwd, m_bwd, m_opt)
    if device.type == "cpu":
        grew = rss_after is not None and rss_peak_before is not None and rss_after > rss_peak_before
        result.rss = {
            "before_step": rss_before,
            "peak": rss_after,
            # The peak RSS never goes down: only a step that raised it tells its own peak.
            "rss_total_peak": (rss_after - rss_before + m0) if grew and rss_before is not None else None,
        }
    opt.zero_grad(set_to_none=True)
    return result


# ----------------------------------------------------------------------------------------------
# Models, lower bound
# ----------------------------------------------------------------------------------------------


def build_impl(name: str, impl: str, device: str | torch.device = "cpu") -> tuple[nn.Module | None, str]:
    """Build implementation ``impl`` of registry model ``name`` (or ``"module:builder"``) on ``device``.

    Returns:
        ``(model, "")``, or ``(None, reason)`` when the implementation does not exist for
        this model (``checkpoint`` is DenseNet's ``memory_efficient=True``).

    Raises:
        ValueError: unknown model or implementation.
    """
    from fastblocks.models import registry

    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; use one of {', '.join(IMPLS)}")
    if ":" in name:
        # "package.module:builder": a model outside the registry (the Python API and the tests;
        # the command line takes registry names only).
        import importlib

        module, _, attr = name.partition(":")
        builder = getattr(importlib.import_module(module), attr)
    else:
        if name not in registry.list_models():
            registry.get_model(name)  # raises ValueError listing the available names
        builder = registry._builder(name)
        assert builder is not None
    kwargs: dict[str, Any] = {"fused": impl == "fused"}
    if impl == "checkpoint":
        if "memory_efficient" not in _parameters(builder):
            return None, f"only DenseNet has torchvision's memory_efficient checkpointing; skipped for {name}"
        kwargs["memory_efficient"] = True
    init = MetaInit() if torch.device(device).type == "meta" else contextlib.nullcontext()
    with torch.device(device), init:
        return builder(**flops._accepted_kwargs(builder, kwargs)), ""


def _parameters(builder: Callable[..., nn.Module]) -> set[str]:
    import inspect

    sig = inspect.signature(builder)
    names = set(sig.parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        # torchvision-style builders forward **kwargs to the class: read its constructor too.
        ret = sig.return_annotation
        cls = ret if isinstance(ret, type) else getattr(sys.modules.get(builder.__module__), str(ret), None)
        if isinstance(cls, type):
            names |= set(inspect.signature(cls.__init__).parameters)
    return names


def lower_bound(
    name: str, batch_size: int, image_size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[int, str] | None:
    """Bytes any implementation must keep between forward and backward, and its definition.

    DenseNet: the input ``[N, 3, S, S]`` + every dense block's output ``[N, C0 + L*k, H, W]``.
    ResNet: the input + the stem's output + every residual block's output. ``None`` for models
    without a config row in :data:`fastblocks.profile.flops.ARCHITECTURES`.
    """
    arch = flops.ARCHITECTURES.get(name)
    if arch is None:
        return None
    size = image_size or flops.default_input_size(name)
    esize = torch.empty((), dtype=dtype).element_size()
    total = batch_size * 3 * size * size
    rows = flops.analytic_counts(arch, size)
    if isinstance(arch, flops.DenseNetArch):
        for r in rows:
            if r.name.startswith("Dense Block"):
                total += batch_size * r.channels * r.height * r.width
        return total * esize, "network input + every dense block's output (the block buffers)"
    stem = rows[0]
    if arch.stem == "imagenet":
        h, w = (stem.height - 1) // 2 + 1, (stem.width - 1) // 2 + 1  # after the 3x3/2 max pool
    else:
        h, w = stem.height, stem.width
    total += batch_size * stem.channels * h * w
    for r, blocks in zip(rows[1:-1], arch.layers):
        total += blocks * batch_size * r.channels * r.height * r.width
    return total * esize, "network input + stem output + every residual block's output"


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
# Report and plot
# ----------------------------------------------------------------------------------------------


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / _MIB:,.1f}"


_ROWS: list[tuple[str, Callable[[StepMemory], int | None]]] = [
    ("parameters", lambda r: r.parameters),
    ("buffers", lambda r: r.buffers),
    ("gradients", lambda r: r.gradients),
    ("optimizer state (momentum)", lambda r: r.optimizer_state),
    ("saved for backward", lambda r: r.saved_for_backward),
    ("  lower bound", lambda r: r.lower_bound),
    ("activations held after forward", lambda r: r.activations_held),
    ("peak in forward", lambda r: r.phases.get("forward")),
    ("peak in backward", lambda r: r.phases.get("backward")),
    ("peak in optimizer step", lambda r: r.phases.get("optimizer")),
    ("transient peak", lambda r: r.transient_peak),
    ("total peak", lambda r: r.total_peak),
]


def format_report(config: MemoryConfig, results: Sequence[StepMemory]) -> str:
    """The breakdown as a table (MiB), one column per implementation, then notes."""
    ok = [r for r in results if r.status == "ok"]
    layout = "channels_last" if config.channels_last else "NCHW"
    lines = [
        f"{config.model}: training step, batch {config.batch_size}, {config.size}×{config.size}, {config.dtype}, "
        f"{layout}, device {config.device}"
    ]
    if ok:
        lines[0] += f" -- {ok[0].method}"
        rows: list[tuple[str, Callable[[StepMemory], int | None]]] = list(_ROWS)
        if config.device == "cpu":
            rows[-1] = ("total peak (tracked tensors)", rows[-1][1])
            rows.append(("total peak from RSS", lambda r: r.rss.get("rss_total_peak")))
            rows.append(("meta estimate of total peak", lambda r: r.estimate.get("total_peak")))
        head = ["MiB", *[r.impl for r in ok]]
        table = [head] + [[label, *[_mib(get(r)) for r in ok]] for label, get in rows]
        if config.device == "cpu":
            table.append(["  estimate error vs tracked", *[_pct(r.estimate.get("error_vs_tracked")) for r in ok]])
            table.append(["  estimate error vs RSS", *[_pct(r.estimate.get("error_vs_rss")) for r in ok]])
        table.append(["seconds (measured step)", *[f"{r.seconds:.2f}" for r in ok]])
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    for r in results:
        if r.estimate.get("error"):
            lines.append(f"{r.impl}: {r.estimate['error']}")
        if r.status == "oom":
            lines.append(f"{r.impl}: OUT OF MEMORY -- {r.message}")
        elif r.status != "ok":
            lines.append(f"{r.impl}: {r.status} -- {r.message}")
        elif r.message:
            lines.append(f"{r.impl}: {r.message}")
    bound = lower_bound(config.model, config.batch_size, config.size, dtype_of(config.dtype))
    if bound:
        lines.append(f"note: lower bound = {bound[1]}")
    lines.append(
        "note: saved for backward = storages packed by saved-tensor hooks (parameters and buffers excluded, input and "
        "labels included); activations held = live bytes after forward - before (hook-independent cross-check)"
    )
    lines.append("note: transient peak = total peak - the highest resting level (after forward/backward/step)")
    if config.device == "meta":
        lines.append(
            "note: meta = estimate (op outputs alive at each moment; no kernel workspaces, no allocator rounding)"
        )
    return "\n".join(lines)


def format_max_batch(config: MemoryConfig, found: Sequence[dict[str, Any]]) -> str:
    """The ``--max-batch`` results as text."""
    lines = [
        f"{config.model}: largest batch per implementation, {config.size}×{config.size}, {config.dtype}, device {config.device}"
    ]
    for f in found:
        if f.get("status") != "ok":
            lines.append(f"  {f['impl']:<11} {f.get('status')}: {f.get('message', '')}")
            continue
        peak = f.get("peak_bytes")
        more = " (search limit reached)" if f.get("limit_reached") else ""
        lines.append(
            f"  {f['impl']:<11} max batch {f['max_batch']:>6}{more}  peak {_mib(peak if peak and peak > 0 else None)} MiB"
            f"  of a {f['budget_bytes'] / _GIB:.2f} GiB budget"
        )
    if found and found[0].get("method"):
        lines.append(f"note: {found[0]['method']}")
    return "\n".join(lines)


def report_dict(
    config: MemoryConfig,
    results: Sequence[StepMemory],
    peaks: dict[str, list[tuple[int, int | None]]] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``--json`` output: configuration, lower bound, one breakdown per implementation, sweep."""
    bound = lower_bound(config.model, config.batch_size, config.size, dtype_of(config.dtype))
    out: dict[str, Any] = {
        "config": {**dataclasses.asdict(config), "image_size": config.size, "impl": [r.impl for r in results]},
        "unit": "bytes",
        "lower_bound": {"bytes": bound[0], "definition": bound[1]} if bound else None,
        "results": [r.to_dict() for r in results],
        "notes": list(notes),
    }
    if peaks is not None:
        out["sweep"] = {impl: [{"batch_size": b, "total_peak": p} for b, p in pts] for impl, pts in peaks.items()}
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


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


def plot(
    path: str,
    config: MemoryConfig,
    results: Sequence[StepMemory],
    peaks: dict[str, list[tuple[int, int | None]]],
) -> None:
    """Three panels: total peak against batch size per implementation (with the floor that any
    implementation needs: weights, gradients, momentum and the activation lower bound); bytes
    saved for backward per module along the depth; and their running sum (eager DenseNet's
    concatenations make it quadratic within each block, the fused blocks keep it flat)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5))
    for impl, points in peaks.items():
        xs = [b for b, p in points if p is not None]
        ax1.plot(xs, [p / _GIB for b, p in points if p is not None], marker="o", label=impl)
    batches = sorted({b for pts in peaks.values() for b, _ in pts})
    bounds = [lower_bound(config.model, b, config.size, dtype_of(config.dtype)) for b in batches]
    ok = [r for r in results if r.status == "ok"]
    if batches and ok and all(bounds):
        state = ok[0].parameters + ok[0].buffers + ok[0].gradients + ok[0].optimizer_state
        floor = [(state + bd[0]) / _GIB for bd in bounds if bd]
        ax1.plot(batches, floor, "k--", label="weights + grads + momentum + activation lower bound")
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("total peak (GiB)")
    ax1.set_title(f"{config.model}: peak memory of a training step ({config.device})")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize="small")

    for r in ok:
        if not r.per_module_saved:
            continue
        n = max(len(r.module_order), 1)
        pts = sorted((r.module_order.get(name, n) / n, b) for name, b in r.per_module_saved)
        ax2.plot([x for x, _ in pts], [b / _MIB for _, b in pts], ".", markersize=3, label=r.impl)
        xs, cum, total = [0.0], [0.0], 0
        for x, b in pts:
            total += b
            xs.append(x)
            cum.append(total / _MIB)
        ax3.step(xs, cum, where="post", label=f"{r.impl} ({total / _MIB:,.0f} MiB)")
    for ax, what in ((ax2, "per module (MiB)"), (ax3, "running sum (MiB)")):
        ax.set_xlabel("depth (module position in definition order: 0 = stem, 1 = classifier)")
        ax.set_ylabel(f"saved for backward, {what}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax2.set_title(f"bytes saved by each module, batch {config.batch_size}")
    ax3.set_title(f"bytes saved along the depth, batch {config.batch_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_sweep(batch_size: int) -> list[int]:
    """Batch sizes of the plot's sweep: a quarter, half and all of ``batch_size``."""
    return sorted({max(1, batch_size // 4), max(1, batch_size // 2), batch_size})
