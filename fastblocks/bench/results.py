"""Results files: ``benchmarks/results/<device-slug>/<suite>.json``.

One file per (device, suite) holds the environments of the runs that produced its rows and a
list of rows. Writing merges: a row replaces the stored row with the same key
``(suite, device, case)``, other rows stay, so a later run updates only what it measured.
Each row names its run (``run``: the id of an entry of ``runs``, an environment record with the
date and command); runs no row refers to any more are dropped.

A row (all values JSON; absent numbers are ``null``)::

    suite, device, case          the key; case = "<op or model>/<mode>/<provider>/<shape>/<dtype>/<layout>"
    kind                         "op" or "model"
    name                         op or model name (add_relu, bn_relu, resnet50, ...)
    provider                     eager | compile | checkpoint | fused | fused-compile
    mode                         ops: fwd | bwd | full (fwd+bwd); models: train | infer
    shape, dtype, layout         input shape, dtype ("bfloat16" with autocast for models), nchw | channels_last
    backend                      the fastblocks backend used (fused providers), else null
    median_ms, spread_ms         median and inter-quartile range per call
    samples_ms                   raw samples
    gbps, pct_copy               ops: nominal bytes / time, and % of the measured copy bandwidth
    tflops, pct_matmul           models (and convolutions): flops / time, and % of the matmul rate
    images_per_s                 models
    saved_bytes, peak_bytes      memory (see fastblocks.bench.memory), memory_kind says which
    compile_s                    compile providers: first call minus a steady call, in seconds
    run                          id of the run (a key of ``runs``)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

FORMAT = 1
DEFAULT_ROOT = Path("benchmarks") / "results"


def default_output_dir(device_slug: str, root: str | os.PathLike | None = None) -> Path:
    """``benchmarks/results/<device-slug>`` (relative to the working directory by default)."""
    return Path(root if root is not None else DEFAULT_ROOT) / device_slug


def run_output_dir(root: str | os.PathLike = Path("runs") / "bench") -> Path:
    """A new folder for one user run, ``runs/bench/<YYYYmmdd-HHMMSS>`` (relative to the working
    directory; git ignores ``runs/``), suffixed ``-2``, ``-3``, ... if that second is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = Path(root) / stamp, 1
    while path.exists():
        i += 1
        path = Path(root) / f"{stamp}-{i}"
    return path


def results_path(output_dir: str | os.PathLike, suite: str) -> Path:
    """The file of ``suite`` in ``output_dir``."""
    return Path(output_dir) / f"{suite}.json"


def row_key(row: dict) -> tuple[str, str, str]:
    """The identity of a row: ``(suite, device, case)``."""
    return (row["suite"], row["device"], row["case"])


def run_id(env: dict) -> str:
    """The id of a run: its date and command (one process writes several suites with one id)."""
    return f"{env.get('date', '?')} {env.get('command', '')}".strip()


def load_results(path: str | os.PathLike) -> dict | None:
    """The stored results file, or ``None`` when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    with path.open() as f:
        return json.load(f)


def group_key(row: dict) -> tuple[str, str, str]:
    """The comparison a row belongs to: its key without the provider (``case`` is
    ``name/mode/provider/shape/dtype/layout``), e.g. every provider of one model, mode and shape."""
    parts = row["case"].split("/")
    return (row["suite"], row["device"], "/".join(parts[:2] + parts[3:]))


def one_run_per_comparison(rows: Iterable[dict], runs: dict[str, dict]) -> list[dict]:
    """``rows`` keeping, for each comparison (:func:`group_key`), only the rows of its latest run
    (by the runs' dates): files written before :func:`merge_rows` replaced whole comparisons
    may hold providers of one comparison from different runs."""
    rows = list(rows)
    latest: dict[tuple, tuple[str, str]] = {}
    for r in rows:
        stamp = (runs.get(r.get("run"), {}).get("date", ""), r.get("run") or "")
        latest[group_key(r)] = max(latest.get(group_key(r), stamp), stamp)
    return [r for r in rows if (runs.get(r.get("run"), {}).get("date", ""), r.get("run") or "") == latest[group_key(r)]]


def merge_rows(old: Iterable[dict], new: Iterable[dict]) -> list[dict]:
    """``old`` with the rows of ``new`` in place of every old row of the same comparison
    (:func:`group_key`): all providers of one comparison come from one run, so their ratios are
    never taken across runs. Comparisons ``new`` does not measure are kept."""
    new = list(new)
    fresh = {group_key(r) for r in new}
    rows = {row_key(r): r for r in old if group_key(r) not in fresh}
    for r in new:
        rows[row_key(r)] = r
    return list(rows.values())


def write_results(path: str | os.PathLike, suite: str, env: dict, rows: Iterable[dict]) -> dict:
    """Merge ``rows`` (measured in the run ``env``) into the file at ``path``; return its content.

    Each row gets ``suite``, ``device`` (``env["device_slug"]``) and ``run`` filled in when
    missing. The file is written atomically (a temporary file renamed over it).
    """
    path = Path(path)
    rid = run_id(env)
    fresh = []
    for r in rows:
        r = dict(r)
        r.setdefault("suite", suite)
        r.setdefault("device", env["device_slug"])
        r["run"] = rid
        fresh.append(r)
    old = load_results(path) or {}
    runs = dict(old.get("runs", {}))
    runs[rid] = env
    merged = one_run_per_comparison(merge_rows(old.get("rows", []), fresh), runs)
    used = {r.get("run") for r in merged}
    data = {
        "format": FORMAT,
        "suite": suite,
        "device": env["device_slug"],
        "environment": env,
        "runs": {k: v for k, v in runs.items() if k in used},
        "rows": merged,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return data


def iter_result_files(root: str | os.PathLike = DEFAULT_ROOT) -> list[Path]:
    """Every ``*.json`` results file under ``root``, sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob("*.json") if p.is_file()) if root.exists() else []
