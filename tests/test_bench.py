"""The benchmark harness (fastblocks.bench), the results files, the README updater and the CLI.

Fast (tiny shapes, a couple of samples): these check that the machinery works, not the numbers.
"""

from __future__ import annotations

import importlib.util
import json
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import fastblocks
from fastblocks import cli
from fastblocks.bench import models as model_bench
from fastblocks.bench import ops as op_bench
from fastblocks.bench.env import (
    busy_warning,
    command_line,
    contention_warning,
    cpu_snapshot,
    device_slug,
    environment,
    slugify,
)
from fastblocks.bench.memory import saved_bytes
from fastblocks.bench.report import BEGIN, END, model_table, op_table, readme_section, speedup_intervals, speedups
from fastblocks.bench.results import load_results, write_results
from fastblocks.bench.timing import cuda_reps, measure, measure_interleaved, paired_ratio, summarize
from fastblocks.nn import BatchNormReLU2d

ROOT = Path(__file__).resolve().parents[1]
FAST = {"warmup": 1, "min_reps": 2, "min_time_s": 0.0, "max_time_s": 0.2}


def _load_update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> fc; ``fused=True`` uses BatchNormReLU2d (same state_dict keys)."""

    def __init__(self, fused: bool = False, num_classes: int = 1000) -> None:
        super().__init__()
        self.fused = fused
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = BatchNormReLU2d(8) if fused else nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        if not self.fused:
            x = torch.relu(x)
        return self.fc(x.mean((2, 3)))


def tiny_net(fused: bool = False, num_classes: int = 1000) -> nn.Module:
    return TinyNet(fused, num_classes)


# ----------------------------------------------------------------------------- timing
def test_measure_returns_positive_median_and_samples():
    x = torch.randn(1000)
    t = measure(lambda: x.sum(), "cpu", warmup=1, min_reps=3, min_time_s=0.0)
    assert t.median_ms > 0 and t.iqr_ms >= 0
    assert len(t.samples_ms) >= 3 and all(s > 0 for s in t.samples_ms)
    assert t.calls_per_sample >= 1 and t.method == "perf_counter"
    assert json.loads(json.dumps(t.as_dict()))["median_ms"] == t.median_ms


def test_measure_interleaved_alternates_and_rotates():
    """One sample of each callable per round, the starting callable rotating round by round."""
    order: list[str] = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    t = measure_interleaved(fns, "cpu", warmup=1, min_reps=4, max_reps=4, min_time_s=0.0)
    assert list(t) == ["a", "b", "c"]
    assert all(len(v.samples_ms) == 4 and v.method == "perf_counter_interleaved" for v in t.values())
    timed = order[3:]  # after one warm-up call of each
    per = {k: t[k].calls_per_sample for k in "abc"}
    firsts = []
    i = 0
    for _ in range(4):  # each round: the callables in turn, each repeated calls_per_sample times
        rnd = []
        while len(rnd) < 3:
            k = timed[i]
            assert timed[i : i + per[k]] == [k] * per[k]
            rnd.append(k)
            i += per[k]
        assert sorted(rnd) == ["a", "b", "c"]
        firsts.append(rnd[0])
    assert i == len(timed)
    assert firsts == ["a", "b", "c", "a"]
    with pytest.raises(ValueError):
        measure_interleaved({}, "cpu")


def test_op_run_interleaved_rows():
    case = op_bench.OpCase("add_relu", (2, 8, 6, 6), torch.float32)
    preps = [op_bench.prepare(case, p, "cpu") for p in ("eager", "fused")]
    rows = op_bench.run_interleaved(preps, "full", "cpu", timing=FAST)
    assert [r["provider"] for r in rows] == ["eager", "fused"]
    assert all(r["median_ms"] > 0 and r["timer"] == "perf_counter_interleaved" for r in rows)
    other = op_bench.prepare(op_bench.OpCase("add_relu", (2, 8, 6, 6), torch.float32, True), "eager", "cpu")
    with pytest.raises(ValueError, match="single case"):
        op_bench.run_interleaved([preps[0], other], "fwd", "cpu", timing=FAST)


def test_summarize_median_and_iqr():
    assert summarize([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 2.0)
    assert summarize([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError):
        summarize([])


def test_paired_ratio_is_the_sign_test_interval_of_the_median_ratio():
    # n = 20: the sign test's 95% interval for a median is (r_(6), r_(15)) (coverage 95.9%).
    assert paired_ratio([float(i) for i in range(1, 21)], [1.0] * 20) == (10.5, 6.0, 15.0)
    assert paired_ratio([2.0, 4.0, 6.0, 8.0, 10.0, 12.0], [1.0] * 6) == (7.0, 2.0, 12.0)  # n = 6: min, max
    assert paired_ratio([2.0] * 5, [1.0] * 5) == (2.0, None, None)  # n = 5: no 95% interval exists
    for bad in (([1.0], [1.0, 2.0]), ([], []), ([1.0], [0.0])):
        with pytest.raises(ValueError):
            paired_ratio(*bad)
    with pytest.raises(ValueError, match="confidence"):
        paired_ratio([1.0], [1.0], confidence=1.0)


def test_paired_ratio_interval_covers_the_true_median_at_least_95_percent():
    import random

    rng = random.Random(0)
    for n in (7, 15, 20):
        trials, hits = 2000, 0
        for _ in range(trials):
            base = [rng.lognormvariate(0.0, 0.3) for _ in range(n)]
            _, low, high = paired_ratio(base, [1.0] * n)  # true median ratio: exp(0) = 1
            hits += low <= 1.0 <= high
        assert hits / trials >= 0.93, (n, hits / trials)  # >= 95% up to sampling error (sd ~0.5%)


def test_cuda_sample_count_follows_the_limits_and_reps():
    assert cuda_reps(0.01, 5, 200, 1.0, 10.0) == 100  # enough for min_time_s
    assert cuda_reps(1.0, 5, 200, 1.0, 2.0) == 2  # max_time_s caps min_reps
    assert cuda_reps(5.0, 5, 200, 1.0, 2.0) == 1  # at least one
    assert cuda_reps(1e-4, 20, 20, 0.0, float("inf")) == 20  # --reps 20: exactly 20, no time limit


def test_speedups_of_interleaved_rows_are_paired_by_round():
    drift = [10.0, 31.0, 12.0, 29.0, 11.0, 33.0, 30.0, 13.0]  # a machine whose speed wanders 3x
    run = {"timer": "perf_counter_interleaved", "run": "r1"}

    def row(provider, samples, **extra):
        r = _row(f"resnet50/train/{provider}/8x3x224x224/float32/nchw", sorted(samples)[len(samples) // 2], **extra)
        return {**r, "kind": "model", "provider": provider, "samples_ms": samples}

    eager = row("eager", drift, **run)
    fused = row("fused", [d / 1.25 for d in drift], **run)  # 1.25x faster in every round
    ((value, low, high),) = [v for c, v in speedup_intervals([eager, fused]).items() if "/fused/" in c]
    assert value == pytest.approx(1.25) and low == pytest.approx(1.25) and high == pytest.approx(1.25)
    unpaired = row("fused", [d / 1.25 for d in drift], timer="perf_counter", run="r1")
    assert speedup_intervals([eager, unpaired])[unpaired["case"]][1:] == (None, None)
    other_run = row("fused", [d / 1.25 for d in drift], timer="perf_counter_interleaved", run="r2")
    assert speedup_intervals([eager, other_run])[other_run["case"]][1:] == (None, None)
    assert speedups([eager, fused], baseline="fused")[eager["case"]] == pytest.approx(0.8)


# ----------------------------------------------------------------------------- environment
def test_environment_record():
    env = environment("cpu", command="fastblocks bench --quick")
    for key in ("device_name", "torch", "triton", "cuda", "driver", "cpu", "threads", "date", "git_commit"):
        assert key in env
    assert env["command"] == "fastblocks bench --quick"
    assert env["device_slug"] == device_slug("cpu") and env["device_slug"].startswith("cpu-")
    assert slugify("NVIDIA H200 (SXM) ") == "nvidia-h200-sxm"
    assert command_line(["bench", "--quick"], prog="fastblocks") == "fastblocks bench --quick"
    assert busy_warning({"load_average": 0.1, "cpu_count": 2}) is None
    assert "busy" in busy_warning({"load_average": 6.0, "cpu_count": 2})


def test_contention_counts_other_processes_only():
    """CPU time of this process is not contention; other processes' beyond a quarter is."""
    start = (0.0, 0.0, 0.0)  # (wall s, machine busy CPU s, own CPU s)
    assert contention_warning(start, 2, end=(10.0, 20.0, 19.0)) is None  # 2 own threads busy
    assert "other processes used 0.90" in contention_warning(start, 2, end=(10.0, 20.0, 11.0))
    assert contention_warning(start, 2, end=(10.0, 14.0, 10.0)) is None  # 0.4 of 2 CPUs: tolerated
    snap = cpu_snapshot()
    assert snap is None or (len(snap) == 3 and snap[1] >= 0 and snap[2] >= 0)
    assert contention_warning(None, 2) is None


