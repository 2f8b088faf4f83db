"""Convolutions with BatchNorm-ReLU fused around them, against eager PyTorch (and compiled).

Two ops, on the layers of the networks that use them:

- ``bn_relu_conv`` (pre-activation, DenseNet-201 layers): fastblocks ``BNReLUConv2d`` (the BN-ReLU
  is the convolution's prologue, the activation is never stored) against torchvision's
  ``conv(relu_(bn(x)))``;
- ``conv_bn_relu`` (post-activation, ResNet-50 layers): fastblocks ``ConvBNReLU2d`` (PyTorch's
  convolution, then the fused BatchNorm-ReLU, which keeps only the conv output) against
  torchvision's ``relu_(bn(conv(x)))``.

GPU: batch 256 (ResNet-50) / 64 (DenseNet-201), bf16 autocast (fp32 parameters), channels_last.
CPU: batch 8, fp32, channels_last, two layers per op (well under a minute).
Modes ``fwd`` (forward with autograd recording) and ``full`` (forward + backward).

``extra_info`` holds TFLOP/s = 2 x MACs / time (the convolution's MACs; ``full`` counts three
convolutions' worth: forward, input gradient, weight gradient), the percentage of the measured
matmul rate, and the bytes autograd keeps for backward (parameters left out: every provider
keeps the same weights). Rows also go to ``benchmarks/results/<device-slug>/bench_bn_relu_conv.json``.

Run: ``pytest benchmarks/bench_bn_relu_conv.py --benchmark-only`` (``--bench-compile`` adds the
torch.compile providers on the CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fastblocks import _backend
from fastblocks.bench.memory import CUDA_PEAK, SAVED, cuda_peak_bytes, saved_bytes
from fastblocks.bench.ops import PROVIDERS, provider_available
from fastblocks.bench.timing import Timing, synchronize
from fastblocks.nn import ConvBNReLU2d
from fastblocks.nn.conv import BNReLUConv2d

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
MODES = ("fwd", "full")
# The registered op whose backend the fused provider runs on (the convolution of conv_bn_relu
# is PyTorch's own; its backend choice is the BatchNorm's).
_REGISTERED = {"bn_relu_conv": "bn_relu_conv2d", "conv_bn_relu": "batch_norm_act"}


@dataclass(frozen=True)
class ConvCase:
    """One fused convolution layer of a network.

    Attributes:
        op: ``"bn_relu_conv"`` (pre-activation) or ``"conv_bn_relu"`` (post-activation).
        net: the network the layer comes from.
        shape: ``(N, C_in, H, W)`` of the input.
        out_channels, kernel, stride: the convolution (padding ``kernel // 2``).
        dtype: of the activations (bf16: under autocast, parameters fp32).
        channels_last: NHWC memory layout.
    """

    op: str
    net: str
    shape: tuple[int, int, int, int]
    out_channels: int
    kernel: int
    stride: int = 1
    dtype: torch.dtype = torch.float32
    channels_last: bool = True

    @property
    def name(self) -> str:
        """The op and the convolution, e.g. ``conv_bn_relu-3x3s1-64``."""
        return f"{self.op}-{self.kernel}x{self.kernel}s{self.stride}-{self.out_channels}"

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "nchw"

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{self.net}-{self.name}-{shape}-{str(self.dtype).removeprefix('torch.')}-{self.layout}"

    def out_hw(self) -> tuple[int, int]:
        pad = self.kernel // 2
        _, _, h, w = self.shape
        return (h + 2 * pad - self.kernel) // self.stride + 1, (w + 2 * pad - self.kernel) // self.stride + 1

    def macs(self) -> int:
        """Multiply-accumulates of the convolution's forward."""
        n, c, _, _ = self.shape
        ho, wo = self.out_hw()
        return n * self.out_channels * ho * wo * c * self.kernel * self.kernel

    def flops(self, mode: str) -> int:
        """2 x MACs; ``full`` adds the input-gradient and weight-gradient convolutions (same MACs each)."""
        return 2 * self.macs() * (1 if mode == "fwd" else 3)


def _cases() -> list[ConvCase]:
    # (op, net, C_in, H, C_out, kernel, stride): torchvision's ResNet-50 (v1.5: stride on the
    # 3x3) and DenseNet-201 (growth 32, bottleneck 128; inputs grow by 32 per layer).
    layers = [
        ("conv_bn_relu", "resnet50", 256, 56, 64, 1, 1),  # layer1 conv1 (blocks 2-3)
        ("conv_bn_relu", "resnet50", 64, 56, 64, 3, 1),  # layer1 conv2
        ("conv_bn_relu", "resnet50", 128, 56, 128, 3, 2),  # layer2.0 conv2 (stride 2)
        ("conv_bn_relu", "resnet50", 128, 28, 128, 3, 1),  # layer2 conv2
        ("conv_bn_relu", "resnet50", 1024, 14, 256, 1, 1),  # layer3 conv1
        ("conv_bn_relu", "resnet50", 256, 14, 256, 3, 1),  # layer3 conv2
        ("conv_bn_relu", "resnet50", 2048, 7, 512, 1, 1),  # layer4 conv1
        ("bn_relu_conv", "densenet201", 224, 56, 128, 1, 1),  # block1 last layer conv1
        ("bn_relu_conv", "densenet201", 128, 56, 32, 3, 1),  # block1 conv2
        ("bn_relu_conv", "densenet201", 256, 56, 128, 1, 1),  # transition1
        ("bn_relu_conv", "densenet201", 256, 28, 128, 1, 1),  # block2 layer conv1
        ("bn_relu_conv", "densenet201", 128, 28, 32, 3, 1),  # block2 conv2
        ("bn_relu_conv", "densenet201", 1024, 14, 128, 1, 1),  # block3 layer conv1
        ("bn_relu_conv", "densenet201", 128, 14, 32, 3, 1),  # block3 conv2
        ("bn_relu_conv", "densenet201", 1760, 7, 128, 1, 1),  # block4 last layer conv1
    ]
    cpu = {(128, 28, 128, 3), (1024, 14, 256, 1), (256, 28, 128, 1), (128, 28, 32, 3)}
    out = []
    for op, net, c, h, co, k, s in layers:
        if CUDA:
            out.append(ConvCase(op, net, (256 if net == "resnet50" else 64, c, h, h), co, k, s, torch.bfloat16))
        elif (c, h, co, k) in cpu:
            out.append(ConvCase(op, net, (8, c, h, h), co, k, s, torch.float32))
    return out


CASES = _cases()


def _fused_backend(case: ConvCase) -> str:
    """The fastblocks backend the fused providers run here (never the Triton interpreter)."""
    backend = _backend.resolve(_REGISTERED[case.op], DEVICE)
    if backend == "triton" and not CUDA:
        raise RuntimeError("the fused provider would run the Triton interpreter on the CPU; it is never benchmarked")
    return backend


def _modules(case: ConvCase, provider: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Parameter]]:
    """``(f(x) -> y, parameters)``: the provider's layer with weights identical across providers."""
    c_in, c_out, k, s = case.shape[1], case.out_channels, case.kernel, case.stride
    torch.manual_seed(0)
    bn_features = c_in if case.op == "bn_relu_conv" else c_out
    conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
    bn = nn.BatchNorm2d(bn_features)
    with torch.no_grad():  # a non-trivial affine map
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)
    fused = provider.startswith("fused")
    if case.op == "bn_relu_conv":
        if fused:
            module = BNReLUConv2d(c_in, c_out, k, s, k // 2)
            module.norm.load_state_dict(bn.state_dict())
            module.conv.load_state_dict(conv.state_dict())
            f = module
        else:
            module = nn.ModuleList([bn, conv])

            def f(x: torch.Tensor) -> torch.Tensor:  # torchvision DenseNet's _DenseLayer
                return conv(torch.relu_(bn(x)))

    elif fused:
        module = ConvBNReLU2d.from_modules(conv, bn)
        f = module
    else:
        module = nn.ModuleList([conv, bn])

        def f(x: torch.Tensor) -> torch.Tensor:  # torchvision ResNet's conv -> bn -> relu(inplace)
            return torch.relu_(bn(conv(x)))

    module.to(DEVICE)
    if provider.endswith("compile"):
        f = torch.compile(f)
    return f, list(module.parameters())


@dataclass
class _Prepared:
    case: ConvCase
    provider: str
    forward: Callable[[], torch.Tensor]
    full: Callable[[], None]
    leaves: list[torch.Tensor]
    backend: str | None


def _prepare(case: ConvCase, provider: str) -> _Prepared:
    backend = _fused_backend(case) if provider.startswith("fused") else None
    if provider.endswith("compile"):
        torch._dynamo.reset()  # each case compiles the same functions again (dynamo's cache limit)
    f, params = _modules(case, provider)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = torch.randn(case.shape, generator=g, device=DEVICE).to(dtype=case.dtype, memory_format=fmt)
    x.requires_grad_()
    autocast = case.dtype != torch.float32

    def forward() -> torch.Tensor:
        ctx = torch.autocast(DEVICE.type, dtype=case.dtype) if autocast else contextlib.nullcontext()
        with ctx:
            return f(x)

    grad = torch.randn_like(forward().detach())
    leaves = [x, *params]

    def full() -> None:
        for t in leaves:
            t.grad = None
        forward().backward(grad)

    if provider.endswith("compile"):
        full()  # compiles the forward and backward graphs outside the timing
    return _Prepared(case, provider, forward, full, leaves, backend)


_LAST: dict[tuple[ConvCase, str], _Prepared] = {}


def _prepared(case: ConvCase, provider: str) -> _Prepared:
    """One prepared (case, provider) kept while its modes run (bounds memory: one at a time)."""
    key = (case, provider)
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = _prepare(case, provider)
    return _LAST[key]


def _row(case: ConvCase, provider: str, mode: str, timing: Timing, prep: _Prepared, env: dict, saved: int,
         peak: int | None) -> dict:  # fmt: skip
    """The results row (fields: :mod:`fastblocks.bench.results`); TFLOP/s instead of GB/s."""
    tflops = case.flops(mode) / (timing.median_ms * 1e-3) / 1e12
    mm = env.get("matmul_tflops")
    shape = "x".join(map(str, case.shape))
    dtype = str(case.dtype).removeprefix("torch.")
    return {
        "case": f"{case.name}/{mode}/{provider}/{shape}/{dtype}/{case.layout}",
        "kind": "op",
        "name": case.name,
        "net": case.net,
        "provider": provider,
        "mode": mode,
        "shape": list(case.shape),
        "dtype": dtype,
        "autocast": case.dtype != torch.float32,
        "layout": case.layout,
        "backend": prep.backend,
        "median_ms": timing.median_ms,
        "spread_ms": timing.iqr_ms,
        "spread_kind": "iqr",
        "samples_ms": timing.as_dict()["samples_ms"],
        "calls_per_sample": timing.calls_per_sample,
        "timer": timing.method,
        "nominal_bytes": None,
        "gbps": None,
        "pct_copy": None,
        "flops": case.flops(mode),
        "tflops": float(f"{tflops:.4g}"),
        "pct_matmul": round(100 * tflops / mm, 1) if mm else None,
        "images_per_s": None,
        "saved_bytes": saved,
        "peak_bytes": peak,
        "memory_kind": CUDA_PEAK if peak is not None else SAVED,
        "compile_s": None,
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bn_relu_conv(request, benchmark, bench_env, _bench_rows, case, provider, mode):
    reason = provider_available(provider, DEVICE, allow_cpu_compile=request.config.getoption("--bench-compile"))
    if reason is not None:
        pytest.skip(reason)
    prep = _prepared(case, provider)
    fn = prep.forward if mode == "fwd" else prep.full

    def call() -> None:
        fn()
        synchronize(DEVICE)  # time the work, not its launch

    for _ in range(3):  # warm-up (pytest-benchmark warms up only when asked)
        call()
    benchmark(call)
    params = prep.leaves[1:]
    _, saved = saved_bytes(prep.forward, exclude=params)
    peak = cuda_peak_bytes(fn, DEVICE) if CUDA else None
    if benchmark.stats is None:  # --benchmark-disable: nothing measured
        return
    st = benchmark.stats.stats
    timing = Timing(st.median * 1e3, st.iqr * 1e3, [s * 1e3 for s in st.data], benchmark.stats.iterations,
                    "pytest-benchmark")  # fmt: skip
    row = _row(case, provider, mode, timing, prep, bench_env, saved, peak)
    benchmark.extra_info.update(
        {k: row[k] for k in ("provider", "mode", "backend", "tflops", "pct_matmul", "saved_bytes", "peak_bytes")}
    )
    _bench_rows.setdefault("bench_bn_relu_conv", []).append(row)
