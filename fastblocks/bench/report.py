"""Markdown tables, PNG charts and the README section, all generated from results rows.

Nothing here measures: it reads rows (:mod:`fastblocks.bench.results`) and formats them, so the
tables the CLI prints, the charts, and the README's benchmark section agree by construction.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from fastblocks.bench.env import summary_line
from fastblocks.bench.results import iter_result_files, load_results, one_run_per_comparison
from fastblocks.bench.timing import paired_ratio

_PROVIDER_ORDER = ("eager", "compile", "checkpoint", "fused", "fused-compile", "folded")
_MODE_ORDER = ("fwd", "bwd", "full", "train", "infer")
_LAYOUT_ORDER = ("nchw", "channels_last")
MB = 1e6


def _order(value: str, order: tuple[str, ...]) -> int:
    return order.index(value) if value in order else len(order)


def sort_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows grouped by name, shape, dtype, layout, mode, then provider (eager first)."""
    return sorted(
        rows,
        key=lambda r: (
            r.get("kind", ""), r["name"], r.get("shape", []), r.get("dtype", ""), _order(r.get("layout", ""), _LAYOUT_ORDER),
            _order(r["mode"], _MODE_ORDER), _order(r["provider"], _PROVIDER_ORDER),
        ),
    )  # fmt: skip


def baseline_case(row: dict, provider: str = "eager") -> str:
    """The ``case`` of the same measurement under ``provider``."""
    parts = row["case"].split("/")
    parts[2] = provider
    return "/".join(parts)


def _paired(row: dict, base: dict) -> bool:
    """Whether ``row`` and ``base`` were sampled round by round together (one interleaved run)."""
    s, b = row.get("samples_ms") or [], base.get("samples_ms") or []
    interleaved = row.get("timer") == base.get("timer") == "perf_counter_interleaved"
    return interleaved and len(s) == len(b) > 0 and row.get("run") == base.get("run")


def speedup(row: dict, base: dict) -> tuple[float, float | None, float | None]:
    """``base``'s time over ``row``'s: ``(value, low, high)``.

    Rows sampled together (:func:`_paired`) give the median of the per-round ratios and its 95%
    interval (:func:`fastblocks.bench.timing.paired_ratio`); others the ratio of their medians and
    no interval."""
    if _paired(row, base):
        return paired_ratio(base["samples_ms"], row["samples_ms"])
    return base["median_ms"] / row["median_ms"], None, None


def speedup_intervals(
    rows: Iterable[dict], baseline: str = "eager"
) -> dict[str, tuple[float, float | None, float | None]]:
    """``case -> speedup(row, its baseline twin)`` for every row whose twin under ``baseline``
    (a provider) is among ``rows``."""
    rows = list(rows)
    by_case = {(r["device"], r["case"]): r for r in rows if "device" in r} or {(None, r["case"]): r for r in rows}
    out = {}
    for r in rows:
        base = by_case.get((r.get("device"), baseline_case(r, baseline)))
        if base and r.get("median_ms") and base.get("median_ms"):
            out[r["case"]] = speedup(r, base)
    return out


def speedups(rows: Iterable[dict], baseline: str = "eager") -> dict[str, float]:
    """``case -> speed-up over the baseline twin`` (the value of :func:`speedup_intervals`)."""
    return {case: v[0] for case, v in speedup_intervals(rows, baseline).items()}


def _f(value: float | None, fmt: str = ".3g") -> str:
    return "" if value is None else format(value, fmt)


def _mb(value: int | None) -> str:
    if value is None:
        return ""
    return f"{value / MB:.1f}" if value >= 10 * MB else f"{value / MB:.3g}"


def _num(v: float) -> str:
    """Plain-decimal number with about 3 significant digits (no exponent for big values)."""
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def noisy(r: dict) -> bool:
    """Whether a row's time is not a stable figure: at most 3 samples, or an inter-quartile
    range larger than the median."""
    n = len(r.get("samples_ms") or [])
    return 0 < n <= 3 or r.get("spread_ms", 0.0) > r["median_ms"]


def _ms(r: dict) -> str:
    n = len(r.get("samples_ms") or [])
    mark = " ~" if noisy(r) else ""
    return f"{_num(r['median_ms'])} ± {_num(r['spread_ms'])}" + (f" (n={n})" if n else "") + mark


