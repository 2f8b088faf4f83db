"""Backend selection: the one module that decides which implementation of an op runs.

Every fused op has up to four implementations behind one registered ``fastblocks::<op>``:

==========  ==============================================================================
reference   pure PyTorch, written for clarity; the specification the tests compare against
triton      Triton kernels; CUDA GPUs (on the CPU only under ``TRITON_INTERPRET=1``, for tests)
cuda        the compiled CUDA kernels of ``fastblocks._C`` (CUDA builds only)
cpu         the compiled, vectorized and multithreaded CPU kernels of ``fastblocks._C``
==========  ==============================================================================

By default each call picks the best backend available for its device (per op, ``OpSpec``
lists the order). ``set_backend(name)``, the ``use_backend(name)`` context manager and the
``FASTBLOCKS_BACKEND`` environment variable force one; a forced backend that cannot run the
call raises :class:`BackendUnavailableError` saying what is missing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastblocks import _ext

BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda", "cpu")


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run this op on this device."""


@dataclass(frozen=True)
class OpSpec:
    """What one op implements.

    Attributes:
        name: op name (``fastblocks::<name>``).
        triton: whether a Triton implementation exists.
        compiled: the C++ schemas the ``cpu``/``cuda`` backends need (all must have kernels).
        cuda_order: preference on CUDA devices (fastest first, decided by measurement).
        cpu_order: preference on the CPU.
    """

    name: str
    triton: bool = True
    compiled: tuple[str, ...] = ()
    cuda_order: tuple[str, ...] = ("triton", "cuda", "reference")
    cpu_order: tuple[str, ...] = ("cpu", "reference")


_OPS: dict[str, OpSpec] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastblocks_backend", default=None)
_global: str | None = None


