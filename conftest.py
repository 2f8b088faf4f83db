"""Repository-root pytest configuration: ``pytest --benchmark``.

``pytest`` alone runs the tests (``testpaths = tests``). ``pytest --benchmark`` runs the
benchmark suites of ``benchmarks/`` instead (pytest-benchmark, ``--benchmark-only``), grouped by
suite, case and mode so that each group is one comparison (eager, fused, compiled), and ends
with fastblocks' own table (fused beside eager, the speed-up column) and a one-line headline
(``benchmarks/conftest.py``). A path on the command line (``pytest --benchmark
benchmarks/bench_models.py``) narrows it; ``pytest benchmarks --benchmark-only`` still works.

The benchmark options live here, not in ``benchmarks/conftest.py``, because pytest reads
``pytest_addoption`` only from the conftest files it loads before collection: this one always.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from pathlib import Path

import pytest

_GROUP_BY = "fastblocks"  # suite, case (or model), mode: see pytest_benchmark_group_stats


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastblocks benchmarks")
    group.addoption(
        "--benchmark",
        action="store_true",
        help="run the benchmark suites in benchmarks/ (pytest-benchmark) instead of the tests",
    )
    group.addoption("--bench-compile", action="store_true", help="also run torch.compile providers on the CPU")
    group.addoption(
        "--bench-results",
        default=None,
        help="folder for the suites' JSON results (default: a new runs/bench/<timestamp>/; 'none': do not write)",
    )
    group.addoption(
        "--record",
        action="store_true",
        help="write the suites' results into the project's benchmarks/results/<device-slug>",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--benchmark"):
        return
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:  # no path given: the benchmarks
        config.args[:] = [str(Path(config.rootpath) / "benchmarks")]
    config.option.benchmark_only = True  # wins over addopts' --benchmark-skip
    if config.option.benchmark_group_by == "group":  # pytest-benchmark's default: ours instead
        config.option.benchmark_group_by = _GROUP_BY


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_group_stats(config: pytest.Config, benchmarks: list, group_by: str) -> list | None:
    """``--benchmark``'s grouping: one group per suite function, case (or model) and mode, so
    that each group holds the providers of one comparison; other groupings are pytest-benchmark's."""
    if group_by != _GROUP_BY:
        return None
    groups: dict[str, list] = defaultdict(list)
    for bench in benchmarks:
        params = bench.get("params") or {}
        key = [
            bench["name"].split("[")[0],
            *(str(getattr(params[p], "id", params[p])) for p in ("case", "model", "mode") if p in params),
        ]
        groups[" ".join(key)].append(bench)
    for members in groups.values():
        members.sort(key=operator.itemgetter("name"))
    return sorted(groups.items())
