"""``fastblocks experiment degradation`` end to end at a tiny size (4 models, a few steps each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastblocks import cli
from tests.train.conftest import HAS_SKLEARN


def test_degradation_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = "digits" if HAS_SKLEARN else "synthetic"  # the command's own default is digits
    rc = cli.main(
        ["experiment", "degradation", "--data", data, "--steps", "3", "--batch-size", "256", "--image-size", "8",
         "--model-arg", "widths=(4,4,4)", "--output", str(tmp_path)]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "[plain56] done" in out
    doc = json.loads((tmp_path / "degradation.json").read_text())
    assert list(doc["runs"]) == ["plain20", "plain56", "resnet20", "resnet56"]
    for name, run in doc["runs"].items():
        assert run["steps"] == 3 and run["layers"] == int(name[-2:]) and run["residual"] == name.startswith("resnet")
        assert run["curve"][-1]["step"] == 3
        assert 0 <= run["final_train_error"] <= 100 and 0 <= run["final_test_error"] <= 100
        assert (tmp_path / name / "metrics.csv").is_file()
    assert set(doc["verdict"]) == {"plain", "resnet"}
    table = (tmp_path / "degradation.md").read_text()
    assert table.count("\n| plain") == 2 and table.count("\n| resnet") == 2 and "final train err" in table
    assert (tmp_path / "degradation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_degradation_rejects_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["experiment", "degradation", "--models", "plain20,plain999", "--output", str(tmp_path)])
    assert rc == 1 and "unknown model(s) plain999" in capsys.readouterr().err
