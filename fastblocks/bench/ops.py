"""Op-level benchmark cases, shared by ``benchmarks/bench_*.py`` and ``fastblocks bench --ops``.

Each case is one fused op at one shape, dtype and layout; each runs under several providers:

=============  ===========================================================================
eager          what torchvision does: ``nn.BatchNorm2d`` then in-place ReLU (``out += identity``
               in place before it), and ``torch.relu(x + y)`` (the op's reference)
compile        ``torch.compile`` of the eager function (minutes on a CPU: opt-in there)
fused          the fastblocks module/op with the default backend of the device (on the CPU the
               compiled ``cpu`` kernels, else the reference; never the Triton interpreter)
fused-compile  ``torch.compile`` of the fused function
=============  ===========================================================================

and in three modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (the
backward alone, of a graph kept with ``retain_graph``) and ``full`` (forward + backward).

GB/s counts the *nominal* bytes of each op: the traffic of a fused two-pass implementation (the
same number for every provider, so a GB/s ratio is a speed ratio), in x-sized tensors per
element:

============  ===============================================  =========================================
op            fwd                                              bwd
============  ===============================================  =========================================
add_relu      read x, r; write out (3) + 1-bit mask            read g; write dx (2) + mask
bn_relu       stats: read x; apply: read x, write y (3)        reduce: read g, x; apply: read g, x, write dx (5)
bn_add_relu   stats: read x; apply: read x, r, write y (4)     reduce: read g, x, r; apply: read g, x, r,
                                                               write dx, dr (8)
============  ===============================================  =========================================
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastblocks import _backend
from fastblocks.bench.memory import CUDA_PEAK, SAVED, cuda_peak_bytes, saved_bytes
from fastblocks.bench.timing import Timing, measure_interleaved, synchronize

OPS: tuple[str, ...] = ("add_relu", "bn_relu", "bn_add_relu")
PROVIDERS: tuple[str, ...] = ("eager", "compile", "fused", "fused-compile")
MODES: tuple[str, ...] = ("fwd", "bwd", "full")

# x-sized tensor passes per mode (module docstring); the 1-bit mask is added for add_relu.
_PASSES = {"add_relu": (3, 2), "bn_relu": (3, 5), "bn_add_relu": (4, 8)}
_REGISTERED = {"add_relu": "add_relu", "bn_relu": "batch_norm_act", "bn_add_relu": "batch_norm_act"}

# ResNet-50 shapes (conv2_x input, conv2_x output, conv5_x output) at batch 256 on GPUs; the CPU
# runs the same activations at batch 8.
_GPU_SHAPES = {
    "add_relu": [(256, 256, 56, 56)],
    "bn_relu": [(256, 64, 56, 56), (256, 256, 56, 56), (256, 2048, 7, 7)],
    "bn_add_relu": [(256, 64, 56, 56), (256, 256, 56, 56), (256, 2048, 7, 7)],
}
_CPU_SHAPES = {
    "add_relu": [(8, 64, 56, 56)],
    "bn_relu": [(8, 64, 56, 56), (8, 256, 56, 56), (8, 2048, 7, 7)],
    "bn_add_relu": [(8, 64, 56, 56), (8, 256, 56, 56), (8, 2048, 7, 7)],
}
_TINY_SHAPE = (2, 8, 6, 6)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class OpCase:
    """One op at one shape, dtype and layout.

    Attributes:
        name: one of :data:`OPS`.
        shape: ``(N, C, H, W)`` of x (and of the residual).
        dtype: of the activations (BatchNorm parameters stay fp32, as under autocast).
        channels_last: NHWC memory layout.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool = False

    @property
    def layout(self) -> str:
        """``"channels_last"`` or ``"nchw"``."""
        return "channels_last" if self.channels_last else "nchw"

    @property
    def id(self) -> str:
        """Short id, e.g. ``bn_relu-8x64x56x56-float32-nchw``."""
        return f"{self.name}-{'x'.join(map(str, self.shape))}-{dtype_name(self.dtype)}-{self.layout}"

    def numel(self) -> int:
        """Elements of x."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def nbytes(self, mode: str) -> int:
        """Nominal bytes moved by one call in ``mode`` (module docstring)."""
        fwd, bwd = _PASSES[self.name]
        n, es = self.numel(), torch.empty((), dtype=self.dtype).element_size()
        mask = (n + 7) // 8 if self.name == "add_relu" else 0
        per = {"fwd": fwd * n * es + mask, "bwd": bwd * n * es + mask}
        per["full"] = per["fwd"] + per["bwd"]
        return per[mode]


def default_cases(
    device: torch.device | str,
    *,
    ops: tuple[str, ...] | list[str] | None = None,
    quick: bool = False,
    tiny: bool = False,
    dtype: torch.dtype | None = None,
    layouts: tuple[bool, ...] = (False, True),
) -> list[OpCase]:
    """The op cases for ``device``: large bf16 ResNet-50 shapes on GPUs, batch 8 fp32 on the CPU.

    Args:
        ops: restrict to these op names.
        quick: only the first shape of each op.
        tiny: one tiny shape (tests).
        dtype: override the dtype (default bf16 on CUDA, fp32 on the CPU).
        layouts: ``channels_last`` values to run (default NCHW and channels_last).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    table = _GPU_SHAPES if cuda else _CPU_SHAPES
    cases = []
    for name in ops or OPS:
        if name not in OPS:
            raise ValueError(f"unknown op {name!r}: choose from {', '.join(OPS)}")
        shapes = [_TINY_SHAPE] if tiny else table[name][:1] if quick else table[name]
        for shape in shapes:
            for cl in layouts:
                cases.append(OpCase(name, tuple(shape), dtype, cl))
    return cases


