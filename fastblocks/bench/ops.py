"""Op-level benchmark cases, shared by ``benchmarks/bench_*.py`` and ``fastblocks bench --ops``.

Each case is one fused op at one shape, dtype and layout. The ops, their shapes, their nominal
bytes and the functions timed are what each op module declares
(:class:`fastblocks.ops._declarations.BenchDeclaration`): a new op adds its own cases. Each case
runs under several providers:

=============  ===========================================================================
eager          what torchvision does, e.g. ``nn.BatchNorm2d``'s ``F.batch_norm`` then in-place
               ReLU (``out += identity`` in place before it), ``torch.relu(x + y)``
compile        ``torch.compile`` of the eager function (minutes on a CPU: opt-in there)
fused          the fastblocks op with the default backend of the device (on the CPU the
               compiled ``cpu`` kernels, else the reference; never the Triton interpreter)
fused-compile  ``torch.compile`` of the fused function
=============  ===========================================================================

and in three modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (the
backward alone, of a graph kept with ``retain_graph``) and ``full`` (forward + backward).

GB/s counts the *nominal* bytes of each op: the traffic of a fused two-pass implementation (the
same number for every provider, so a GB/s ratio is a speed ratio), in x-sized tensors per element
as the op declares them (``passes``), e.g.:

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

from fastblocks import _backend
from fastblocks.bench.memory import CUDA_PEAK, SAVED, cuda_peak_bytes, saved_bytes
from fastblocks.bench.timing import Timing, measure_interleaved, synchronize
from fastblocks.ops._declarations import BenchDeclaration, declared

PROVIDERS: tuple[str, ...] = ("eager", "compile", "fused", "fused-compile")
MODES: tuple[str, ...] = ("fwd", "bwd", "full")


def _declared() -> dict[str, BenchDeclaration]:
    """The ops that declare a benchmark (:mod:`fastblocks.ops._declarations`), by name."""
    return {name: d.bench for name, d in declared().items() if d.bench is not None}


#: The benchmarked ops: every op module's declaration, e.g. ``("add_relu", "bn_relu", "bn_add_relu")``.
OPS: tuple[str, ...] = tuple(_declared())
_TINY_SHAPE = (2, 8, 6, 6)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class OpCase:
    """One op at one shape, dtype and layout.

    Attributes:
        name: a declared op (:data:`OPS`).
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
        decl = _declared()[self.name]
        fwd, bwd = decl.passes
        n, es = self.numel(), torch.empty((), dtype=self.dtype).element_size()
        mask = (n + 7) // 8 if decl.mask_bits else 0
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
    table = _declared()
    cases = []
    for name in ops or table:
        if name not in table:
            raise ValueError(f"unknown op {name!r}: choose from {', '.join(table)}")
        all_shapes = table[name].gpu_shapes if cuda else table[name].cpu_shapes
        shapes = [_TINY_SHAPE] if tiny else all_shapes[:1] if quick else all_shapes
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
    backend = _backend.resolve(_declared()[case.name].registered, device)
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
    """``(f(x, r) -> out, parameters)`` of the provider (``r`` ignored by an op of one input)."""
    f, params = _declared()[case.name].functions(case.shape[1], device, provider.startswith("fused"))
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