def _validate(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return name.strip().lower()


def _env_backend() -> str | None:
    value = os.environ.get("FASTBLOCKS_BACKEND", "").strip()
    if not value or value.lower() in {"auto", "default"}:
        return None
    try:
        return _validate(value)
    except ValueError as exc:
        raise ValueError(f"FASTBLOCKS_BACKEND: {exc}") from None


def register_op(spec: OpSpec) -> OpSpec:
    """Declare an op's backends (called once by each ``fastblocks/ops/<op>.py``)."""
    _OPS[spec.name] = spec
    return spec


def registered_ops() -> dict[str, OpSpec]:
    """All declared ops, by name."""
    return dict(_OPS)


def set_backend(name: str | None) -> None:
    """Force ``name`` for every op from now on (``None`` or ``"auto"``: pick the best again).

    The ``FASTBLOCKS_BACKEND`` environment variable sets the same thing at start-up.
    """
    global _global
    _global = None if name in (None, "auto") else _validate(name)


def get_backend() -> str | None:
    """The forced backend in effect here (context manager, then ``set_backend``, then env), or None.

    Under torch.compile the answer is a constant of the traced graph, as :func:`resolve`'s
    (Dynamo cannot trace ``ContextVar.get``: each call was a graph break).
    """
    if torch.compiler.is_compiling():
        return _get_backend_constant()
    return _get_backend_uncached()


def _get_backend_uncached() -> str | None:
    return _forced.get() or _global or _env_backend()


_get_backend_eager = torch.compiler.disable(_get_backend_uncached, recursive=True)


@torch.compiler.assume_constant_result
def _get_backend_constant() -> str | None:
    return _get_backend_eager()


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager forcing ``name`` inside the block (``None``: automatic choice)."""
    token = _forced.set(None if name in (None, "auto") else _validate(name))
    try:
        yield
    finally:
        _forced.reset(token)


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_reason(device_type: str) -> str | None:
    if not _triton_installed():
        return "triton is not installed"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        if triton_interpreted():
            return None
        return "Triton kernels run on CUDA GPUs (on the CPU only under TRITON_INTERPRET=1, for tests)"
    return f"Triton kernels do not run on {device_type} devices"


def _compiled_reason(spec: OpSpec, backend: str, device_type: str) -> str | None:
    wanted = {"cpu": "cpu", "cuda": "cuda"}[backend]
    if device_type != wanted:
        return f"the {backend} backend runs on {wanted} tensors, these are on {device_type}"
    if not spec.compiled:
        return f"no compiled {backend} kernel exists for {spec.name}"
    if not _ext.loaded():
        return f"the compiled extension fastblocks._C is not available ({_ext.load_error()})"
    if backend == "cuda" and not _ext.built_with_cuda():
        return "fastblocks._C was built without CUDA (CPU-only PyTorch, or FASTBLOCKS_SKIP_CUDA_BUILD=1)"
    key = "CPU" if backend == "cpu" else "CUDA"
    missing = [s for s in spec.compiled if not _ext.has_kernel(s, key)]
    if missing:
        return f"fastblocks._C has no {key} kernel for {', '.join(missing)} (rebuild the extension)"
    return None


def unavailable_reason(op: str, backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device_type`` tensors, or ``None`` if it can."""
    spec = _OPS[op]
    backend = _validate(backend)
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_reason(device_type) if spec.triton else f"no Triton kernel exists for {op}"
    return _compiled_reason(spec, backend, device_type)


def availability(op: str, device_type: str) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run ``op`` on ``device_type``, else the reason."""
    return {b: unavailable_reason(op, b, device_type) for b in BACKENDS}


def resolve(op: str, device: torch.device | str) -> str:
    """The backend that runs ``op`` for tensors on ``device`` now.

    Under torch.compile the answer is a constant of the traced graph (the backend is fixed at
    trace time); Dynamo never traces the availability checks themselves (they query the
    dispatcher, which it cannot trace).

    Raises:
        BackendUnavailableError: a forced backend cannot run here; the message says why.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not torch.compiler.is_compiling():
        # Eager: skip the compiler.disable wrapper, which costs more per call (tens of us) than
        # the cached choice itself.
        return _resolve_uncached(op, device_type)
    return _resolve_constant(op, device_type)


def _resolve_uncached(op: str, device_type: str) -> str:
    return _pick(op, device_type, _get_backend_uncached(), triton_interpreted())


@functools.lru_cache(maxsize=256)
def _pick(op: str, device_type: str, forced: str | None, _interpreted: bool) -> str:
    # Cached: availability is fixed once the extension is loaded, and the checks query the
    # dispatcher (tens of microseconds per call). Errors are not cached, so they repeat.
    spec = _OPS[op]
    if forced in ("cpu", "cuda") and not spec.compiled and device_type == forced:
        # Forcing the compiled backend means "the compiled kernels where they exist": an op
        # that has none (its work is PyTorch's own convolution) runs its reference path.
        return "reference"
    if forced is not None:
        reason = unavailable_reason(op, forced, device_type)
        if reason is not None:
            raise BackendUnavailableError(f"fastblocks backend {forced!r} cannot run {op} on {device_type}: {reason}")
        return forced
    order = spec.cuda_order if device_type == "cuda" else spec.cpu_order
    for backend in order:
        if unavailable_reason(op, backend, device_type) is None:
            return backend
    return "reference"


_resolve_eager = torch.compiler.disable(_resolve_uncached, recursive=True)


@torch.compiler.assume_constant_result
def _resolve_constant(op: str, device_type: str) -> str:
    return _resolve_eager(op, device_type)


def remember(ctx: object) -> None:
    """Record the forced backend in effect now on an autograd ``ctx`` (call in setup_context)."""
    ctx.fastblocks_backend = get_backend()


def backward_on_forward_backend(fn: Callable) -> Callable:
    """Decorate a backward ``fn(ctx, *grads)`` to run under the backend its forward was forced to.

    Without this, ``with use_backend("triton"): y = f(x)`` followed by ``y.backward()`` outside
    the block would run the backward on the default backend.
    """

    @functools.wraps(fn)
    def wrapper(ctx: object, *grads: object) -> object:
        if torch.compiler.is_compiling():
            # Traced with its forward, under the same forced backend (a constant of the graph);
            # Dynamo cannot trace the ContextVar that use_backend sets (a graph break per call).
            return fn(ctx, *grads)
        with use_backend(getattr(ctx, "fastblocks_backend", None)):
            return fn(ctx, *grads)

    return wrapper


# ----------------------------------------------------------------------------- one-call CPU kernels
@functools.cache
def _built(names: tuple[str, ...]) -> bool:
    return all(_ext.has_kernel(name, "CPU") for name in names)


def cpu_kernels_built(*names: str) -> bool:
    """Whether the extension has every CPU kernel in ``names`` (a stale build may not)."""
    return _built(names)


# Under torch.compile the answer is a constant of the graph (Dynamo cannot trace the dispatcher query).
_built_eager = torch.compiler.disable(_built, recursive=True)


@torch.compiler.assume_constant_result
def _built_constant(names: tuple[str, ...]) -> bool:
    return _built_eager(names)


def cpu_kernels(op: str, device: torch.device, *names: str, under_compile: bool = False) -> bool:
    """Whether ``op`` runs the CPU-only kernels ``names`` of ``fastblocks._C`` (one-call paths
    beyond the backend's kernel table, e.g. ``bn_fused_fwd``) for tensors on ``device`` now.

    True for a CPU device when ``op`` resolves to the ``cpu`` backend and the extension has every
    kernel in ``names`` (a stale build may not). Under torch.compile: False, unless
    ``under_compile`` (the kernels have fake kernels and the op wants them in the graph); then
    the answer is a constant of the graph.
    """
    if device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        return under_compile and resolve(op, device) == "cpu" and _built_constant(names)
    return resolve(op, device) == "cpu" and _built(names)


# Memory formats a fused network's body runs in, per device type, where that is not the input's.
# On the CPU a fused ResNet trains faster channels_last (oneDNN's NHWC convolutions; the format
# Inductor's layout optimization also picks for a compiled NCHW network). A fused DenseNet keeps
# its input's format: channels_last it trains about as fast as NCHW, but oneDNN's channels_last
# convolutions round differently from its NCHW ones, and with an NCHW input run channels_last
# DenseNet-BC-100's norm2.bias gradients came out over the accuracy rule's bound against the
# eager (NCHW) twin (tests/accuracy/test_models.py, densenet_bc_100_12 nchw, when this was tried).
# Compare the layouts with
# ``fastblocks bench --models resnet50,densenet121 --providers fused --modes train [--channels-last]``.
_BODY_CHANNELS_LAST: dict[str, frozenset[str]] = {"resnet": frozenset({"cpu"})}


def body_layout(family: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` (a fused ``family`` network's input, ``[N, C, H, W]``) in the memory format the
    network runs fastest in on x's device: channels_last for a fused ResNet on the CPU (a copy of
    an NCHW x, once per forward, before the stem: its convolution, run twice by the recomputing
    stem, is faster so too), else x unchanged. The logits do not depend on it; gradients and
    results agree up to the convolutions' rounding."""
    if x.dim() == 4 and x.device.type in _BODY_CHANNELS_LAST.get(family, ()):
        return x.contiguous(memory_format=torch.channels_last)
    return x
