"""Benchmark harness shared by ``benchmarks/`` (pytest-benchmark) and ``fastblocks bench``.

- :mod:`~fastblocks.bench.env`: the environment record (device, versions, date, command, commit);
- :mod:`~fastblocks.bench.timing`: warm-up + repeated samples, median and IQR (CUDA events on GPUs);
- :mod:`~fastblocks.bench.rates`: measured copy bandwidth and matmul rate (the yardsticks);
- :mod:`~fastblocks.bench.memory`: bytes saved for backward, CUDA peak memory;
- :mod:`~fastblocks.bench.results`: JSON results files, rows merged by (suite, device, case);
- :mod:`~fastblocks.bench.ops`, :mod:`~fastblocks.bench.models`: the op and model cases;
- :mod:`~fastblocks.bench.report`: markdown tables, PNG charts, the README section.
"""

from fastblocks.bench.env import device_slug, environment
from fastblocks.bench.results import load_results, write_results
from fastblocks.bench.timing import Timing, measure

__all__ = ["Timing", "device_slug", "environment", "load_results", "measure", "write_results"]