# ----------------------------------------------------------------------------- results files
def _row(case: str, median: float, **extra) -> dict:
    name, mode, provider = case.split("/")[:3]
    return {"case": case, "kind": "op", "name": name, "mode": mode, "provider": provider, "shape": [2, 8, 6, 6],
            "dtype": "float32", "layout": "nchw", "median_ms": median, "spread_ms": 0.1, **extra}  # fmt: skip


def test_results_roundtrip_and_replace_by_comparison(tmp_path):
    path = tmp_path / "cpu-test" / "ops.json"
    env1 = {"device_slug": "cpu-test", "device_name": "Test CPU", "date": "2030-01-01T00:00:00", "command": "a"}
    env2 = {**env1, "date": "2030-01-02T00:00:00", "command": "b"}
    eager, fused = "add_relu/fwd/eager/2x8x6x6/float32/nchw", "add_relu/fwd/fused/2x8x6x6/float32/nchw"
    other = "add_relu/full/eager/2x8x6x6/float32/nchw"
    write_results(path, "ops", env1, [_row(eager, 2.0), _row(fused, 1.0), _row(other, 5.0)])
    data = load_results(path)
    assert [r["case"] for r in data["rows"]] == [eager, fused, other]
    assert all(r["suite"] == "ops" and r["device"] == "cpu-test" for r in data["rows"])

    # A new run of the fwd comparison (fused only) replaces every provider of it: no ratio is
    # ever taken between runs. The full-mode comparison, not measured again, stays.
    write_results(path, "ops", env2, [_row(fused, 0.5), _row("bn_relu/fwd/fused/2x8x6x6/float32/nchw", 3.0)])
    data = load_results(path)
    by_case = {r["case"]: r for r in data["rows"]}
    assert set(by_case) == {fused, other, "bn_relu/fwd/fused/2x8x6x6/float32/nchw"}
    assert by_case[fused]["median_ms"] == 0.5 and by_case[other]["median_ms"] == 5.0
    assert fused not in speedups(data["rows"])  # its eager twin was not in the new run
    assert set(data["runs"]) == {by_case[other]["run"], by_case[fused]["run"]}
    assert data["environment"]["command"] == "b"

    write_results(path, "ops", env2, [_row(eager, 4.0), _row(fused, 0.5), _row(other, 1.0)])
    data = load_results(path)  # run 1 no longer has rows: dropped
    assert len(data["runs"]) == 1 and speedups(data["rows"])[fused] == pytest.approx(8.0)


