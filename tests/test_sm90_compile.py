"""tools/sm90_compile.py without Triton 3.6 or a GPU: the parsing of ptxas/cuobjdump output, the
de-duplication of captured variants, the report, and the case catalogue (the compile itself runs
in ``make sm90-compile``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "tools" / "sm90_compile.py"


def _load():
    spec = importlib.util.spec_from_file_location("sm90_compile", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


sm90 = _load()

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _bn_relu_conv_fwd_kernel:
  REG:255 STACK:96 SHARED:1024 LOCAL:96 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _bn_stats_kernel:
  REG:72 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_bn_relu_conv_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _bn_relu_conv_fwd_kernel
    96 bytes stack frame, 112 bytes spill stores, 140 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
ptxas info    : Compile time = 812.250 ms
"""


def test_parse_res_usage() -> None:
    res = sm90.parse_res_usage(RES_USAGE)
    assert set(res) == {"_bn_relu_conv_fwd_kernel", "_bn_stats_kernel"}
    fwd = res["_bn_relu_conv_fwd_kernel"]
    assert (fwd.registers, fwd.stack, fwd.local, fwd.shared_static) == (255, 96, 96, 1024)
    assert res["_bn_stats_kernel"].registers == 72
    assert res["_bn_stats_kernel"].local == 0
    assert sm90.parse_res_usage("") == {}


def test_parse_ptxas_log() -> None:
    log = sm90.parse_ptxas_log(PTXAS_LOG)
    fwd = log["_bn_relu_conv_fwd_kernel"]
    assert (fwd.stack, fwd.spill_stores, fwd.spill_loads, fwd.registers) == (96, 112, 140, 255)
    no_spill = PTXAS_LOG.replace(
        "96 bytes stack frame, 112 bytes spill stores, 140", "0 bytes stack frame, 0 bytes spill stores, 0"
    )
    assert sm90.parse_ptxas_log(no_spill)["_bn_relu_conv_fwd_kernel"].spill_stores == 0


def _variant(block: int = 64, attrs: dict | None = None, num_warps: int = 4):
    """A fake capture of the BatchNorm apply kernel, as ``JITFunction._do_compile`` receives it."""
    names = ["x_ptr", "y_ptr", "M", "C", "HW", "s_c", "RELU", "COMPUTE", "BLOCK_C"]
    signature = {
        "x_ptr": "*fp16", "y_ptr": "*fp16", "M": "i32", "C": "i32", "HW": "i32", "s_c": "constexpr",
        "RELU": "constexpr", "COMPUTE": "constexpr", "BLOCK_C": "constexpr",
    }  # fmt: skip
    constexprs = {(5,): 1, (6,): True, (7,): "fp32", (8,): block}
    if attrs is None:
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3)}  # HW is not a multiple of 16
    options = {"num_warps": num_warps, "num_stages": 3, "debug": False}
    return sm90.make_variant(
        "_bn_triton._bn_apply_kernel", names, ["RELU", "COMPUTE", "BLOCK_C"], signature, constexprs, attrs, options
    )


def test_make_variant() -> None:
    v = _variant()
    assert v.dtype == "fp16"
    assert v.constexprs == (("RELU", "True"), ("COMPUTE", "fp32"), ("BLOCK_C", "64"))
    assert v.ones == ("s_c",)
    assert v.not16 == ("HW",)
    assert v.num_warps == 4
    assert v.label() == "fp16; RELU=True COMPUTE=fp32 BLOCK_C=64; =1: s_c; !16: HW"
    assert v == _variant()
    assert hash(v) == hash(_variant())
    assert v != _variant(block=32)
    assert v != _variant(attrs={(0,): [["tt.divisibility", 16]]})
    assert v != _variant(num_warps=8)


def test_dedupe_merges_equal_variants_in_order() -> None:
    a, b = _variant(), _variant(block=32)
    jobs = sm90.dedupe([(a, "case 1", "pa"), (b, "case 2", "pb"), (_variant(), "case 3", "pa2"), (a, "case 1", "pa")])
    assert [j.variant for j in jobs] == [a, b]
    assert jobs[0].cases == ["case 1", "case 3"]
    assert jobs[0].payload == "pa"  # the first capture compiles
    assert jobs[1].cases == ["case 2"]
    assert sm90.dedupe([]) == []


def _results():
    R = sm90.Result
    return [
        R("bn_relu_conv._bn_relu_conv_wgrad_kernel", "fp32; KH=3", ["wgrad a", "wgrad b"], True, seconds=3.25,
          cpu_seconds=3.0, registers=255, spill_stores=112, spill_loads=140, stack=96, local=0, shared=49152),
        R("batchnorm._bn_stats_kernel", "fp16; BLOCK_C=64", ["stats a"], True, seconds=0.5, registers=72, shared=256),
        R("add_relu._add_relu_fwd_kernel", "fp16|x", ["fwd a"], False, error="CompilationError: K >= 16\n  at line 3"),
    ]  # fmt: skip


