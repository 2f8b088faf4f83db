"""``fastblocks train`` / ``fastblocks experiment`` argument parsing and user-facing errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastblocks import cli
from fastblocks.train.command import config_from_args


def parse(*argv: str):
    return cli.build_parser().parse_args(["train", *argv])


def test_defaults() -> None:
    cfg = config_from_args(parse())
    assert (cfg.model, cfg.data, cfg.epochs, cfg.batch_size, cfg.lr) == ("resnet20", "synthetic", 1, 128, 0.1)
    assert cfg.fused and not cfg.compile and not cfg.channels_last and cfg.amp == "none"
    assert cfg.output.replace("\\", "/") == "runs/resnet20"
    assert cfg.schedule == "cosine" and cfg.weight_decay == 1e-4 and cfg.momentum == 0.9


def test_every_option() -> None:
    args = parse(
        "--model", "densenet121", "--model-arg", "drop_rate=0.1", "--model-arg", "widths=(8, 16, 32)",
        "--model-arg", "stem=cifar", "--eager", "--compile", "--channels-last", "--data", "cifar10:/d",
        "--image-size", "24", "--num-workers", "2", "--epochs", "3", "--batch-size", "64", "--lr", "0.2",
        "--schedule", "step", "--warmup-epochs", "0.5", "--milestones", "0.3", "0.6", "0.9", "--gamma", "0.2",
        "--momentum", "0.8", "--nesterov", "--weight-decay", "5e-4", "--label-smoothing", "0.1", "--amp", "fp16",
        "--output", "out", "--resume", "--checkpoint-every", "10", "--seed", "7", "--deterministic",
        "--max-steps", "5", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.model_kwargs == {"drop_rate": 0.1, "widths": (8, 16, 32), "stem": "cifar"}
    assert not cfg.fused and cfg.compile and cfg.channels_last
    assert (cfg.data, cfg.image_size, cfg.num_workers) == ("cifar10:/d", 24, 2)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule, cfg.warmup_epochs) == (3, 64, 0.2, "step", 0.5)
    assert cfg.milestones == (0.3, 0.6, 0.9) and cfg.gamma == 0.2
    assert (cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.8, True, 5e-4)
    assert (cfg.label_smoothing, cfg.amp) == (0.1, "fp16")
    assert (cfg.output, cfg.resume, cfg.checkpoint_every, cfg.seed, cfg.deterministic) == ("out", True, 10, 7, True)
    assert (cfg.max_steps, cfg.device, cfg.progress) == (5, "cpu", False)
    cfg.validate()


@pytest.mark.parametrize(
    "argv",
    [
        ["--amp", "fp8"],
        ["--schedule", "linear"],
        ["--fused", "--eager"],
        ["--model-arg", "novalue"],
        ["--batch-size", "0"],
        ["--max-steps", "-1"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--data", "--amp", "--resume", "--deterministic", "--max-steps", "--warmup-epochs"):
        assert opt in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "cifar10:{tmp}/none"], "is not a directory"),
        (["--data", "cifar10:{tmp}"], "missing file {tmp}/data_batch_1"),
        (["--data", "imagefolder:{tmp}"], "must hold train/<class>/<image>"),
        (["--data", "mnist"], "unknown --data 'mnist'"),
        (["--model", "resnet7"], "unknown model 'resnet7'"),
        (["--resume"], "no checkpoint at"),
        (["--batch-size", "4096"], "larger than the 1024 training images"),
    ],
)
def test_user_errors_are_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc = cli.main(["train", "--image-size", "8", "--output", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("fastblocks train: error: ") and message.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err


def test_train_writes_metrics_and_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(
        ["train", "--model-arg", "widths=(4,8,8)", "--image-size", "8", "--batch-size", "256", "--epochs", "2",
         "--output", str(tmp_path), "--seed", "1"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "epoch 2/2 step 8" in out and "img/s" in out
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [(r["epoch"], r["step"], r["partial"]) for r in rows] == [(1, 4, False), (2, 8, False)]
    for key in ("train_loss", "test_loss", "train_top1", "test_top5", "images_per_s", "peak_memory_mb"):
        assert isinstance(rows[-1][key], float) and rows[-1][key] >= 0
    assert rows[-1]["memory_kind"] in ("cpu_max_rss", "cuda_max_allocated")
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,step,partial,lr,train_loss") and len(csv) == 3
    assert json.loads((tmp_path / "config.json").read_text())["model_kwargs"] == {"widths": [4, 8, 8]}
    assert (tmp_path / "checkpoint.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_experiment_parser() -> None:
    args = cli.build_parser().parse_args(
        ["experiment", "degradation", "--steps", "10", "--batch-size", "32", "--models", "plain20,resnet20"]
    )
    assert (args.experiment, args.steps, args.batch_size) == ("degradation", 10, 32)
    assert args.models == ("plain20", "resnet20")
    assert args.data == "digits" and args.fused