def test_tables_render():
    rows = [_row("add_relu/fwd/eager/2x8x6x6/float32/nchw", 2.0, gbps=1.0),
            _row("add_relu/fwd/fused/2x8x6x6/float32/nchw", 1.0, gbps=2.0)]  # fmt: skip
    table = op_table(rows)
    assert "| add_relu | 2x8x6x6 |" in table and "2.00x" in table
    assert "peak MB" not in table  # columns empty in every row are left out
    assert model_table(rows) == ""


# ----------------------------------------------------------------------------- README updater
def test_update_readme_between_markers(tmp_path, capsys):
    results = tmp_path / "results"
    env = {"device_slug": "cpu-test", "device_name": "Test CPU", "device": "cpu", "threads": 2, "torch": "x",
           "date": "2030-01-01T00:00:00", "command": "fastblocks bench --quick"}  # fmt: skip
    write_results(results / "cpu-test" / "ops.json", "ops", env, [_row("add_relu/fwd/eager/2x8x6x6/float32/nchw", 1.0)])
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\nold, typed by hand\n{END}\n\nafter\n")
    update = _load_update_readme()

    assert update.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert "old, typed by hand" not in text and text.startswith("# title") and text.endswith("after\n")
    section = text[text.index(BEGIN) : text.index(END)]
    assert "### Test CPU (`cpu-test`)" in section and "| add_relu |" in section
    assert "`fastblocks bench --quick`" in section
    assert update.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0
    assert readme_section(results) in text

    readme.write_text("# no markers\n")
    capsys.readouterr()
    assert update.main(["--readme", str(readme), "--results", str(results)]) == 0
    out = capsys.readouterr()
    assert "| add_relu |" in out.out and "markers" in out.err and readme.read_text() == "# no markers\n"


