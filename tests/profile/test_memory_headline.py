"""``fastblocks memory``'s one-line headline and its ``--plot`` default folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastblocks import cli


def test_memory_ends_with_the_headline_and_plots_into_its_own_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    argv = ["memory", "densenet121", "--device", "meta", "--batch-size", "2", "--image-size", "64", "--quiet"]
    assert cli.main([*argv, "--plot", "--sweep", "1,2"]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    head = lines[-1]
    assert head.startswith("headline (densenet121, batch 2, meta), of eager's: checkpoint saved for backward ")
    assert "; fused saved for backward 0.0" in head  # a few percent of eager's
    plots = list((tmp_path / "runs" / "memory").glob("*/memory_densenet121.png"))
    assert len(plots) == 1 and plots[0].stat().st_size > 0
    assert any(f"plot written to {plots[0].relative_to(tmp_path)}" in line for line in lines)