def _pct_copy(value: float | None) -> str:
    """% of the copy bandwidth; above 100 marked: the case's working set is cache-resident, so the
    yardstick (a copy of a buffer larger than the caches) does not bound it."""
    if value is None:
        return ""
    return f"{value:.0f}" + (" †" if value > 100 else "")


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table; columns empty in every row are left out."""
    keep = [i for i in range(len(header)) if any(row[i] for row in body)]
    lines = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(row[i] for i in keep) + " |" for row in body]
    return "\n".join(lines)


def _speedup(sp: dict[str, tuple[float, float | None, float | None]], r: dict, baseline: str) -> str:
    if r["case"] not in sp:
        return ""
    value, low, high = sp[r["case"]]
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None and r["provider"] != baseline else ""
    return f"{value:.2f}x{interval}"


def op_table(rows: Iterable[dict], baseline: str = "eager") -> str:
    """Markdown table of op-level rows (time is median ± IQR per call; speed-up over ``baseline``)."""
    rows = sort_rows(r for r in rows if r.get("kind") == "op")
    if not rows:
        return ""
    sp = speedup_intervals(rows, baseline)
    header = ["op", "shape", "dtype", "layout", "mode", "provider", "backend", "ms (median ± IQR)", "GB/s",
              "% copy BW", f"vs {baseline}", "saved for bwd MB", "peak MB", "compile s"]  # fmt: skip
    body = [
        [
            r["name"], "x".join(map(str, r["shape"])), r["dtype"], r["layout"], r["mode"], r["provider"],
            r.get("backend") or "", _ms(r), _f(r.get("gbps"), ".2f"), _pct_copy(r.get("pct_copy")),
            _speedup(sp, r, baseline), _mb(r.get("saved_bytes")), _mb(r.get("peak_bytes")),
            _f(r.get("compile_s"), ".1f"),
        ]
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, body)


def model_table(rows: Iterable[dict], baseline: str = "eager") -> str:
    """Markdown table of model-level rows (train = forward + backward + SGD step; speed-up over
    ``baseline``)."""
    rows = sort_rows(r for r in rows if r.get("kind") == "model")
    if not rows:
        return ""
    sp = speedup_intervals(rows, baseline)
    header = ["model", "batch x res", "dtype", "layout", "mode", "provider", "ms (median ± IQR)", "images/s",
              f"vs {baseline}", "TFLOP/s", "% matmul", "saved for bwd MB", "peak MB", "compile s"]  # fmt: skip
    body = [
        [
            r["name"], f"{r['batch_size']} x {r['image_size']}", r["dtype"] + (" autocast" if r.get("autocast") else ""),
            r["layout"], r["mode"], r["provider"], _ms(r), _f(r.get("images_per_s"), ".3g"),
            _speedup(sp, r, baseline), _f(r.get("tflops"), ".3g"), _f(r.get("pct_matmul"), ".0f"),
            _mb(r.get("saved_bytes")) if r["mode"] == "train" else "", _mb(r.get("peak_bytes")),
            _f(r.get("compile_s"), ".1f"),
        ]
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, body)


def tables(rows: Iterable[dict], baseline: str = "eager") -> str:
    """The op table and the model table of ``rows`` (whichever have rows), with a legend;
    speed-ups are over ``baseline`` (a provider)."""
    rows = list(rows)
    parts = [t for t in (op_table(rows, baseline), model_table(rows, baseline)) if t]
    if not parts:
        return "(no results)"
    return "\n\n".join(parts) + "\n\n" + LEGEND


LEGEND = (
    "ms: median per call ± inter-quartile range (n samples). GB/s: the op's nominal bytes (a fused two-pass "
    "implementation's traffic, the same for every provider) per second; % copy BW: of the measured "
    "`copy_` bandwidth. TFLOP/s: eager model FLOPs (torch.utils.flop_counter) per second; % matmul: of "
    "the measured matmul rate. saved for bwd: bytes autograd keeps between forward and backward "
    "(models: parameters excluded). peak: torch.cuda.max_memory_allocated during one call (CUDA only). "
    "vs: the baseline's time over the row's; for providers timed in alternation (CPU), the median over "
    "rounds of the per-round ratio and, in brackets, its 95% interval (sign test); an interval that "
    "contains 1 is no measured difference. "
    "~: not a stable figure (at most 3 samples, or an inter-quartile range above the median). "
    "†: above the copy bandwidth: the case fits in the caches, which the yardstick (a copy larger than "
    "the caches) does not measure."
)


def _ratio_text(value: float | None, what: str) -> str | None:
    return None if value is None else f"{what} {value:.2f}x"


def headline(rows: Iterable[dict], device: str, warning: str | None = None) -> str:
    """One line a person reads at a glance: per model, fused against eager (training and inference
    speed-up, and the bytes a training step keeps for backward as a ratio of eager's), on
    ``device``; op-level rows alone give the median speed-up per mode. ``warning`` (a busy
    machine) is appended to the same line."""
    rows = list(rows)
    sp = speedups(rows)
    parts: list[str] = []
    models = sort_rows(r for r in rows if r.get("kind") == "model" and r["provider"] == "fused")
    seen: dict[tuple, list[str]] = {}
    for r in models:
        key = (r["name"], r["batch_size"], r["image_size"])
        words = seen.setdefault(key, [])
        if r["case"] in sp:
            base = next((e for e in rows if e["case"] == baseline_case(r)), None)
            shaky = noisy(r) or (base is not None and noisy(base))
            words.append(f"{r['mode']} {sp[r['case']]:.2f}x" + (" ~" if shaky else ""))
        if r["mode"] == "train" and r.get("saved_bytes"):
            eager = next((e for e in rows if e["case"] == baseline_case(r) and e.get("saved_bytes")), None)
            if eager is not None:
                words.append(f"saved for backward {r['saved_bytes'] / eager['saved_bytes']:.2f}x eager's")
    for (name, bs, res), words in seen.items():
        if words:
            parts.append(f"{name} (batch {bs} at {res}): " + ", ".join(words))
    if not parts:
        by_mode: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if r.get("kind") == "op" and r["provider"] == "fused" and r["case"] in sp:
                by_mode[r["mode"]].append(sp[r["case"]])
        for mode, values in sorted(by_mode.items(), key=lambda kv: _order(kv[0], _MODE_ORDER)):
            values.sort()
            parts.append(f"ops {mode}: median {values[len(values) // 2]:.2f}x over {len(values)} cases")
    if not parts:
        return f"headline: no fused-vs-eager comparison on {device}"
    line = f"headline, fused vs eager on {device} (speed-up > 1 is faster; ~ not stable): " + "; ".join(parts)
    return line + (f" [WARNING: {warning}]" if warning else "")


# ----------------------------------------------------------------------------- charts
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)


def _providers(rows: list[dict]) -> list[str]:
    return sorted({r["provider"] for r in rows}, key=lambda p: _order(p, _PROVIDER_ORDER))


def _chart_label(r: dict) -> str:
    if r.get("kind") == "op":
        return f"{r['name']} {r['mode']} {'x'.join(map(str, r['shape']))} {r['layout']}"
    return f"{r['name']} {r['mode']} b{r['batch_size']}@{r['image_size']}"


def write_charts(
    rows: Iterable[dict], output_dir: str | os.PathLike, title: str = "", history: Iterable[dict] | None = None
) -> list[Path]:
    """Write the PNG charts of ``rows`` into ``output_dir``; return their paths.

    - ``ops_speedup.png``: speed-up over eager per op case and mode;
    - ``models_speedup.png``: speed-up over eager per model and mode;
    - ``models_memory.png``: memory of a training step per model and provider;
    - ``models_memory_vs_batch.png``: memory against batch size, when several batch sizes are in
      ``history`` (all stored rows of the device; default ``rows``).
    """
    rows = list(rows)
    plt = _plt()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    sp = speedups(rows)
    for kind, fname in (("op", "ops_speedup.png"), ("model", "models_speedup.png")):
        sel = [r for r in sort_rows(rows) if r.get("kind") == kind and r["case"] in sp]
        if not sel:
            continue
        groups = list(dict.fromkeys(_chart_label(r) for r in sel))
        provs = _providers(sel)
        series: dict[str, list[float | None]] = {p: [None] * len(groups) for p in provs}
        for r in sel:
            series[r["provider"]][groups.index(_chart_label(r))] = sp[r["case"]]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) * len(provs) / 2 + 3), 4.5))
        _grouped_bars(ax, groups, series)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("speed-up over eager (x)")
        ax.set_title(f"{title} {'ops' if kind == 'op' else 'models'}: speed-up (higher is better)".strip(), fontsize=9)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    train = [r for r in sort_rows(rows) if r.get("kind") == "model" and r["mode"] == "train"]
    if train:
        cuda = any(r.get("peak_bytes") is not None for r in train)
        field, what = ("peak_bytes", "peak allocated (MB)") if cuda else ("saved_bytes", "saved for backward (MB)")
        configs = sorted({(r["name"], r["batch_size"], r["image_size"]) for r in train})
        groups = [f"{n} b{b}@{s}" for n, b, s in configs]
        provs = _providers(train)
        series = {p: [None] * len(groups) for p in provs}
        for r in train:
            if r.get(field) is not None:
                series[r["provider"]][configs.index((r["name"], r["batch_size"], r["image_size"]))] = r[field] / MB
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) * len(provs) + 3), 4.5))
        _grouped_bars(ax, groups, series)
        ax.set_ylabel(what)
        ax.set_title(f"{title} models: training-step memory, {what} (lower is better)".strip(), fontsize=9)
        fig.tight_layout()
        path = out / "models_memory.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
        by_line: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
        past = [r for r in (history if history is not None else train) if r.get("kind") == "model"]
        for r in (r for r in past if r["mode"] == "train"):
            if r.get(field) is not None:
                key = (r["name"], r["provider"], r["image_size"], r["dtype"], r["layout"])
                by_line[key].append((r["batch_size"], r[field] / MB))
        if any(len({b for b, _ in pts}) > 1 for pts in by_line.values()):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for (name, prov, res, _dt, _lay), pts in sorted(by_line.items()):
                pts.sort()
                ax.plot([b for b, _ in pts], [m for _, m in pts], marker="o", label=f"{name} {prov} @{res}")
            ax.set_xlabel("batch size")
            ax.set_ylabel(what)
            ax.set_title(f"{title} models: memory against batch size".strip(), fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / "models_memory_vs_batch.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


# ----------------------------------------------------------------------------- README
def readme_section(results_root: str | os.PathLike) -> str:
    """The README's benchmark section: per device, the environment, tables and commands.

    Built from every ``*.json`` under ``results_root``; nothing typed by hand.
    """
    by_device: dict[str, list[dict]] = defaultdict(list)
    for path in iter_result_files(results_root):
        try:
            data = load_results(path)
        except ValueError:
            continue
        if not data or "rows" not in data:
            continue
        by_device[data.get("device", path.parent.name)].append(data)
    if not by_device:
        return "No results recorded yet (run `fastblocks bench --quick`, then `python benchmarks/update_readme.py`)."
    out = []
    for device in sorted(by_device, key=lambda d: (not d.startswith("cuda"), d)):
        files = by_device[device]
        name = next((f["environment"].get("device_name") for f in files if f.get("environment")), None)
        out.append(f"### {name or device} (`{device}`)\n")
        for data in sorted(files, key=lambda d: d.get("suite", "")):
            rows = list(data["rows"])
            for r in rows:
                r.setdefault("device", device)
                r.setdefault("suite", data.get("suite", ""))
            rows = one_run_per_comparison(rows, data.get("runs", {}))
            body = "\n\n".join(t for t in (op_table(rows), model_table(rows)) if t)
            if not body:
                continue
            runs = data.get("runs", {})
            used = sorted({r.get("run") for r in rows if r.get("run") in runs}, key=lambda u: runs[u].get("date", ""))
            made = [f"`{runs[u].get('command', '?')}` ({summary_line(runs[u])})" for u in used]
            out.append(
                f"Suite `{data.get('suite', '?')}`, produced by " + ("; ".join(made) or "an unrecorded command") + ":\n"
            )
            out.append(body + "\n")
    out.append(LEGEND)
    return "\n".join(out)


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def replace_between_markers(text: str, section: str) -> str | None:
    """``text`` with what lies between the bench markers replaced by ``section`` (None: no markers)."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i:
        return None
    return text[: i + len(BEGIN)] + "\n" + section.rstrip() + "\n" + text[j:]