# ----------------------------------------------------------------------------- op cases
def test_op_case_bytes_and_backend():
    case = op_bench.OpCase("add_relu", (2, 8, 6, 6), torch.float32)
    n = 2 * 8 * 6 * 6
    assert case.nbytes("fwd") == 3 * n * 4 + n // 8
    assert case.nbytes("full") == case.nbytes("fwd") + case.nbytes("bwd")
    assert op_bench.fused_backend(case, "cpu") in {"cpu", "reference"}
    with fastblocks.use_backend("triton"), pytest.raises(RuntimeError, match="interpreter"):
        op_bench.fused_backend(case, "cpu")  # the Triton interpreter is never timed
    assert op_bench.provider_available("compile", "cpu") is not None
    assert op_bench.provider_available("compile", "cpu", allow_cpu_compile=True) is None


@pytest.mark.parametrize("name", op_bench.OPS)
def test_op_run_row(name):
    case = op_bench.OpCase(name, (2, 8, 6, 6), torch.float32, channels_last=True)
    rows = {
        p: op_bench.run(case, p, "full", "cpu", yardsticks={"copy_gbps": 10.0}, timing=FAST) for p in ("eager", "fused")
    }
    for r in rows.values():
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] is not None
        assert r["saved_bytes"] > 0 and r["memory_kind"] == "saved_for_backward" and r["peak_bytes"] is None
    assert rows["fused"]["backend"] in {"cpu", "reference"}
    assert rows["fused"]["saved_bytes"] <= rows["eager"]["saved_bytes"]


def test_saved_bytes_excludes_parameters():
    lin = nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    _, everything = saved_bytes(lambda: torch.relu(lin(x)))
    _, activations = saved_bytes(lambda: torch.relu(lin(x)), exclude=list(lin.parameters()))
    assert everything - activations == lin.weight.numel() * 4


# ----------------------------------------------------------------------------- models
def test_run_model_rows_and_skips():
    cfg = model_bench.ModelConfig(batch_size=2, image_size=8, num_classes=10, timing=FAST)
    skipped: list[str] = []
    rows = model_bench.run_model("tinynet", tiny_net, ["eager", "checkpoint", "fused"], "cpu", cfg,
                                 yardsticks={"matmul_tflops": 1.0}, on_skip=skipped.append)  # fmt: skip
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("eager", "fused") for m in ("train", "infer")
    }
    assert len(skipped) == 1 and "checkpoint" in skipped[0]
    for r in rows:
        assert r["images_per_s"] > 0 and r["flops"] > 0 and r["tflops"] > 0
        assert (r["saved_bytes"] is not None) == (r["mode"] == "train")
    assert "| tinynet | 2 x 8 |" in model_table(rows)


def test_checkpoint_provider_needs_checkpointed_layers():
    """ResNet accepts ``memory_efficient`` (a fused-model option) but its eager twin has nothing
    checkpointed: the provider is skipped there, not run as a second eager model."""
    import fastblocks.models as fm

    cfg = model_bench.ModelConfig(batch_size=2, image_size=32, num_classes=10, timing=FAST)
    for name, applies in (("resnet18", False), ("densenet121", True)):
        builder = model_bench.builder_for(fm, name)
        state = builder(fused=False, num_classes=10).state_dict()
        if applies:
            model = model_bench.build_model(builder, "checkpoint", state, torch.device("cpu"), cfg)
            assert any(getattr(m, "memory_efficient", False) for m in model.modules())
        else:
            with pytest.raises(NotImplementedError, match="checkpointed"):
                model_bench.build_model(builder, "checkpoint", state, torch.device("cpu"), cfg)


