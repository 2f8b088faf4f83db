"""The degradation experiment (He et al. 2016, "Deep Residual Learning", Sec. 4.2 and Fig. 6).

A deeper *plain* network (a stack of conv-BN-ReLU, no shortcuts) trains to a *higher* training
error than a shallower one, although it could copy it and add identity layers: an optimization
difficulty, not overfitting. With identity shortcuts the deeper network trains better. The
paper shows it on CIFAR-10 with plain-20/56 vs ResNet-20/56: training error (thin lines) and
test error (bold) against iterations.

:func:`run_degradation` trains each model with the paper's recipe (SGD, momentum 0.9, weight
decay 1e-4, batch 128, lr 0.1 divided by 10 at 50% and 75% of the steps -- the paper's 32k and
48k of 64k; random crop with 4-pixel padding and flip on CIFAR), through
:func:`fastblocks.train.train`, and writes

- ``DIR/degradation.png``: the figure (one panel for the plain nets, one for the ResNets);
- ``DIR/degradation.json``: the curves and final numbers of every model;
- ``DIR/degradation.md``: the table, the settings and the command;
- ``DIR/<model>/``: each run's metrics.csv/json and checkpoint.

On the default data (scikit-learn's digits, offline) the learning rate is 0.02, not 0.1: see
:func:`default_lr`. What a CPU shows in about 10 minutes, and the GPU command for CIFAR-10, are
in :mod:`fastblocks.experiments.command` (``fastblocks experiment degradation --help``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastblocks.train.checkpoint import atomic_write_text

__all__ = ["DEFAULT_MODELS", "DegradationConfig", "plot_curves", "run_degradation"]

DEFAULT_MODELS = ("plain20", "plain56", "resnet20", "resnet56")


@dataclass
class DegradationConfig:
    """Settings of :func:`run_degradation`.

    ``data`` is ``digits`` (offline, small) or ``cifar10:DIR`` (the paper's). ``steps`` is the
    number of SGD iterations per model. ``None`` picks the per-dataset default
    (:func:`resolve_defaults`): on CIFAR-10 the paper's 64,000 steps, 32x32 and lr 0.1; on the
    digits 200 steps at 16x16 and lr 0.02 (about 7 minutes on one loaded CPU core).
    """

    data: str = "digits"
    steps: int | None = None
    batch_size: int = 128
    lr: float | None = None  # 0.1 on CIFAR-10 (the paper's), 0.02 on the digits (see default_lr)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.5, 0.75)
    image_size: int | None = None
    models: tuple[str, ...] = DEFAULT_MODELS
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    output: str = "runs/degradation"
    seed: int = 0
    fused: bool = True
    device: str = "auto"
    deterministic: bool = False
    num_workers: int = 0


def resolve_defaults(cfg: DegradationConfig) -> tuple[int, int | None, float]:
    """``(steps, image_size, lr)`` with the per-dataset defaults filled in."""
    cifar = cfg.data.startswith("cifar10")
    steps = cfg.steps if cfg.steps is not None else (64000 if cifar else 200)
    image_size = cfg.image_size if cfg.image_size is not None else (None if cifar else 16)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.data)
    return steps, image_size, lr


def default_lr(data: str) -> float:
    """The paper's 0.1 on CIFAR-10; 0.02 elsewhere (the digits).

    On the digits at lr 0.1 ResNet-56 (fused and eager alike) diverges in its first steps (loss
    2.7 -> 10 by step 4, then stuck near 2.1; measured at 16x16, batch 128, seed 0), the
    instability He et al. report for ResNet-110 on CIFAR-10 at 0.1; at 0.02 it trains (73.7%
    training accuracy after 44 steps) while plain-56 still sits at chance.
    """
    return 0.1 if data.startswith("cifar10") else 0.02


def _depth(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def run_degradation(
    cfg: DegradationConfig, *, log: Callable[[str], None] = print, command: str | None = None
) -> dict[str, Any]:
    """Train every model of ``cfg.models`` for ``steps`` iterations; write the figure, JSON and table.

    Returns:
        the JSON document written to ``DIR/degradation.json``.
    """
    from fastblocks.train.data import load_data
    from fastblocks.train.trainer import TrainConfig, train

    steps, image_size, lr = resolve_defaults(cfg)
    if steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {steps} and {cfg.batch_size}")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_data(cfg.data, image_size, seed=cfg.seed)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    epochs = math.ceil(steps / steps_per_epoch)
    log(
        f"degradation experiment on {train_set.name} ({len(train_set)} train / {len(test_set)} test images, "
        f"{train_set.image_size}x{train_set.image_size}): {', '.join(cfg.models)}, {steps} steps of batch "
        f"{cfg.batch_size} (~{steps / steps_per_epoch:.1f} epochs) each"
    )
    runs: dict[str, Any] = {}
    for name in cfg.models:
        tcfg = TrainConfig(
            model=name,
            model_kwargs=dict(cfg.model_kwargs),
            data=cfg.data,
            image_size=image_size,
            epochs=epochs,
            batch_size=cfg.batch_size,
            lr=lr,
            schedule="step",
            milestones=tuple(cfg.milestones),
            schedule_steps=steps,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            fused=cfg.fused,
            output=str(out / name),
            seed=cfg.seed,
            deterministic=cfg.deterministic,
            max_steps=steps,
            num_workers=cfg.num_workers,
            device=cfg.device,
            progress=False,
        )
        t0 = time.perf_counter()
        result = train(tcfg, log=lambda s, n=name: log(f"[{n}] {s}"))
        seconds = time.perf_counter() - t0
        curve = [
            {"step": r["step"], "train_error": 100.0 - r["train_top1"], "test_error": 100.0 - r["test_top1"]}
            for r in result.history
        ]
        last = curve[-1]
        final_train_error = _final_train_error(result.history)
        images = sum(r["train_images"] for r in result.history)
        train_seconds = sum(r["epoch_time_s"] for r in result.history)
        runs[name] = {
            "layers": _depth(name),
            "residual": not name.startswith("plain"),
            "params": sum(p.numel() for p in result.model.parameters()),
            "steps": result.step,
            "seconds": seconds,
            "images_per_s": images / max(1e-9, train_seconds),
            "final_train_error": final_train_error,
            "final_test_error": last["test_error"],
            "best_test_error": min(c["test_error"] for c in curve),
            "final_train_loss": result.history[-1]["train_loss"],
            "curve": curve,
        }
        log(
            f"[{name}] done in {seconds:.0f} s: training error {final_train_error:.2f}%, "
            f"test error {last['test_error']:.2f}%"
        )
    doc = {
        "experiment": "degradation (He et al. 2016, Fig. 6)",
        "command": command,
        "config": {
            **asdict(cfg),
            "steps": steps,
            "image_size": image_size,
            "lr": lr,
            "milestones": list(cfg.milestones),
            "models": list(cfg.models),
        },
        "dataset": {
            "name": train_set.name,
            "train": len(train_set),
            "test": len(test_set),
            "image_size": train_set.image_size,
        },
        "epochs": steps / steps_per_epoch,
        "runs": runs,
        "verdict": _verdict(runs),
    }
    atomic_write_text(out / "degradation.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out / "degradation.md", _markdown(doc))
    plot_curves(runs, out / "degradation.png", title=f"{train_set.name}, {steps} iterations, batch {cfg.batch_size}")
    log(f"wrote {out / 'degradation.png'}, {out / 'degradation.json'}, {out / 'degradation.md'}")
    return doc


def _final_train_error(history: list[dict[str, Any]]) -> float:
    """Training error (%) of the last epoch; a final partial epoch shorter than half an epoch is
    merged with the epoch before it (weighted by images), so a tail of one or two batches does not
    decide the number."""
    last = history[-1]
    images, correct = last["train_images"], last["train_top1"] * last["train_images"]
    if last["partial"] and len(history) > 1 and last["train_images"] < history[-2]["train_images"] / 2:
        prev = history[-2]
        images += prev["train_images"]
        correct += prev["train_top1"] * prev["train_images"]
    return 100.0 - correct / max(images, 1)


def _verdict(runs: dict[str, Any]) -> dict[str, Any]:
    """Compare the final training errors of the shallow and deep model of each family."""
    verdict: dict[str, Any] = {}
    for family, residual in (("plain", False), ("resnet", True)):
        members = sorted((r["layers"], n) for n, r in runs.items() if r["residual"] == residual)
        if len(members) >= 2:
            (_, shallow), (_, deep) = members[0], members[-1]
            a, b = runs[shallow]["final_train_error"], runs[deep]["final_train_error"]
            verdict[family] = {
                "shallow": shallow,
                "deep": deep,
                "train_error_shallow": a,
                "train_error_deep": b,
                "deeper_trains_worse": b > a,
            }
    return verdict


def _markdown(doc: dict[str, Any]) -> str:
    cfg, ds = doc["config"], doc["dataset"]
    lines = [
        "# Degradation: plain vs residual networks (He et al. 2016, Fig. 6)",
        "",
        f"Data: {ds['name']} ({ds['train']} train / {ds['test']} test images, {ds['image_size']}x{ds['image_size']}). "
        f"{cfg['steps']} iterations of batch {cfg['batch_size']} (~{doc['epochs']:.1f} epochs), SGD lr {cfg['lr']} "
        f"(x0.1 at {', '.join(f'{m:g}' for m in cfg['milestones'])} of the run), momentum {cfg['momentum']}, "
        f"weight decay {cfg['weight_decay']}, {'fused' if cfg['fused'] else 'eager'} models, seed {cfg['seed']}.",
        "",
        "Errors are top-1 in %. Training error: on the augmented training batches of the last epoch, in "
        "training mode (the paper's thin curves); a final partial epoch of less than half an epoch is merged "
        "with the epoch before it. Test error: the whole test set, after the last step.",
        "",
        "| model | layers | params | final train err | final test err | best test err | time (s) | img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in doc["runs"].items():
        lines.append(
            f"| {name} | {r['layers']} | {r['params']:,} | {r['final_train_error']:.2f} | {r['final_test_error']:.2f} "
            f"| {r['best_test_error']:.2f} | {r['seconds']:.0f} | {r['images_per_s']:.0f} |"
        )
    lines.append("")
    for family, v in doc["verdict"].items():
        word = "higher" if v["deeper_trains_worse"] else "lower or equal"
        lines.append(
            f"- {family}: {v['deep']} ends with {word} training error than {v['shallow']} "
            f"({v['train_error_deep']:.2f}% vs {v['train_error_shallow']:.2f}%)."
        )
    if doc.get("command"):
        lines += ["", f"Command: `{doc['command']}`"]
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict[str, Any], path: str | Path, *, title: str = "") -> None:
    """The paper's figure: error (%) vs iterations, training error thin and dashed, test error bold.

    One panel for the plain networks and one for the ResNets; a color per depth.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    families = [("plain networks", False), ("ResNets", True)]
    families = [(t, res) for t, res in families if any(r["residual"] == res for r in runs.values())]
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.2), sharey=True, squeeze=False)
    depths = sorted({r["layers"] for r in runs.values()})
    colors = {d: c for d, c in zip(depths, ["tab:orange", "tab:red", "tab:blue", "tab:green", "tab:purple"])}
    top = 0.0
    for ax, (label, residual) in zip(axes[0], families):
        for name, r in runs.items():
            if r["residual"] != residual:
                continue
            steps = [c["step"] for c in r["curve"]]
            color = colors.get(r["layers"], "black")
            train_err = [c["train_error"] for c in r["curve"]]
            test_err = [c["test_error"] for c in r["curve"]]
            top = max(top, *train_err, *test_err)
            ax.plot(steps, train_err, color=color, linewidth=0.9, linestyle="--", label=f"{name} train")
            ax.plot(steps, test_err, color=color, linewidth=2.4, label=f"{name} test")
        ax.set_title(label)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("error (%)")
    axes[0][0].set_ylim(0, min(100.0, top * 1.05 + 1))
    if title:
        fig.suptitle(title + "  (dashed: training error, bold: test error)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def models_arg(text: str) -> tuple[str, ...]:
    """Parse ``--models plain20,plain56,...`` (registry names)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("--models needs at least one model name")
    return names


def _check_models(names: Sequence[str]) -> None:
    from fastblocks.models.registry import list_models

    available = set(list_models())
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"unknown model(s) {', '.join(missing)}; available: {', '.join(sorted(available))}")