def test_table_and_summaries(tmp_path: Path) -> None:
    results = _results()
    table = sm90.format_table(results).splitlines()
    assert len(table) == 2 + len(results)
    assert all(line.count("|") == 12 for line in table)  # the variant's own "|" is escaped
    assert "_add_relu_fwd_kernel" in table[2] and "ERROR" in table[2]  # sorted by kernel
    assert "| 255 | 112/140 | 96/0 | 49152 | 3.25 | 3.00 | 2 |" in table[4]

    spills = sm90.spill_summary(results)
    assert spills.startswith("1 variant(s) spill")
    assert "_bn_relu_conv_wgrad_kernel [fp32; KH=3]: 112/140 B, stack 96 B, local 0 B, 255 regs; e.g. wgrad a" in spills
    assert sm90.spill_summary(results[1:]) == "no variant spills registers"

    total = sm90.summary(results, wall=2.0, calls=4)
    assert total.startswith("3 variants from 4 launcher calls: 2 compiled, 1 errors; registers 72-255")
    assert "shared memory 256-49152 B" in total

    assert [r.kernel for r in sm90.over_spill(results, 111)] == ["bn_relu_conv._bn_relu_conv_wgrad_kernel"]
    assert sm90.over_spill(results, 112) == [] and sm90.over_spill(results, None) == []

    errors = sm90.error_report(results)
    assert errors.splitlines()[0] == "* _add_relu_fwd_kernel [fp16|x] (1 calls, e.g. fwd a):"
    assert "    CompilationError: K >= 16" in errors
    assert sm90.error_report(results[:2]) == ""

    path = sm90.write_report(tmp_path, results, "header", 2.0, 4)
    text = path.read_text()
    assert path.name == "kernels.md"
    assert "header" in text and "K >= 16" in text and "_bn_stats_kernel" in text
    assert (tmp_path / "kernels.json").exists()


@pytest.mark.parametrize("scope", ["cover", "all"])
def test_case_catalogue(scope: str) -> None:
    convs = sm90.conv_cases(scope)
    assert {c.k for c in convs} == {1, 3}
    assert {c.stride for c in convs} == {1, 2}
    assert {(c.k, c.stride) for c in convs if c.role != "blocks"} == {(1, 1), (1, 2), (3, 1), (3, 2)}
    assert any(c.role == "ieee" for c in convs)
    assert all(c.role in sm90.CONV_DTYPES for c in convs)
    bns = sm90.bn_cases(scope)
    assert any(b.h is None for b in bns)
    sizes = {b.h * b.h for b in bns if b.h is not None}
    assert any(s % 16 == 0 for s in sizes) and any(s % 16 for s in sizes)  # both specializations of H*W
    assert len({(b.c, b.h, b.buffer) for b in bns}) == len(bns)
    assert any(b.buffer is not None and b.buffer > b.c for b in bns)  # a dense block's channel prefix
    assert all(b.role in sm90.BN_DTYPES for b in bns)
    assert set(sm90.CONV_DTYPES["grid"]) == {"fp16", "bf16", "fp32"}
    assert set(sm90.BN_DTYPES["grid"]) == {"fp16", "bf16", "fp32", "fp64"}
    assert set(sm90.LAYOUTS) == {"nchw", "channels_last"}


def test_cover_scope_uses_model_layers() -> None:
    layers = {(c.c, c.co, c.h, c.k, c.stride) for c in sm90.conv_cases("all")}
    assert all((c.c, c.co, c.h, c.k, c.stride) in layers for c in sm90.conv_cases("cover"))
    inputs = {(b.c, b.h, b.buffer) for b in sm90.bn_cases("all")}
    assert all((b.c, b.h, b.buffer) in inputs for b in sm90.bn_cases("cover"))


def test_cover_scope_reaches_every_block_size_of_the_models() -> None:
    """The launchers' block-size choices (computed by their own helpers) on the ``cover`` cases
    are all those that the models' layers produce."""
    pytest.importorskip("triton", reason="the launchers' block-size helpers use triton.next_power_of_2")
    import torch

    from fastblocks.ops import _bn_relu_conv_triton as brc
    from fastblocks.ops import _bn_triton as bn

    def conv_blocks(cases):
        # The tiles each case's role compiles (16-bit dtypes give the same tiles as fp16).
        fwd, wgrad = set(), set()
        for c in cases:
            for dname in sm90.CONV_DTYPES[c.role]:
                d = torch.float32 if dname.startswith("fp32") else torch.float16
                precision = "tf32" if dname == "fp32" else "ieee"
                fwd.add((c.k, c.stride == 1, d, precision, brc._fwd_tiles(d, c.c, c.co, precision)))
                wgrad.add((c.k, d, precision, brc._wgrad_tiles(d, c.c, c.co, precision)))
        prologue = {brc._pow2(c.c, 1, 64) for c in cases}
        return fwd, wgrad, prologue

    assert conv_blocks(sm90.conv_cases("cover")) == conv_blocks(sm90.conv_cases("all"))

    def bn_blocks(cases):
        out = set()
        for b in cases:
            for d in (torch.float32, torch.float64):
                x = torch.empty((2, b.c) if b.h is None else (2, b.c, 4, 4), dtype=d, device="meta")
                out |= {bn._blocks(x, cl) for cl in (False, True)}
        return out

    assert bn_blocks(sm90.bn_cases("cover")) == bn_blocks(sm90.bn_cases("all"))


def test_refuses_other_triton_versions() -> None:
    triton = pytest.importorskip("triton")
    if triton.__version__ == sm90.TRITON_VERSION:
        pytest.skip(f"the installed Triton is the pinned {sm90.TRITON_VERSION}")
    with pytest.raises(sm90.SetupError, match=f"needs triton=={sm90.TRITON_VERSION}"):
        sm90._check_triton()