def test_folded_provider_runs_inference_only_on_the_folded_model():
    cfg = model_bench.ModelConfig(batch_size=2, image_size=32, num_classes=10, timing=FAST)
    state = fastblocks.models.resnet20(fused=False).state_dict()
    model = model_bench.build_model(fastblocks.models.resnet20, "folded", state, torch.device("cpu"), cfg)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model_bench.provider_modes("folded") == ("infer",)
    assert model_bench.provider_modes("eager") == ("train", "infer")
    cfg = model_bench.ModelConfig(batch_size=2, image_size=8, num_classes=10, timing=FAST)
    rows = model_bench.run_model("tinynet", tiny_net, ["eager", "folded"], "cpu", cfg)
    assert {(r["provider"], r["mode"]) for r in rows} == {("eager", "train"), ("eager", "infer"), ("folded", "infer")}
    assert all(r["median_ms"] > 0 and r["flops"] > 0 for r in rows)


def test_cli_bench_modes(tmp_path, monkeypatch):
    monkeypatch.setattr(model_bench, "load_models", lambda: (types.SimpleNamespace(resnet18=tiny_net), None))
    base = ["bench", "--models", "resnet18", "--tiny", "--no-progress", "--no-charts", "--output", str(tmp_path)]
    assert cli.main([*base, "--modes", "infer", "--providers", "eager,folded"]) == 0
    rows = load_results(tmp_path / "models.json")["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {("eager", "infer"), ("folded", "infer")}
    assert cli.main([*base, "--modes", "eval"]) == 2


def test_cli_bench_reps_and_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model_bench, "load_models", lambda: (types.SimpleNamespace(resnet18=tiny_net), None))
    base = ["bench", "--models", "resnet18", "--tiny", "--no-progress", "--no-charts", "--output", str(tmp_path)]
    assert (
        cli.main([*base, "--modes", "train", "--providers", "eager,fused", "--reps", "7", "--baseline", "fused"]) == 0
    )
    out = capsys.readouterr().out
    rows = load_results(tmp_path / "models.json")["rows"]
    assert [len(r["samples_ms"]) for r in rows] == [7, 7]
    assert "| vs fused |" in out and "1.00x |" in out  # the baseline's own row: no interval
    assert "x [" in out  # the other row: a paired interval (7 rounds are enough for one)
    assert cli.main([*base, "--baseline", "torchscript"]) == 2
    assert cli.main([*base, "--reps", "0"]) == 2
    assert "--baseline must be one of" in capsys.readouterr().err


def test_load_models_reports_missing_builders(monkeypatch):
    monkeypatch.setattr(model_bench.importlib, "import_module", lambda name: types.ModuleType(name))
    module, reason = model_bench.load_models()
    assert module is None and "no model builders" in reason


