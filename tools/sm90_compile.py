"""Compile every Triton kernel variant of fastblocks for the H200 (sm_90), ahead of time, without a GPU.

Why. The Triton kernels are tested on CPUs in the interpreter (``TRITON_INTERPRET=1``), which
never compiles them: a kernel that the interpreter runs can still fail to compile for a GPU
(``tl.dot`` with a dimension below 16, too much shared memory) or compile to code that spills
registers. This tool compiles each variant the project's launchers produce with the Triton of
the GPU machine (3.6.0) for its GPU (an H200: ``GPUTarget("cuda", 90, 32)``) and reports the
resources ptxas gave it.

Method.

1. Capture. A stand-in Triton driver (:class:`StandInDriver`: current target sm_90, device 0,
   stream 0) is made active, and ``JITFunction._do_compile`` is replaced by a recorder that keeps
   what the JIT would compile (the kernel, its signature, the constexprs, the specialization
   attributes such as divisibility by 16, the compile options) and returns ``None``, so that
   ``kernel[grid](...)`` returns without compiling or launching anything. The launchers in
   ``fastblocks/ops/*.py`` are then called directly (not through the backend choice, which
   on a CPU allows Triton only in the interpreter) with CPU tensors of real layer shapes, in
   every dtype and layout they accept and with each flag (residual, ReLU, statistics epilogue,
   tf32 on or off). ``--scope cover`` (the default: 612 variants, about 4 minutes of CPU time
   on the 2-core VM: ``make sm90-compile`` prints it) runs the full grid of dtype x layout x kernel size x stride x pass x flag
   on four ResNet-50 layers (the largest blocks) and one layer for each other tile choice the
   launchers make for the models; ``--scope all`` runs every layer of ResNet-50/18,
   DenseNet-201 and the CIFAR ResNets with every setting, so every specialization (divisibility
   by 16 of sizes and strides) those models produce (800 variants, about 10 minutes of CPU). The batch is 16: any
   training batch that is a multiple of 16 gives the same specializations. A channels_last
   case uses channels_last weights, as ``model.to(memory_format=torch.channels_last)`` makes them.
2. De-duplicate. Launcher calls that lead to the same compilation (same kernel, signature,
   constexprs, specialization and options) are one variant; the table counts the calls.
3. Compile. Each variant is compiled with ``triton.compile(ASTSource(...), target=sm_90)`` in
   a pool of processes (forked after the capture) into a fresh temporary Triton cache, so the
   times are real compile times (``--cache-dir`` keeps one instead). The ptxas bundled with the
   Triton wheel produces the cubin; its log gives the spill stores and loads, and the bundled
   ``cuobjdump -res-usage`` on the cubin gives registers, stack and local memory. A variant that
   needs more shared memory than an H200 block may use (232,448 bytes) counts as an error: it
   would fail to launch.
4. Report. A table (kernel, variant, num_warps, registers, spill bytes, stack and local bytes,
   shared memory, compile seconds) on stdout and in ``build/sm90/kernels.md`` (``kernels.json``
   holds the same rows), a spill summary, and the errors. Exit status 1 on any error, and with
   ``--max-spill BYTES`` (``make sm90-compile``: 8) on a variant that spills more.

Spills. The launchers' tiles (``_bn_relu_conv_triton._fwd_tiles``, ``_wgrad_tiles``,
``_bn_triton._blocks``) were chosen with this tool so that no convolution variant spills under
register pressure: before, 33 variants spilled, up to 2.8 KB per thread (fp32 3x3 forward on
4 warps) and 12 KB (fp32 wgrad without tf32), and compiling them took 5 times as long. What
is left, on 2026-12-06 with Triton 3.6.0, is 4 to 8 bytes of stack in a few variants that use
40 to 80 of their 255 registers, which is not register pressure but a stack slot ptxas chose:
``_add_relu_bwd_kernel`` in fp16/bf16 (the mask byte broadcast to the gradient's layout; a
variant that loads it in that layout instead spills nothing but takes 4 KB of shared memory
per block), ``_bn_apply_kernel`` in fp64 with a residual on a dense x (fp64 is the gradcheck
dtype, not a training one), and one fp32 3x3 forward without tf32 on a 32-channel CIFAR layer.

Run with ``make sm90-compile``, which installs triton==3.6.0 into ``build/sm90/triton36`` (once)
and runs ``PYTHONPATH=build/sm90/triton36 .venv/bin/python tools/sm90_compile.py``: ``import triton``
then finds 3.6.0 and ``import torch`` the venv's. Any other Triton version is refused (exit 2).
``TRITON_INTERPRET`` is removed from the environment before Triton is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRITON_VERSION = "3.6.0"
TARGET = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp_size) of an H100/H200
H200_MAX_SHARED = 232_448  # bytes of shared memory one block may use on sm_90 (opt-in maximum)
BATCH = 16  # any multiple of 16 gives the same divisibility specializations


# ----------------------------------------------------------------------------- variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """One compilation, as the JIT would key it (equal variants are one compilation).

    Attributes:
        kernel: ``module.function`` of the ``@triton.jit`` kernel.
        dtype: element type of the kernel's first pointer argument (the activation's dtype).
        constexprs: the kernel's declared ``tl.constexpr`` arguments, ``(name, value)``.
        ones: integer arguments equal to 1 (Triton makes them constants).
        not16: integer and pointer arguments without the divisibility-by-16 attribute.
        signature: ``(name, type)`` of every argument (``constexpr`` for constants).
        options: the compile options, ``(name, repr(value))``, sorted.
        num_warps: warps per program.
    """

    kernel: str
    dtype: str
    constexprs: tuple[tuple[str, str], ...]
    ones: tuple[str, ...] = ()
    not16: tuple[str, ...] = ()
    signature: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, str], ...] = ()
    num_warps: int = 4

    def label(self) -> str:
        """The variant column: dtype, constexprs and the specialization, e.g.
        ``fp16; RELU=True BLOCK_M=64; =1: s_c; !16: HW``."""
        parts = [self.dtype, " ".join(f"{k}={v}" for k, v in self.constexprs)]
        if self.ones:
            parts.append("=1: " + ",".join(self.ones))
        if self.not16:
            parts.append("!16: " + ",".join(self.not16))
        return "; ".join(p for p in parts if p)


@dataclasses.dataclass
class Job:
    """A distinct variant, the launcher calls ("cases") that produce it, and what compiles it."""

    variant: Variant
    cases: list[str]
    payload: Any = None  # (JITFunction, signature, constexprs, attrs, options dict) when real


def dedupe(captured: Iterable[tuple[Variant, str, Any]]) -> list[Job]:
    """Merge captured ``(variant, case, payload)`` triples into one job per distinct variant, in
    first-seen order; each job lists its cases once each, in order."""
    jobs: dict[Variant, Job] = {}
    for variant, case, payload in captured:
        job = jobs.get(variant)
        if job is None:
            jobs[variant] = Job(variant, [case], payload)
        elif case not in job.cases:
            job.cases.append(case)
    return list(jobs.values())


def _value_repr(value: object) -> str:
    if isinstance(value, str):
        return value
    name = getattr(value, "name", None)  # a tl.dtype: fp32, fp64, ...
    return name if isinstance(name, str) else repr(value)


def make_variant(
    kernel: str,
    arg_names: Sequence[str],
    declared: Sequence[str],
    signature: dict[str, str],
    constexprs: dict[tuple[int, ...], object],
    attrs: dict[tuple[int, ...], object],
    options: dict[str, object],
) -> Variant:
    """The :class:`Variant` of what ``JITFunction._do_compile`` receives (argument paths are tuples
    of indices into ``arg_names``; ``attrs`` holds ``[["tt.divisibility", 16]]`` per argument)."""
    const = {arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    div16 = {arg_names[path[0]] for path, value in attrs.items() if len(path) == 1 and "tt.divisibility" in repr(value)}
    ones = tuple(n for n in arg_names if n not in declared and n in const and const[n] == 1)
    typed = [(n, t) for n, t in signature.items() if t != "constexpr"]
    not16 = tuple(n for n, t in typed if (t.startswith("*") or t[0] in "iu") and n not in div16)
    pointers = [t for _, t in typed if t.startswith("*")]
    return Variant(
        kernel=kernel,
        dtype=pointers[0][1:] if pointers else "-",
        constexprs=tuple((n, _value_repr(const[n])) for n in declared if n in const),
        ones=ones,
        not16=not16,
        signature=tuple((n, str(t)) for n, t in signature.items()),
        options=tuple(sorted((k, repr(v)) for k, v in options.items())),
        num_warps=int(options.get("num_warps", 4)),  # type: ignore[call-overload]
    )


# ----------------------------------------------------------------------------- resources
@dataclasses.dataclass
class Resources:
    """What ptxas gave one kernel (bytes per thread, except ``shared_static`` per block)."""

    registers: int = 0
    stack: int = 0
    local: int = 0
    shared_static: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


_RES_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_RES_FIELDS = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_res_usage(text: str) -> dict[str, Resources]:
    """``cuobjdump -res-usage`` output -> resources by function name."""
    out: dict[str, Resources] = {}
    current: str | None = None
    for line in text.splitlines():
        m = _RES_FUNCTION.match(line)
        if m:
            current = m.group(1)
            continue
        fields = dict(_RES_FIELDS.findall(line))
        if current is not None and "REG" in fields:
            out[current] = Resources(
                registers=int(fields["REG"]),
                stack=int(fields.get("STACK", 0)),
                local=int(fields.get("LOCAL", 0)),
                shared_static=int(fields.get("SHARED", 0)),
            )
            current = None
    return out


_PTXAS_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([A-Za-z_$][\w$]*)'?")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(text: str) -> dict[str, Resources]:
    """``ptxas -v`` output -> stack, spill stores/loads and registers by function name."""
    out: dict[str, Resources] = {}
    current: str | None = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, Resources())
            continue
        if current is None:
            continue
        if m := _PTXAS_SPILL.search(line):
            res = out[current]
            res.stack, res.spill_stores, res.spill_loads = (int(g) for g in m.groups())
        elif m := _PTXAS_REGS.search(line):
            out[current].registers = int(m.group(1))
    return out


# ----------------------------------------------------------------------------- results and report
@dataclasses.dataclass
class Result:
    """The outcome of compiling one job."""

    kernel: str
    variant: str
    cases: list[str]
    ok: bool
    error: str = ""
    seconds: float = 0.0  # wall time of triton.compile
    cpu_seconds: float = 0.0  # CPU time of triton.compile, ptxas included (what an idle core would take)
    num_warps: int = 4
    num_stages: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    local: int = 0
    stack: int = 0
    shared: int = 0  # dynamic shared memory Triton allocates per block
    shared_static: int = 0  # static shared memory in the cubin (sm_90 reserves 1 KiB per block)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.local > 0


def _short(kernel: str) -> str:
    return kernel.rsplit(".", 1)[-1]


def format_table(results: Sequence[Result]) -> str:
    """The report table (GitHub markdown), one row per variant, sorted by kernel and variant."""
    head = (
        "| # | kernel | variant (dtype; constexprs; =1 / !16 specialization) | warps | regs "
        "| spill st/ld B | stack/local B | smem B | compile s | cpu s | calls |"
    )
    rows = [head, "|" + "---|" * 11]
    for i, r in enumerate(sorted(results, key=lambda r: (r.kernel, r.variant)), 1):
        if r.ok:
            cells = [str(r.registers), f"{r.spill_stores}/{r.spill_loads}", f"{r.stack}/{r.local}", str(r.shared)]
        else:
            cells = ["ERROR", "-", "-", "-"]
        row = [str(i), _short(r.kernel), r.variant.replace("|", "/"), str(r.num_warps), *cells]
        row += [f"{r.seconds:.2f}", f"{r.cpu_seconds:.2f}", str(len(r.cases))]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def spill_summary(results: Sequence[Result]) -> str:
    """One line per variant that spills (ptxas spill bytes or local memory), or a line saying none does."""
    spilled = sorted((r for r in results if r.ok and r.spills), key=lambda r: (r.kernel, -r.spill_stores, r.variant))
    if not spilled:
        return "no variant spills registers"
    lines = [f"{len(spilled)} variant(s) spill registers (spill stores/loads, stack, local memory, bytes per thread):"]
    for r in spilled:
        lines.append(
            f"  {_short(r.kernel)} [{r.variant}]: {r.spill_stores}/{r.spill_loads} B, stack {r.stack} B, "
            f"local {r.local} B, {r.registers} regs; e.g. {r.cases[0]}"
        )
    return "\n".join(lines)


def summary(results: Sequence[Result], wall: float, calls: int) -> str:
    """Totals: variants, launcher calls, errors, register range, compile time."""
    ok = [r for r in results if r.ok]
    regs = f"{min(r.registers for r in ok)}-{max(r.registers for r in ok)}" if ok else "-"
    smem = f"{min(r.shared for r in ok)}-{max(r.shared for r in ok)}" if ok else "-"
    cpu = sum(r.cpu_seconds for r in results)
    return (
        f"{len(results)} variants from {calls} launcher calls: {len(ok)} compiled, {len(results) - len(ok)} errors; "
        f"registers {regs} per thread; shared memory {smem} B per block; compile {wall:.1f} s wall, "
        f"{sum(r.seconds for r in results):.1f} s summed over variants, {cpu:.1f} s of CPU time (ptxas included)"
    )


def over_spill(results: Sequence[Result], limit: int | None) -> list[Result]:
    """The compiled variants that spill more than ``limit`` bytes per thread (spill stores or local
    memory); none when ``limit`` is None."""
    if limit is None:
        return []
    return [r for r in results if r.ok and max(r.spill_stores, r.local) > limit]


def error_report(results: Sequence[Result]) -> str:
    """Every failed variant with its error and the launcher calls that produce it."""
    lines = []
    for r in results:
        if not r.ok:
            lines.append(f"* {_short(r.kernel)} [{r.variant}] ({len(r.cases)} calls, e.g. {r.cases[0]}):")
            lines.extend("    " + line for line in r.error.strip().splitlines())
    return "\n".join(lines)


def write_report(out_dir: Path, results: Sequence[Result], header: str, wall: float, calls: int) -> Path:
    """Write ``kernels.md`` (and ``kernels.json``) into ``out_dir``; returns the markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = error_report(results)
    text = "\n\n".join(
        [
            "# fastblocks Triton kernels compiled for sm_90 (H200)",
            header,
            summary(results, wall, calls),
            "Spills:\n\n```\n" + spill_summary(results) + "\n```",
            "Errors:\n\n```\n" + (errors or "none") + "\n```",
            format_table(results),
        ]
    )
    path = out_dir / "kernels.md"
    path.write_text(text + "\n")
    (out_dir / "kernels.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------- the cases
SCOPES = ("cover", "all")
LAYOUTS = ("nchw", "channels_last")
# What a case runs ("role"): "grid" every dtype of the convolution, with and without the statistics
# epilogue, wgrad and the prologue's backward; "ieee" the grid and fp32 with tf32 off
# (torch.backends.cudnn.allow_tf32 = False: INPUT_PRECISION="ieee"; the forward without the
# epilogue and wgrad, the only passes with a dot); "blocks" a case that is there for its block
# sizes: fp16 (16-bit dots have the strictest minimum shape, K >= 16), fp32 and fp32-ieee (their
# tiles and warps differ: _bn_relu_conv_triton._fwd_tiles, _wgrad_tiles), the forward without the
# epilogue, wgrad and the prologue's backward.
CONV_DTYPES = {
    "grid": ("fp16", "bf16", "fp32"),
    "ieee": ("fp16", "bf16", "fp32", "fp32-ieee"),
    "blocks": ("fp16", "fp32", "fp32-ieee"),
}
# Elementwise ops (their own launcher calls, declared in their modules): x's shape a multiple of
# 16 elements, and not; the BatchNorm dtypes.
ELEMENTWISE_SHAPES = ((BATCH, 256, 56, 56), (3, 5, 7, 9))
# BatchNorm and add+ReLU: the launchers accept fp64 too (fp64 accumulation); "blocks": fp16 and fp32.
BN_DTYPES = {"grid": ("fp16", "bf16", "fp32", "fp64"), "blocks": ("fp16", "fp32")}


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One convolution a model runs through ``bn_relu_conv2d`` (square images, padding k // 2);
    ``role``: what to run on it (a key of ``CONV_DTYPES``)."""

    model: str
    c: int
    co: int
    h: int
    k: int
    stride: int = 1
    role: str = "grid"


@dataclasses.dataclass(frozen=True)
class BNCase:
    """One BatchNorm input ``[BATCH, c, h, h]`` (``h=None``: a 2-D ``[BATCH, c]`` input); ``role``:
    a key of ``BN_DTYPES``; ``buffer``: the input is the channel prefix ``buf[:, :c]`` of a
    ``buffer``-channel tensor (a dense block's), read in place through its strides."""

    model: str
    c: int
    h: int | None
    role: str = "grid"
    buffer: int | None = None


def _bottleneck_convs(model: str, stages: Sequence[tuple[int, int, int, int]]) -> list[ConvCase]:
    # (width w, block input channels, input size, stride of the stage's first block)
    cases = []
    for w, cin, h, s in stages:
        ho = h // s
        cases += [
            ConvCase(model, cin, w, h, 1),  # pre-activation conv1 (first block)
            ConvCase(model, cin, w, h, 1, s),  # stride on the 1x1 (ResNet v1)
            ConvCase(model, w, w, h, 3, s),  # conv2 of the first block (v1.5: stride on the 3x3)
            ConvCase(model, w, w, ho, 3),  # conv2
            ConvCase(model, w, 4 * w, ho, 1),  # conv3
            ConvCase(model, 4 * w, w, ho, 1),  # pre-activation conv1 (other blocks)
            ConvCase(model, cin, 4 * w, h, 1, s),  # pre-activation projection shortcut
        ]
    return cases


def _basic_convs(model: str, stages: Sequence[tuple[int, int, int, int]]) -> list[ConvCase]:
    cases = []
    for w, cin, h, s in stages:
        cases += [ConvCase(model, cin, w, h, 3, s), ConvCase(model, w, w, h // s, 3)]
        if s != 1 or cin != w:
            cases.append(ConvCase(model, cin, w, h, 1, s))  # projection shortcut (pre-activation)
    return cases


def _densenet_convs(model: str, blocks: Sequence[tuple[int, int, int]], growth: int = 32) -> list[ConvCase]:
    # (block input channels, layers, size); bottleneck 4 * growth; transition C -> C / 2
    cases = []
    for c0, layers, h in blocks:
        for ci in (c0, c0 + (layers - 1) * growth):
            cases.append(ConvCase(model, ci, 4 * growth, h, 1))
        cases.append(ConvCase(model, 4 * growth, growth, h, 3))
        cases.append(ConvCase(model, c0 + layers * growth, (c0 + layers * growth) // 2, h, 1))
    return cases


def model_conv_cases() -> list[ConvCase]:
    """Every ``bn_relu_conv2d`` convolution of ResNet-50, ResNet-18, DenseNet-201 and the CIFAR ResNets."""
    return [
        *_bottleneck_convs("resnet50", [(64, 64, 56, 1), (128, 256, 56, 2), (256, 512, 28, 2), (512, 1024, 14, 2)]),
        *_basic_convs("resnet18", [(64, 64, 56, 1), (128, 64, 56, 2), (256, 128, 28, 2), (512, 256, 14, 2)]),
        *_densenet_convs("densenet201", [(64, 6, 56), (128, 12, 28), (256, 48, 14), (896, 32, 7)]),
        *_basic_convs("cifar_resnet", [(16, 16, 32, 1), (32, 16, 32, 2), (64, 32, 16, 2)]),
    ]


# scope "cover": the grid on one ResNet-50 layer per kernel size and stride (the largest blocks,
# BLOCK_N=128, the most registers) with fp32 without tf32 too, then one layer per other
# tile choice of the launchers (_bn_relu_conv_triton._fwd_tiles, _wgrad_tiles and the prologue's block)
# that the models make (tests/test_sm90_compile.py checks that "cover" reaches every one of "all").
COVER_CONVS = (
    ConvCase("resnet50 layer2 conv2", 128, 128, 28, 3, role="ieee"),
    ConvCase("resnet50 layer3.0 conv2", 256, 256, 28, 3, 2, role="ieee"),
    ConvCase("resnet50 layer1 conv3", 64, 256, 56, 1, role="ieee"),
    ConvCase("resnet50 layer2.0 shortcut", 256, 512, 56, 1, 2, role="ieee"),
    ConvCase("resnet50 layer1 conv2", 64, 64, 56, 3, role="blocks"),
    ConvCase("resnet50 layer1 conv1", 256, 64, 56, 1, role="blocks"),
    ConvCase("densenet201 conv2", 128, 32, 56, 3, role="blocks"),
    ConvCase("cifar_resnet stage1", 16, 16, 32, 3, role="blocks"),
    ConvCase("cifar_resnet stage2.0", 16, 32, 32, 3, 2, role="blocks"),
    ConvCase("cifar_resnet stage2.0 shortcut", 16, 32, 32, 1, 2, role="blocks"),
    ConvCase("cifar_resnet stage2", 32, 32, 16, 3, role="blocks"),
    ConvCase("cifar_resnet stage3.0", 32, 64, 16, 3, 2, role="blocks"),
    ConvCase("cifar_resnet stage3.0 shortcut", 32, 64, 16, 1, 2, role="blocks"),
)

# scope "cover": H*W a multiple of 16 and not, BLOCK_C's three branches, the 2-D input.
COVER_BNS = (
    BNCase("resnet50 layer1", 256, 56),
    BNCase("resnet50 layer3", 1024, 14),
    BNCase("densenet201 chunk", 32, 56, role="blocks"),
    BNCase("densenet201 block1 prefix", 160, 56, buffer=256),  # every dtype: the GPU tests run fp64 blocks
    BNCase("cifar_resnet stage1", 16, 32, role="blocks"),
    BNCase("functional 2-D", 512, None, role="blocks"),
)

# A dense block's norm1 input: a channel prefix of its buffer (DenseNet-201: c0, layers, size).
DENSENET201_PREFIXES = tuple(
    BNCase(f"densenet201 block{i + 1} prefix", c0 + 32 * (n // 2), h, role="blocks", buffer=c0 + 32 * n)
    for i, (c0, n, h) in enumerate(((64, 6, 56), (128, 12, 28), (256, 48, 14), (896, 32, 7)))
)


def conv_cases(scope: str = "cover") -> list[ConvCase]:
    """The convolutions to run: ``cover`` (the default) or ``all`` (every layer of the models, every setting)."""
    if scope == "cover":
        return list(COVER_CONVS)
    return [dataclasses.replace(c, role="ieee") for c in model_conv_cases()]


def bn_cases(scope: str = "cover") -> list[BNCase]:
    """The BatchNorm inputs to run: ``cover``, or ``all``: every BatchNorm input of the models (each
    convolution's input and output, the stems, DenseNet's 32-channel chunks) and a 2-D input."""
    if scope == "cover":
        return list(COVER_BNS)
    seen: dict[tuple[int, int | None], BNCase] = {}
    for cv in model_conv_cases():
        for c, h in ((cv.c, cv.h), (cv.co, cv.h // cv.stride)):
            seen.setdefault((c, h), BNCase(cv.model, c, h))
    for case in (
        BNCase("resnet50 stem", 64, 112),
        *(BNCase("densenet201 chunk", 32, h) for h in (56, 28, 14, 7)),
        BNCase("functional 2-D", 512, None),
    ):
        seen.setdefault((case.c, case.h), case)
    return [*seen.values(), *DENSENET201_PREFIXES]


# ----------------------------------------------------------------------------- capture (Triton 3.6)
def _stand_in_driver_class() -> type:
    """A ``DriverBase`` subclass that answers what the JIT asks before compiling, for an sm_90 GPU."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        """Current target sm_90, device 0, stream 0; anything that would need a GPU raises."""

        @classmethod
        def is_active(cls) -> bool:
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("the stand-in driver builds no launcher")

        def get_current_target(self) -> GPUTarget:
            return GPUTarget(*TARGET)

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cpu")

        def get_benchmarker(self) -> Callable:
            raise NotImplementedError("the stand-in driver cannot benchmark")

        def get_device_interface(self) -> Any:
            return torch.cpu

        def get_current_device(self) -> int:
            return 0

        def set_current_device(self, device: int) -> None:
            pass

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
            return TARGET[1] // 10, TARGET[1] % 10

    return StandInDriver


class Recorder:
    """Collects what the JIT would compile while :meth:`active`; ``case`` labels the calls."""

    def __init__(self) -> None:
        self.case = ""
        self.captured: list[tuple[Variant, str, Any]] = []
        self.calls = 0

    def record(self, fn: Any, signature: dict, constexprs: dict, options: Any, attrs: dict) -> None:
        opts = dict(options.__dict__)
        declared = [p.name for p in fn.params if p.is_constexpr]
        name = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"
        variant = make_variant(name, fn.arg_names, declared, signature, constexprs, attrs, opts)
        self.captured.append((variant, self.case, (fn, signature, constexprs, attrs, opts)))

    @contextlib.contextmanager
    def active(self) -> Iterator[Recorder]:
        from triton.runtime.jit import JITFunction

        recorder = self

        def do_compile(
            self: JITFunction,
            key: Any,
            signature: dict,
            device: int,
            constexprs: dict,
            options: Any,
            attrs: dict,
            warmup: bool,
        ) -> None:
            recorder.record(self, signature, constexprs, options, attrs)
            return None  # JITFunction.run returns at once: nothing compiled, nothing launched

        saved = JITFunction._do_compile
        JITFunction._do_compile = do_compile  # type: ignore[method-assign]
        try:
            with stand_in_driver():
                yield self
        finally:
            JITFunction._do_compile = saved  # type: ignore[method-assign]

    def call(self, case: str, fn: Callable, *args: Any, **kwargs: Any) -> None:
        """Run one launcher call labelled ``case``; it must reach a kernel."""
        self.case = case
        before = len(self.captured)
        fn(*args, **kwargs)
        self.calls += 1
        if len(self.captured) == before:
            raise RuntimeError(f"{case}: {getattr(fn, '__name__', fn)} launched no Triton kernel")


@contextlib.contextmanager
def stand_in_driver() -> Iterator[None]:
    """Make the stand-in sm_90 driver Triton's active driver inside the block."""
    from triton.runtime import driver

    previous = getattr(driver, "_active", None)  # None: created lazily (and on a CPU machine, never)
    driver.set_active(_stand_in_driver_class()())
    try:
        yield
    finally:
        driver.set_active(previous)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[name]


@contextlib.contextmanager
def _allow_tf32(value: bool) -> Iterator[None]:
    import torch

    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = value
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def run_launchers(rec: Recorder, scope: str = "cover", select: Callable[[str], bool] = lambda name: True) -> None:
    """Call every launcher on the cases of ``scope`` (inside ``rec.active()``); ``select(group)``
    filters the groups ``batchnorm``, ``bn_relu_conv`` and each op that declares its launcher calls
    (``add_relu``)."""
    import torch

    from fastblocks.ops._declarations import declared

    bn = importlib.import_module("fastblocks.ops._bn_triton")
    brc = importlib.import_module("fastblocks.ops.bn_relu_conv")
    brt = importlib.import_module("fastblocks.ops._bn_relu_conv_triton")

    def empty(shape: Sequence[int], dtype: Any, cl: bool) -> torch.Tensor:
        fmt = torch.channels_last if cl and len(shape) == 4 else torch.contiguous_format
        return torch.empty(tuple(shape), dtype=dtype, memory_format=fmt)

    if select("bn_relu_conv"):
        for cv in conv_cases(scope):
            for dname in CONV_DTYPES[cv.role]:
                dtype = _torch_dtype(dname.split("-")[0])
                for layout in LAYOUTS:
                    cl = layout == "channels_last"
                    tag = f"{cv.model} {cv.c}->{cv.co} {cv.k}x{cv.k}/s{cv.stride} @{cv.h} {dname} {layout}"
                    conv = brc.make_conv(cv.stride, cv.k // 2, 1, 1)
                    x = empty((BATCH, cv.c, cv.h, cv.h), dtype, cl)
                    w = empty((cv.co, cv.c, cv.k, cv.k), dtype, cl)  # as model.to(memory_format=...) leaves them
                    scale, shift = torch.empty(cv.c), torch.empty(cv.c)
                    ho, wo = conv.out_hw(cv.h, cv.h, cv.k, cv.k)
                    with _allow_tf32(dname != "fp32-ieee"):
                        for stats in (False, True) if cv.role != "blocks" and dname != "fp32-ieee" else (False,):
                            rec.call(f"fwd stats={stats} {tag}", brt.fwd, x, scale, shift, w, conv, stats)
                        gy = empty((BATCH, cv.co, ho, wo), dtype, cl)
                        rec.call(f"wgrad {tag}", brt._wgrad_triton, gy, x, scale, shift, w, conv)
                    if dname != "fp32-ieee":  # no dot: the precision does not matter
                        rec.call(
                            f"prologue_bwd {tag}", brt._prologue_bwd_triton, empty(x.shape, dtype, cl), x, scale, shift
                        )

    if select("batchnorm"):
        for case in bn_cases(scope):
            shape = (BATCH, case.c) if case.h is None else (BATCH, case.c, case.h, case.h)
            for dname in BN_DTYPES[case.role]:
                dtype = _torch_dtype(dname)
                cd = torch.float64 if dtype == torch.float64 else torch.float32
                for layout in LAYOUTS if case.h is not None else ("nchw",):
                    cl = layout == "channels_last"
                    tag = f"{case.model} {list(shape)} {dname} {layout}"
                    x, g, r = (empty(shape, dtype, cl) for _ in range(3))
                    if case.buffer is not None:
                        x = empty((BATCH, case.buffer, *shape[2:]), dtype, cl)[:, : case.c]
                    v = torch.empty(case.c, dtype=cd)
                    rec.call(f"stats {tag}", bn.stats_triton, x, cl)
                    for res in (None, r):
                        for relu in (False, True):
                            flags = f"res={res is not None} relu={relu} {tag}"
                            rec.call(f"apply {flags}", bn.apply_triton, x, v, v, res, relu, cl)
                            rec.call(f"bwd_reduce {flags}", bn.bwd_reduce_triton, g, x, v, v, v, res, relu, cl)
                            rec.call(f"bwd_apply {flags}", bn.bwd_apply_triton, g, x, v, v, res, v, v, v, relu, cl)
                            if case.buffer is not None and res is None:  # the dense block's norm1, into G
                                out = empty((*x.shape[:1], case.buffer, *x.shape[2:]), dtype, cl)[:, : case.c]
                                rec.call(
                                    f"bwd_apply_add {flags}", bn.bwd_apply_add_triton, out, g, x, *[v] * 5, relu, cl
                                )

    # Every op that declares its launcher calls (fastblocks.ops._declarations), e.g. add_relu.
    for name, decl in declared().items():
        if decl.sm90_launches is None or not select(name):
            continue
        for shape in ELEMENTWISE_SHAPES:
            for dname in BN_DTYPES["grid"]:
                dtype = _torch_dtype(dname)
                for layout in LAYOUTS:
                    cl = layout == "channels_last"
                    tag = f"{list(shape)} {dname} {layout}"
                    make = functools.partial(empty, dtype=dtype, cl=cl)
                    for what, launcher, args in decl.sm90_launches(make, shape, cl):
                        rec.call(f"{name} {what} {tag}", launcher, *args)


# ----------------------------------------------------------------------------- compile (Triton 3.6)
_JOBS: list[Job] = []  # set before the worker processes fork


def _cuobjdump() -> str:
    from triton import knobs

    with contextlib.suppress(Exception):
        return knobs.nvidia.cuobjdump.path
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def compile_job(index: int) -> Result:
    """Compile ``_JOBS[index]`` for sm_90 and measure it (runs in a worker process)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = _JOBS[index]
    fn, signature, constexprs, attrs, options = job.payload
    result = Result(job.variant.kernel, job.variant.label(), job.cases, ok=False, num_warps=job.variant.num_warps)
    knobs.nvidia.dump_ptxas_log = True  # compile() prints ptxas -v's log: spill stores and loads
    log = io.StringIO()
    start, cpu_start, children_start = time.perf_counter(), time.process_time(), _children_cpu()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(*TARGET), options=options
            )
    except Exception as exc:
        kernel, result.error = None, f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start + _children_cpu() - children_start  # with ptxas
    if kernel is None:
        return result
    meta = kernel.metadata
    result.num_warps, result.num_stages, result.shared = meta.num_warps, meta.num_stages, meta.shared
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=False)
    res = parse_res_usage(dump.stdout).get(meta.name)
    ptxas = parse_ptxas_log(log.getvalue()).get(meta.name)
    if res is None:
        result.error = f"cuobjdump -res-usage found no function {meta.name}: {dump.stdout}{dump.stderr}"
        return result
    result.registers, result.local, result.stack = res.registers, res.local, res.stack
    result.shared_static = res.shared_static
    if ptxas is not None:
        result.spill_stores, result.spill_loads = ptxas.spill_stores, ptxas.spill_loads
    if meta.shared > H200_MAX_SHARED:
        result.error = f"needs {meta.shared} B of shared memory per block; an H200 block may use {H200_MAX_SHARED} B"
        return result
    result.ok = True
    return result


def compile_all(jobs: list[Job], workers: int, progress: Callable[[int, Result], None]) -> list[Result]:
    """Compile every job in ``workers`` forked processes; results in the jobs' order."""
    import concurrent.futures
    import multiprocessing

    global _JOBS
    _JOBS = jobs
    # The large kernels first, so that no worker is left alone with one at the end.
    order = sorted(range(len(jobs)), key=lambda i: ("bn_relu_conv" not in jobs[i].variant.kernel, i))
    results: list[Result | None] = [None] * len(jobs)
    if workers <= 1:
        for done, i in enumerate(order, 1):
            results[i] = compile_job(i)
            progress(done, results[i])
        return [r for r in results if r is not None]
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(compile_job, i): i for i in order}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as exc:  # a crashed worker (e.g. a segfault in LLVM or ptxas)
                job = jobs[i]
                results[i] = Result(job.variant.kernel, job.variant.label(), job.cases, ok=False, error=repr(exc))
            progress(done, results[i])  # type: ignore[arg-type]
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------- main
class SetupError(RuntimeError):
    """The environment cannot compile for the GPU machine (wrong Triton, the interpreter on)."""


def _check_triton() -> str:
    """Where ``import triton`` found the pinned version; raises :class:`SetupError` otherwise."""
    import triton

    if triton.__version__ != TRITON_VERSION:
        raise SetupError(
            f"sm90-compile: needs triton=={TRITON_VERSION} (the GPU machine's), found {triton.__version__} at "
            f"{triton.__file__}.\nRun `make sm90-compile`, or install it with "
            f"`pip install --target build/sm90/triton36 --no-deps triton=={TRITON_VERSION}` "
            "and run with PYTHONPATH=build/sm90/triton36."
        )
    from triton import knobs

    if knobs.runtime.interpret:
        raise SetupError("sm90-compile: TRITON_INTERPRET is set; the interpreter compiles nothing")
    return triton.__file__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "sm90", help="report folder (default build/sm90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPU count)")
    parser.add_argument(
        "--scope",
        choices=SCOPES,
        default="cover",
        help="cover (default): every pass, dtype, layout, flag and block size of the launchers, on representative "
        "layers; all: every layer of ResNet-50/18, DenseNet-201 and the CIFAR ResNets (every specialization they "
        "produce; several times longer)",
    )
    parser.add_argument(
        "--only", default="", help="regex: compile only the variants whose 'kernel [variant]' text matches"
    )
    parser.add_argument("--list", action="store_true", help="capture and list the variants, compile nothing")
    parser.add_argument(
        "--max-spill",
        type=int,
        default=None,
        metavar="BYTES",
        help="fail (exit 1) when a variant spills more than BYTES per thread (spill stores or local memory); "
        "default: spills are reported, not failed",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="Triton cache to compile into and keep (a second run reuses it: cache hits take no time); "
        "default: a fresh temporary one, removed at the end, so that the times are compile times",
    )
    args = parser.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: the interpreter would compile nothing
    sys.path.insert(0, str(ROOT))
    try:
        where = _check_triton()
    except SetupError as exc:
        print(exc, file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)  # the capture does no arithmetic; the compile processes fork from here

    start = time.perf_counter()
    rec = Recorder()
    with rec.active():
        run_launchers(rec, args.scope)
    jobs = dedupe(rec.captured)
    if args.only:
        jobs = [j for j in jobs if re.search(args.only, f"{j.variant.kernel} [{j.variant.label()}]")]
    capture_s = time.perf_counter() - start
    header = (
        f"Triton {TRITON_VERSION} ({where}), target {TARGET[0]}:{TARGET[1]} (warp {TARGET[2]}), "
        f"torch {torch.__version__}; "
        f"scope {args.scope}, batch {BATCH}: {rec.calls} launcher calls captured in {capture_s:.1f} s."
    )
    print(header, flush=True)
    if args.list:
        for job in jobs:
            print(f"{_short(job.variant.kernel)} [{job.variant.label()}] x{len(job.cases)}")
        print(f"{len(jobs)} variants")
        return 0

    print(f"compiling {len(jobs)} variants with {args.jobs} processes ...", flush=True)

    def progress(done: int, r: Result) -> None:
        status = "ok" if r.ok else "ERROR"
        if not r.ok or done % 25 == 0 or done == len(jobs):
            line = f"  [{done}/{len(jobs)}] {status} {_short(r.kernel)} [{r.variant}] {r.seconds:.1f} s"
            first = r.error.strip().splitlines()[0][:200] if r.error.strip() else ""
            print(f"{line} ({r.cpu_seconds:.1f} s cpu){': ' + first if first else ''}", flush=True)

    if args.cache_dir is None:
        cache: contextlib.AbstractContextManager[str] = tempfile.TemporaryDirectory(prefix="sm90-triton-cache-")
    else:
        cache = contextlib.nullcontext(str(args.cache_dir.resolve()))
    compile_start = time.perf_counter()
    with cache as cache_dir, stand_in_driver():
        os.environ["TRITON_CACHE_DIR"] = cache_dir  # read by the forked compile processes
        results = compile_all(jobs, max(1, args.jobs), progress)
    wall = time.perf_counter() - compile_start
    path = write_report(args.out, results, header, wall, rec.calls)
    print(format_table(results))
    print()
    print(spill_summary(results))
    print(summary(results, wall, rec.calls))
    print(f"report: {path}")
    errors = error_report(results)
    if errors:
        print(
            f"\nsm90-compile: {sum(not r.ok for r in results)} variant(s) failed for sm_90:\n{errors}", file=sys.stderr
        )
        return 1
    over = over_spill(results, args.max_spill)
    if over:
        print(f"\nsm90-compile: {len(over)} variant(s) spill more than {args.max_spill} B per thread:", file=sys.stderr)
        print(spill_summary(over), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
