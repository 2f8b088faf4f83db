"""Measuring one training step: the bytes it saves for backward, holds and peaks at.

:class:`StepMemory` (the breakdown), the accounting behind it (a storage tracker for CPU and meta
tensors, saved-tensor hooks attributing saved bytes to modules, the process's RSS) and
:func:`measure_step`, which runs one step of a built model and fills the breakdown. What each
number means and how it is measured per device: :mod:`fastblocks.profile.memory`, which
re-exports everything here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
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

from fastblocks.profile._meta import fast_meta


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
