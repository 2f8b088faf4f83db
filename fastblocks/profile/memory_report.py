"""The memory profiler's output: the per-implementation table, the ``--max-batch`` lines, the
``--json`` dict and the plot (``fastblocks memory ... --plot``).

Formatting only: nothing here runs a step. Re-exported by :mod:`fastblocks.profile.memory`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from fastblocks.profile.memory_config import _GIB, _MIB, MemoryConfig, dtype_of, lower_bound
from fastblocks.profile.memory_step import StepMemory

# ----------------------------------------------------------------------------------------------
# Report and plot
# ----------------------------------------------------------------------------------------------


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / _MIB:,.1f}"


_ROWS: list[tuple[str, Callable[[StepMemory], int | None]]] = [
    ("parameters", lambda r: r.parameters),
    ("buffers", lambda r: r.buffers),
    ("gradients", lambda r: r.gradients),
    ("optimizer state (momentum)", lambda r: r.optimizer_state),
    ("saved for backward", lambda r: r.saved_for_backward),
    ("  lower bound", lambda r: r.lower_bound),
    ("activations held after forward", lambda r: r.activations_held),
    ("peak in forward", lambda r: r.phases.get("forward")),
    ("peak in backward", lambda r: r.phases.get("backward")),
    ("peak in optimizer step", lambda r: r.phases.get("optimizer")),
    ("transient peak", lambda r: r.transient_peak),
    ("total peak", lambda r: r.total_peak),
]


def format_report(config: MemoryConfig, results: Sequence[StepMemory]) -> str:
    """The breakdown as a table (MiB), one column per implementation, then notes."""
    ok = [r for r in results if r.status == "ok"]
    layout = "channels_last" if config.channels_last else "NCHW"
    lines = [
        f"{config.model}: training step, batch {config.batch_size}, {config.size}×{config.size}, {config.dtype}, "
        f"{layout}, device {config.device}"
    ]
    if ok:
        lines[0] += f" -- {ok[0].method}"
        rows: list[tuple[str, Callable[[StepMemory], int | None]]] = list(_ROWS)
        if config.device == "cpu":
            rows[-1] = ("total peak (tracked tensors)", rows[-1][1])
            rows.append(("total peak from RSS", lambda r: r.rss.get("rss_total_peak")))
            rows.append(("meta estimate of total peak", lambda r: r.estimate.get("total_peak")))
        head = ["MiB", *[r.impl for r in ok]]
        table = [head] + [[label, *[_mib(get(r)) for r in ok]] for label, get in rows]
        if config.device == "cpu":
            table.append(["  estimate error vs tracked", *[_pct(r.estimate.get("error_vs_tracked")) for r in ok]])
            table.append(["  estimate error vs RSS", *[_pct(r.estimate.get("error_vs_rss")) for r in ok]])
        table.append(["seconds (measured step)", *[f"{r.seconds:.2f}" for r in ok]])
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    for r in results:
        if r.estimate.get("error"):
            lines.append(f"{r.impl}: {r.estimate['error']}")
        if r.status == "oom":
            lines.append(f"{r.impl}: OUT OF MEMORY -- {r.message}")
        elif r.status != "ok":
            lines.append(f"{r.impl}: {r.status} -- {r.message}")
        elif r.message:
            lines.append(f"{r.impl}: {r.message}")
    bound = lower_bound(config.model, config.batch_size, config.size, dtype_of(config.dtype))
    if bound:
        lines.append(f"note: lower bound = {bound[1]}")
    lines.append(
        "note: saved for backward = storages packed by saved-tensor hooks (parameters and buffers excluded, input and "
        "labels included); activations held = live bytes after forward - before (hook-independent cross-check)"
    )
    lines.append("note: transient peak = total peak - the highest resting level (after forward/backward/step)")
    if config.device == "meta":
        lines.append(
            "note: meta = estimate (op outputs alive at each moment; no kernel workspaces, no allocator rounding)"
        )
    return "\n".join(lines)


def format_max_batch(config: MemoryConfig, found: Sequence[dict[str, Any]]) -> str:
    """The ``--max-batch`` results as text."""
    lines = [
        f"{config.model}: largest batch per implementation, {config.size}×{config.size}, {config.dtype}, device {config.device}"
    ]
    for f in found:
        if f.get("status") != "ok":
            lines.append(f"  {f['impl']:<11} {f.get('status')}: {f.get('message', '')}")
            continue
        peak = f.get("peak_bytes")
        more = " (search limit reached)" if f.get("limit_reached") else ""
        lines.append(
            f"  {f['impl']:<11} max batch {f['max_batch']:>6}{more}  peak {_mib(peak if peak and peak > 0 else None)} MiB"
            f"  of a {f['budget_bytes'] / _GIB:.2f} GiB budget"
        )
    if found and found[0].get("method"):
        lines.append(f"note: {found[0]['method']}")
    return "\n".join(lines)


def report_dict(
    config: MemoryConfig,
    results: Sequence[StepMemory],
    peaks: dict[str, list[tuple[int, int | None]]] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``--json`` output: configuration, lower bound, one breakdown per implementation, sweep."""
    bound = lower_bound(config.model, config.batch_size, config.size, dtype_of(config.dtype))
    out: dict[str, Any] = {
        "config": {**dataclasses.asdict(config), "image_size": config.size, "impl": [r.impl for r in results]},
        "unit": "bytes",
        "lower_bound": {"bytes": bound[0], "definition": bound[1]} if bound else None,
        "results": [r.to_dict() for r in results],
        "notes": list(notes),
    }
    if peaks is not None:
        out["sweep"] = {impl: [{"batch_size": b, "total_peak": p} for b, p in pts] for impl, pts in peaks.items()}
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def plot(
    path: str,
    config: MemoryConfig,
    results: Sequence[StepMemory],
    peaks: dict[str, list[tuple[int, int | None]]],
) -> None:
    """Three panels: total peak against batch size per implementation (with the floor that any
    implementation needs: weights, gradients, momentum and the activation lower bound); bytes
    saved for backward per module along the depth; and their running sum (eager DenseNet's
    concatenations make it quadratic within each block, the fused blocks keep it flat)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5))
    for impl, points in peaks.items():
        xs = [b for b, p in points if p is not None]
        ax1.plot(xs, [p / _GIB for b, p in points if p is not None], marker="o", label=impl)
    batches = sorted({b for pts in peaks.values() for b, _ in pts})
    bounds = [lower_bound(config.model, b, config.size, dtype_of(config.dtype)) for b in batches]
    ok = [r for r in results if r.status == "ok"]
    if batches and ok and all(bounds):
        state = ok[0].parameters + ok[0].buffers + ok[0].gradients + ok[0].optimizer_state
        floor = [(state + bd[0]) / _GIB for bd in bounds if bd]
        ax1.plot(batches, floor, "k--", label="weights + grads + momentum + activation lower bound")
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("total peak (GiB)")
    ax1.set_title(f"{config.model}: peak memory of a training step ({config.device})")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize="small")

    for r in ok:
        if not r.per_module_saved:
            continue
        n = max(len(r.module_order), 1)
        pts = sorted((r.module_order.get(name, n) / n, b) for name, b in r.per_module_saved)
        ax2.plot([x for x, _ in pts], [b / _MIB for _, b in pts], ".", markersize=3, label=r.impl)
        xs, cum, total = [0.0], [0.0], 0
        for x, b in pts:
            total += b
            xs.append(x)
            cum.append(total / _MIB)
        ax3.step(xs, cum, where="post", label=f"{r.impl} ({total / _MIB:,.0f} MiB)")
    for ax, what in ((ax2, "per module (MiB)"), (ax3, "running sum (MiB)")):
        ax.set_xlabel("depth (module position in definition order: 0 = stem, 1 = classifier)")
        ax.set_ylabel(f"saved for backward, {what}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax2.set_title(f"bytes saved by each module, batch {config.batch_size}")
    ax3.set_title(f"bytes saved along the depth, batch {config.batch_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
