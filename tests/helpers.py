"""Helpers shared by the tests (the environment is prepared by tests/conftest.py).

CUDA cases. A test runs on CUDA by taking the device as a parameter: ``devices()`` (or
``device_backends(...)`` where it also forces a backend) lists ``"cuda"`` only where a GPU is
present, so a CPU machine does not even collect the CUDA cases. tests/conftest.py marks every
collected item that runs on CUDA with ``gpu`` (``pytest -m gpu`` runs exactly those on a GPU
machine) and, for those items only, turns TF32 off (see ``_exact_fp32_on_cuda`` there).

``FASTBLOCKS_TEST_FAKE_CUDA=1`` is a collection-only switch for CPU machines: ``devices()`` then
lists ``"cuda"`` too, so ``pytest --collect-only -m gpu`` shows what a GPU machine would run;
conftest.py adds a skip to every such item, so running them only skips. Never set it in CI or
on a GPU machine (it has no effect where CUDA is present).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastblocks import _backend, _ext

HAS_CUDA = torch.cuda.is_available()
REQUIRED = {b.strip() for b in os.environ.get("FASTBLOCKS_REQUIRE_BACKENDS", "").split(",") if b.strip()}

FAKE_CUDA_ENV = "FASTBLOCKS_TEST_FAKE_CUDA"
# Collection only (see the module docstring): list the CUDA cases on a machine without CUDA.
FAKE_CUDA = not HAS_CUDA and os.environ.get(FAKE_CUDA_ENV, "") == "1"

# The backends that can run on CUDA tensors (the ``cpu`` backend runs CPU tensors only).
CUDA_BACKENDS = ("reference", "triton", "cuda")


def devices() -> list[str]:
    """Devices the suite runs on here: ``["cpu", "cuda"]`` with a GPU, else ``["cpu"]``."""
    return ["cpu", "cuda"] if HAS_CUDA or FAKE_CUDA else ["cpu"]


def device_backends(cpu_backends: Sequence[str], cuda_backends: Sequence[str] = CUDA_BACKENDS) -> list:
    """Parameters for ``@pytest.mark.parametrize("device,backend", ...)``: each of
    ``cpu_backends`` on the CPU and, where ``devices()`` has CUDA, each of ``cuda_backends`` on it.

    The CPU cases (and their ids but for the device prefix) are what a ``backend`` parameter gave
    before; on CUDA only the backends that can run there are tried (no always-skipped
    ``cuda``-device / ``cpu``-backend items)."""
    runs = [("cpu", b) for b in cpu_backends]
    if "cuda" in devices():
        runs += [("cuda", b) for b in cuda_backends]
    return [pytest.param(d, b, id=f"{d}-{b}") for d, b in runs]


_CUDA_NAME = re.compile(r"cuda(:\d+)?")


def is_cuda_device(name: str, value: object) -> bool:
    """Whether the parameter ``name=value`` of a collected item puts the test on a CUDA device:
    a ``torch.device`` of type cuda, or the string ``"cuda"``/``"cuda:N"`` in any parameter but a
    backend's (``backend="cuda"`` names the compiled backend; on CPU tensors it skips)."""
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and "backend" not in name and _CUDA_NAME.fullmatch(value) is not None


def runs_on_cuda(item: pytest.Item) -> bool:
    """Whether a collected test item runs on CUDA: a CUDA device among its parameters
    (:func:`is_cuda_device`)."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(is_cuda_device(k, v) for k, v in callspec.params.items())


def cuda_backend_on_cpu(item: pytest.Item) -> bool:
    """Whether a collected item asks for the ``cuda`` backend (a ``backend`` parameter) without
    running on CUDA: the ``cuda`` backend takes CUDA tensors only, so such an item can only skip."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("backend") == "cuda" and not runs_on_cuda(item)


@contextlib.contextmanager
def deterministic_cudnn(device: str) -> Iterator[None]:
    """On CUDA, cuDNN restricted to deterministic algorithms (some of its backward-data and
    backward-filter algorithms accumulate with atomics): for tests that demand identical bits
    from two runs of the same convolution. A no-op on the CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark  # only these (cudnn.flags() would reset TF32 and more)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def rng_state(device: str) -> torch.Tensor:
    """The default generator's state on ``device`` (CPU or the current CUDA device)."""
    return torch.cuda.get_rng_state() if torch.device(device).type == "cuda" else torch.get_rng_state()


class OnDevice(torch.nn.Module):
    """``model`` on ``device`` behind a CPU interface: inputs are moved to ``device``, outputs
    back to the CPU (autograd follows both copies). For helpers that build their batches and
    targets on the CPU (tests/models/resnet_twins.py). ``fc`` is the wrapped model's, as those
    helpers read ``model.fc.out_features``; parameter and buffer names gain a ``model.`` prefix,
    the same for both twins."""

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        super().__init__()
        self.model = model.to(device)
        self.device = torch.device(device)

    @property
    def fc(self) -> torch.nn.Module:
        return self.model.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device)).cpu()


def to_device(models: Sequence[torch.nn.Module], device: str) -> list[torch.nn.Module]:
    """The models unchanged on the CPU; wrapped in :class:`OnDevice` elsewhere."""
    return list(models) if torch.device(device).type == "cpu" else [OnDevice(m, device) for m in models]


def skip_unless_available(op: str, backend: str, device: str) -> None:
    """Skip (or fail, when CI requires the backend) if ``backend`` cannot run ``op`` here."""
    reason = _backend.unavailable_reason(op, backend, device)
    if reason is None:
        return
    if backend in REQUIRED and device == "cpu":
        pytest.fail(f"backend {backend} is required (FASTBLOCKS_REQUIRE_BACKENDS) but unavailable: {reason}")
    pytest.skip(f"{backend} on {device}: {reason}")


def require_compiled_kernels(*schemas: str, dispatch_key: str = "CPU") -> None:
    """At module level: skip the module unless ``fastblocks._C`` has a ``dispatch_key`` kernel for every
    schema, or fail when CI requires that backend (``FASTBLOCKS_REQUIRE_BACKENDS``)."""
    missing = [s for s in schemas if not _ext.has_kernel(s, dispatch_key)]
    if not missing:
        return
    why = f"fastblocks._C has no {dispatch_key} kernel for {', '.join(missing)}"
    if not _ext.loaded():
        why += f" (the extension did not load: {_ext.load_error()})"
    backend = dispatch_key.lower()
    if backend in REQUIRED:
        pytest.fail(f"backend {backend} is required (FASTBLOCKS_REQUIRE_BACKENDS) but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def skip_bf16_in_interpreter(backend: str, dtype: torch.dtype, device: str) -> None:
    """The Triton interpreter computes bf16 arithmetic wrongly: bf16 Triton runs need a GPU."""
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("Triton interpreter computes bf16 wrongly; bf16 Triton is tested on GPU")


BACKENDS_UNDER_TEST = list(_backend.BACKENDS)


class RecordOps(TorchDispatchMode):
    """Records the names of the ops dispatched while active. Being a dispatch mode, it also turns
    off the ops' eager fast paths (``fastblocks.ops._common.eager_path``): the registered op runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))