def suite_modes(device: torch.device | str) -> tuple[str, ...]:
    """Modes the benchmark suites run: fwd and full everywhere, the backward alone too on GPUs."""
    return MODES if torch.device(device).type == "cuda" else ("fwd", "full")


def fused_backend(case: OpCase, device: torch.device | str) -> str:
    """The fastblocks backend the fused provider uses for ``case`` on ``device``.

    Raises:
        RuntimeError: it would be the Triton interpreter (a correctness tool, never timed).
    """
    device = torch.device(device)
    backend = _backend.resolve(_REGISTERED[case.name], device)
    if backend == "triton" and device.type == "cpu":
        raise RuntimeError("the fused provider would run the Triton interpreter on the CPU; it is never benchmarked")
    return backend


def provider_available(provider: str, device: torch.device | str, *, allow_cpu_compile: bool = False) -> str | None:
    """Why ``provider`` is not run on ``device`` (``None`` when it is)."""
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}"
    if "compile" in provider and torch.device(device).type == "cpu" and not allow_cpu_compile:
        return "torch.compile takes minutes on the CPU; ask for it explicitly"
    return None


def _functions(case: OpCase, provider: str, device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    """``(f(x, r) -> out, parameters)`` of the provider (``r`` ignored without a residual)."""
    from fastblocks.nn import BatchNormReLU2d, BNAddReLU
    from fastblocks.ops.add_relu import add_relu, add_relu_reference

    fused = provider.startswith("fused")
    if case.name == "add_relu":
        f = add_relu if fused else add_relu_reference
        params: list[torch.Tensor] = []
    else:
        c = case.shape[1]
        ref = nn.BatchNorm2d(c).to(device)
        with torch.no_grad():  # non-trivial affine parameters, identical for every provider
            g = torch.Generator().manual_seed(1)
            ref.weight.copy_(torch.rand(c, generator=g) + 0.5)
            ref.bias.copy_(torch.randn(c, generator=g) * 0.1)
        if fused:
            bn = (BNAddReLU if case.name == "bn_add_relu" else BatchNormReLU2d)(c).to(device)
            bn.load_state_dict(ref.state_dict())
            f = bn if case.name == "bn_add_relu" else (lambda x, r: bn(x))
        elif case.name == "bn_add_relu":
            bn = ref

            def f(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # torchvision Bottleneck's tail
                out = bn(x)
                out += r
                return torch.relu_(out)

        else:
            bn = ref

            def f(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
                return torch.relu_(bn(x))

        params = list(bn.parameters())
    if provider.endswith("compile"):
        f = torch.compile(f)
    return f, params


@dataclass
class Prepared:
    """Inputs, modules and the provider's function for one (case, provider), reused by every mode.

    A compile provider compiles once here, on its first forward + backward (``compile_s``).
    """

    case: OpCase
    provider: str
    device: torch.device
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x: torch.Tensor
    r: torch.Tensor
    grad: torch.Tensor
    leaves: list[torch.Tensor]
    backend: str | None
    compile_s: float | None = None

    def clear(self) -> None:
        """Drop the gradients of the inputs and parameters (each timed call starts clean)."""
        for t in self.leaves:
            t.grad = None

    def forward(self) -> torch.Tensor:
        """One forward (autograd recording)."""
        return self.f(self.x, self.r)

    def full(self) -> None:
        """One forward + backward."""
        self.clear()
        self.forward().backward(self.grad)


def prepare(case: OpCase, provider: str, device: torch.device | str, *, seed: int = 0) -> Prepared:
    """Build inputs and modules of ``case`` for ``provider`` on ``device`` (and compile, if asked)."""
    device = torch.device(device)
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    backend = fused_backend(case, device) if provider.startswith("fused") else None
    g = torch.Generator(device=device).manual_seed(seed)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format

    def make() -> torch.Tensor:
        t = torch.randn(case.shape, generator=g, device=device, dtype=torch.float32)
        return t.to(dtype=case.dtype, memory_format=fmt)

    x, r, grad = make().requires_grad_(), make().requires_grad_(), make()
    if provider.endswith("compile"):
        # Every case compiles the same Python functions again: without a reset, dynamo's cache
        # limit (8 per code object) would silently run later cases eagerly.
        torch._dynamo.reset()
    f, params = _functions(case, provider, device)
    prep = Prepared(case, provider, device, f, x, r, grad, [x, r, *params], backend)
    if provider.endswith("compile"):
        t0 = time.perf_counter()
        prep.full()  # compiles the forward and the backward graphs
        synchronize(device)
        prep.compile_s = time.perf_counter() - t0
    return prep


def timed_call(prep: Prepared, mode: str) -> Callable[[], object]:
    """The callable that does one ``mode`` call of ``prep`` (``bwd``: a graph kept for it)."""
    if mode == "fwd":
        return prep.forward
    if mode == "full":
        return prep.full
    if mode != "bwd":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = prep.forward()

    def backward() -> None:
        prep.clear()
        out.backward(prep.grad, retain_graph=True)

    return backward


def row(
    case: OpCase,
    provider: str,
    mode: str,
    timing: Timing,
    *,
    backend: str | None,
    yardsticks: dict | None,
    saved: int | None,
    peak: int | None,
    compile_s: float | None = None,
) -> dict:
    """The results row of one measurement (fields: :mod:`fastblocks.bench.results`)."""
    gbps = case.nbytes(mode) / (timing.median_ms * 1e-3) / 1e9
    copy = (yardsticks or {}).get("copy_gbps")
    return {
        "case": f"{case.name}/{mode}/{provider}/{'x'.join(map(str, case.shape))}/{dtype_name(case.dtype)}/{case.layout}",
        "kind": "op",
        "name": case.name,
        "provider": provider,
        "mode": mode,
        "shape": list(case.shape),
        "dtype": dtype_name(case.dtype),
        "layout": case.layout,
        "backend": backend,
        "median_ms": timing.median_ms,
        "spread_ms": timing.iqr_ms,
        "spread_kind": "iqr",
        "samples_ms": timing.as_dict()["samples_ms"],
        "calls_per_sample": timing.calls_per_sample,
        "timer": timing.method,
        "nominal_bytes": case.nbytes(mode),
        "gbps": float(f"{gbps:.4g}"),
        "pct_copy": round(100 * gbps / copy, 1) if copy else None,
        "tflops": None,
        "pct_matmul": None,
        "images_per_s": None,
        "saved_bytes": saved,
        "peak_bytes": peak,
        "memory_kind": CUDA_PEAK if peak is not None else SAVED,
        "compile_s": None if compile_s is None else round(compile_s, 3),
    }


def run(
    case: OpCase | Prepared,
    provider: str,
    mode: str,
    device: torch.device | str,
    *,
    yardsticks: dict | None = None,
    timing: dict | None = None,
) -> dict:
    """Time one (case, provider, mode), measure its memory, return its row.

    Args:
        case: an :class:`OpCase`, or a :class:`Prepared` one (reused across modes).
        timing: keyword arguments of :func:`fastblocks.bench.timing.measure_interleaved`.
    """
    prep = case if isinstance(case, Prepared) else prepare(case, provider, device)
    return run_interleaved([prep], mode, device, yardsticks=yardsticks, timing=timing)[0]


def run_interleaved(
    preps: list[Prepared],
    mode: str,
    device: torch.device | str,
    *,
    yardsticks: dict | None = None,
    timing: dict | None = None,
) -> list[dict]:
    """Time the providers of one case in ``mode`` together, samples in alternation
    (:func:`fastblocks.bench.timing.measure_interleaved`), and return their rows in order.

    Args:
        preps: :class:`Prepared` providers of the same case.
        timing: keyword arguments of :func:`fastblocks.bench.timing.measure_interleaved`.
    """
    device = torch.device(device)
    if len({p.case for p in preps}) > 1:
        raise ValueError("run_interleaved compares the providers of a single case")
    fns = {p.provider: timed_call(p, mode) for p in preps}
    kw = {"flush_l2": device.type == "cuda", **(timing or {})}
    timings = measure_interleaved(fns, device, **kw)
    rows = []
    for p in preps:
        fn = fns[p.provider]
        _, saved = saved_bytes(p.forward)
        peak = cuda_peak_bytes(fn, device) if device.type == "cuda" else None
        rows.append(
            row(p.case, p.provider, mode, timings[p.provider], backend=p.backend, yardsticks=yardsticks,
                saved=saved, peak=peak, compile_s=p.compile_s)
        )  # fmt: skip
    return rows
