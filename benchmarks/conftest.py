"""pytest-benchmark suites: ``pytest benchmarks --benchmark-only`` (or ``make bench``).

Files are named ``bench_*.py`` (collected by the hook below, so the plain ``pytest`` run of the
tests never picks them up). Every case comes from :mod:`fastblocks.bench.ops`, the same cases
``fastblocks bench --ops`` runs; rows are also written, with the environment they ran in, to a new
``runs/bench/<timestamp>/<suite>.json`` (``--bench-results DIR`` elsewhere, ``none`` not at all;
``--record``: the project's ``benchmarks/results/<device-slug>``). The options are registered in
the repository's root ``conftest.py`` (with ``pytest --benchmark``).

Without a CUDA device ``TRITON_INTERPRET=1`` is set (as in tests/conftest.py) before Triton is
imported, so importing fastblocks behaves as in the tests; the fused provider still uses the
device's default backend (the compiled ``cpu`` kernels, else the reference): the Triton
interpreter is a correctness tool and is never timed (``fastblocks.bench.ops.fused_backend``
refuses it).

Options: ``--bench-compile`` also runs the torch.compile providers on the CPU (minutes there).
After pytest-benchmark's tables, ``pytest_terminal_summary`` prints fastblocks' table (fused
beside eager, the speed-up per case) and a one-line headline.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import fastblocks  # noqa: F401  (registers the ops)
from fastblocks.bench import ops as op_bench
from fastblocks.bench import report
from fastblocks.bench.env import environment
from fastblocks.bench.memory import cuda_peak_bytes, saved_bytes
from fastblocks.bench.rates import yardsticks
from fastblocks.bench.results import default_output_dir, results_path, run_output_dir, write_results
from fastblocks.bench.timing import Timing, synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS = pytest.StashKey[dict]()
WRITTEN = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[WRITTEN] = []


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; the others are not (they
    # do not match python_files), so collect those here.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_env() -> dict:
    """The environment record plus the device's measured copy bandwidth and matmul rate."""
    env = environment(DEVICE)
    env.update(yardsticks(DEVICE))
    return env


@pytest.fixture(scope="session")
def _bench_rows(request: pytest.FixtureRequest, bench_env: dict):
    rows: dict[str, list[dict]] = {}
    yield rows
    request.config.stash[ROWS] = rows
    where = request.config.getoption("--bench-results")
    if where == "none":
        return
    if request.config.getoption("--record"):
        out = default_output_dir(bench_env["device_slug"], os.path.join(os.path.dirname(__file__), "results"))
    else:
        out = Path(where) if where else run_output_dir(Path(str(request.config.rootpath)) / "runs" / "bench")
    for suite, suite_rows in rows.items():
        if suite_rows:
            write_results(results_path(out, suite), suite, bench_env, suite_rows)
            request.config.stash[WRITTEN].append(results_path(out, suite))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """After pytest-benchmark's tables: ours (fused beside eager, with the speed-up over eager
    per case), the files written, and the one-line headline."""
    rows = [r for suite_rows in config.stash.get(ROWS, {}).values() for r in suite_rows]
    if not rows:
        return
    terminalreporter.section("fastblocks: fused vs eager")
    terminalreporter.write_line(report.tables(rows))
    for path in config.stash.get(WRITTEN, []):
        terminalreporter.write_line(f"wrote {path}")
    terminalreporter.write_line(report.headline(rows, str(DEVICE)))


_LAST: dict[tuple, op_bench.Prepared] = {}


def _prepared(case: op_bench.OpCase, provider: str) -> op_bench.Prepared:
    """The prepared (case, provider), kept while its modes run (tests are ordered mode-last),
    so a compile provider compiles once per case; only one is kept, to bound memory."""
    key = (case, provider)
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = op_bench.prepare(case, provider, DEVICE)
    return _LAST[key]


@pytest.fixture
def bench_op(request: pytest.FixtureRequest, benchmark, bench_env: dict, _bench_rows: dict):
    """``bench_op(case, provider, mode)``: time one op case with pytest-benchmark and record it."""
    suite = request.module.__name__.rsplit(".", 1)[-1]

    def run(case: op_bench.OpCase, provider: str, mode: str) -> None:
        reason = op_bench.provider_available(
            provider, DEVICE, allow_cpu_compile=request.config.getoption("--bench-compile")
        )
        if reason is not None:
            pytest.skip(reason)
        prep = _prepared(case, provider)
        fn = op_bench.timed_call(prep, mode)

        def call() -> None:
            fn()
            synchronize(DEVICE)  # time the work, not its launch

        for _ in range(3):  # warm-up (pytest-benchmark warms up only when asked)
            call()
        benchmark(call)
        _, saved = saved_bytes(prep.forward)
        peak = cuda_peak_bytes(fn, DEVICE) if DEVICE.type == "cuda" else None
        if benchmark.stats is None:  # --benchmark-disable: nothing measured
            return
        st = benchmark.stats.stats
        samples = [s * 1e3 for s in st.data]
        timing = Timing(st.median * 1e3, st.iqr * 1e3, samples, benchmark.stats.iterations, "pytest-benchmark")
        row = op_bench.row(
            case, provider, mode, timing, backend=prep.backend, yardsticks=bench_env, saved=saved, peak=peak,
            compile_s=prep.compile_s,
        )  # fmt: skip
        benchmark.extra_info.update(
            {k: row[k] for k in ("provider", "mode", "backend", "gbps", "pct_copy", "saved_bytes", "peak_bytes")}
        )
        _bench_rows.setdefault(suite, []).append(row)

    return run