# ----------------------------------------------------------------------------- CLI
def test_cli_bench_ops_quick(tmp_path, capsys):
    rc = cli.main(["bench", "--ops", "--quick", "--tiny", "--no-progress", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    data = load_results(tmp_path / "ops.json")
    assert {r["name"] for r in data["rows"]} == set(op_bench.OPS)
    assert {r["provider"] for r in data["rows"]} == {"eager", "fused"}  # compile: opt-in on the CPU
    assert data["environment"]["command"].startswith("fastblocks bench --ops --quick")
    assert data["environment"]["copy_gbps"] > 0
    assert "| add_relu |" in out and "measurements in" in out
    assert (tmp_path / "ops_speedup.png").stat().st_size > 0


class _SlowFirstCall(nn.Module):
    """Stands in for ``torch.compile(model)``: its first call takes ``delay_s`` longer (the compile)."""

    def __init__(self, model: nn.Module, delay_s: float) -> None:
        super().__init__()
        self.model, self.delay_s, self.calls = model, delay_s, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.delay_s)
        return self.model(x)


def test_model_bench_reports_the_compile_time_of_the_first_step(monkeypatch):
    """``compile_s`` is the first step's extra time: the step that compiles, run before the timed rounds."""
    monkeypatch.setattr(torch, "compile", lambda model: _SlowFirstCall(model, 0.5))
    cfg = model_bench.ModelConfig(2, 16, num_classes=10, timing={"warmup": 1, "min_reps": 3, "min_time_s": 0.0})
    rows = model_bench.run_model("tiny", tiny_net, ["eager", "compile"], "cpu", cfg, modes=("train",))
    compiled = next(r for r in rows if r["provider"] == "compile")
    assert compiled["compile_s"] >= 0.4, compiled["compile_s"]


def test_cli_bench_models_and_fallback(tmp_path, capsys, monkeypatch):
    fake = types.SimpleNamespace(resnet18=tiny_net)
    monkeypatch.setattr(model_bench, "load_models", lambda: (fake, None))
    args = [
        "bench",
        "--models",
        "resnet18",
        "--tiny",
        "--batch-size",
        "2,3",
        "--no-progress",
        "--output",
        str(tmp_path),
    ]
    assert cli.main(args) == 0
    rows = load_results(tmp_path / "models.json")["rows"]
    assert {(r["batch_size"], r["provider"], r["mode"]) for r in rows} == {
        (b, p, m) for b in (2, 3) for p in ("eager", "fused") for m in ("train", "infer")
    } | {(b, "folded", "infer") for b in (2, 3)}  # folded: a CPU default, inference only
    assert "checkpoint" in capsys.readouterr().out  # the skipped provider is named
    for chart in ("models_speedup.png", "models_memory.png", "models_memory_vs_batch.png"):
        assert (tmp_path / chart).exists()

    monkeypatch.setattr(model_bench, "load_models", lambda: (None, "fastblocks.models defines no model builders yet"))
    out_dir = tmp_path / "fallback"
    rc = cli.main(
        ["bench", "--quick", "--tiny", "--channels-last", "--no-progress", "--no-charts", "--output", str(out_dir)]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "model-level benchmarks skipped" in out and "op-level" in out
    assert (out_dir / "ops.json").exists() and not (out_dir / "models.json").exists()
    assert cli.main(["bench", "--models", "resnet50", "--tiny", "--output", str(out_dir)]) == 2


def test_cli_bench_default_runs_ops_and_models_together(tmp_path, monkeypatch):
    """The main job (`fastblocks bench --quick`) measures both levels in one invocation."""
    monkeypatch.setattr(model_bench, "load_models", lambda: (types.SimpleNamespace(resnet18=tiny_net), None))
    args = ["bench", "--quick", "--tiny", "--providers", "eager,fused", "--no-progress", "--no-charts"]
    assert cli.main([*args, "--output", str(tmp_path)]) == 0
    ops = load_results(tmp_path / "ops.json")["rows"]
    models = load_results(tmp_path / "models.json")["rows"]
    assert {r["mode"] for r in ops} == {"fwd", "full"}
    assert {(r["provider"], r["mode"]) for r in models} == {
        (p, m) for p in ("eager", "fused") for m in ("train", "infer")
    }


def test_one_run_per_comparison_drops_older_providers():
    """A file from before whole-comparison replacement: the stale provider row goes."""
    from fastblocks.bench.results import one_run_per_comparison

    runs = {"r1": {"date": "2030-01-01"}, "r2": {"date": "2030-01-02"}}
    rows = [
        {**_row("add_relu/fwd/eager/2x8x6x6/float32/nchw", 1.0), "suite": "ops", "device": "d", "run": "r2"},
        {**_row("add_relu/fwd/compile/2x8x6x6/float32/nchw", 1.0), "suite": "ops", "device": "d", "run": "r1"},
        {**_row("add_relu/full/eager/2x8x6x6/float32/nchw", 1.0), "suite": "ops", "device": "d", "run": "r1"},
    ]
    kept = one_run_per_comparison(rows, runs)
    assert [r["case"] for r in kept] == [rows[0]["case"], rows[2]["case"]]


def test_cli_bench_check_runs_the_accuracy_harness_first(tmp_path, capsys, monkeypatch):
    base = ["bench", "--ops", "--quick", "--tiny", "--no-progress", "--no-charts", "--check", "--output", str(tmp_path)]
    assert cli.main(base) == 0
    assert "accuracy check" in capsys.readouterr().out and (tmp_path / "ops.json").exists()

    # A wrong dx coefficient: the check fails and nothing is measured.
    from fastblocks.ops import batchnorm as bn_ops

    real = bn_ops.dx_coefficients
    monkeypatch.setattr(bn_ops, "dx_coefficients", lambda *a, **k: tuple(v * 1.01 for v in real(*a, **k)))
    out_dir = tmp_path / "second"
    assert cli.main([*base[:-1], str(out_dir)]) == 1
    assert "accuracy check FAILED" in capsys.readouterr().err and not out_dir.exists()


# ----------------------------------------------------------------------------- the front door
def test_user_run_writes_its_own_folder_and_record_writes_the_project_results(tmp_path, monkeypatch, capsys):
    """A user's run never rewrites the recorded results: without --output it writes a new
    runs/bench/<timestamp>/; only --record writes benchmarks/results/<slug> and the README tables."""
    monkeypatch.chdir(tmp_path)
    base = ["bench", "--ops", "--tiny", "--no-progress", "--no-charts"]
    assert cli.main(base) == 0
    runs = list((tmp_path / "runs" / "bench").iterdir())
    assert len(runs) == 1 and (runs[0] / "ops.json").exists()
    assert not (tmp_path / "benchmarks").exists()
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("headline, fused vs eager on ")

    assert cli.main([*base, "--record", "--output", str(tmp_path / "x")]) == 2  # one or the other
    (tmp_path / "README.md").write_text(f"# t\n{BEGIN}\nold\n{END}\n")
    assert cli.main([*base, "--record"]) == 0
    recorded = list((tmp_path / "benchmarks" / "results").glob("*/ops.json"))
    assert len(recorded) == 1
    text = (tmp_path / "README.md").read_text()
    assert "old" not in text and "| add_relu |" in text
    assert "regenerated the README.md benchmark tables" in capsys.readouterr().out


def test_progress_is_one_line_per_case_when_not_a_terminal():
    import io

    from fastblocks.bench.command import _Progress

    log = io.StringIO()  # not a TTY, as a CI log or `make run > file`
    progress = _Progress(total=2, disable=False, stream=log)
    progress.step("add_relu 2x8 fused fwd")
    progress.note("note: something")
    progress.step("add_relu 2x8 fused full")
    progress.close()
    assert log.getvalue().splitlines() == [
        "[1/2] add_relu 2x8 fused fwd",
        "note: something",
        "[2/2] add_relu 2x8 fused full",
    ]
    assert "\r" not in log.getvalue()


def test_marks_for_cache_resident_and_noisy_rows_and_headline():
    from fastblocks.bench.report import headline

    rows = [_row("add_relu/fwd/eager/2x8x6x6/float32/nchw", 2.0, pct_copy=326.0),
            _row("add_relu/fwd/fused/2x8x6x6/float32/nchw", 1.0, pct_copy=90.0)]  # fmt: skip
    rows[0]["samples_ms"], rows[0]["spread_ms"] = [2.0, 2.1, 9.0], 3.0  # 3 samples, IQR above the median
    rows[1]["samples_ms"], rows[1]["spread_ms"] = [1.0] * 20, 0.01
    table = op_table(rows)
    assert "326 †" in table and "| 90 |" in table
    assert "(n=3) ~" in table and "(n=20) |" in table
    line = headline(rows, "Test CPU", "the machine is busy")
    assert line == (
        "headline, fused vs eager on Test CPU (speed-up > 1 is faster; ~ not stable): ops fwd: median 2.00x over 1 cases "
        "[WARNING: the machine is busy]"
    )


def _collected(*args: str) -> list[str]:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=root, capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    return [line.split("::")[0] for line in out.splitlines() if "::" in line]


def test_pytest_benchmark_option_collects_the_benchmarks_only():
    """``pytest --benchmark`` (root conftest.py) collects benchmarks/, the models suite included;
    ``pytest`` alone collects tests/ only."""
    bench = _collected("--benchmark")
    assert bench and all(path.startswith("benchmarks/bench_") for path in bench)
    assert "benchmarks/bench_models.py" in bench and "benchmarks/bench_add_relu.py" in bench
    tests = _collected()
    assert tests and all(path.startswith("tests/") for path in tests)
