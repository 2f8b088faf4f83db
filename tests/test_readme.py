"""Every Python block of the README runs, so the front door cannot drift from the code.

Each ```python block in README.md is preceded by ``<!-- readme-test: NAME -->``: NAME is a setup
below that defines the block's free variables on small inputs (``x``, ``model``, a checkpoint file
in a temporary folder, ...), and the block then runs as written. A block that cannot run here
says ``<!-- readme-test: skip REASON -->`` (a GPU, data); a block without a marker fails this test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fastblocks

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks() -> list[tuple[str | None, str, int]]:
    text = README.read_text()
    return [(m["marker"], m["code"], text.count("\n", 0, m.start()) + 1) for m in _BLOCK.finditer(text)]


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


def _setup(name: str, tmp_path: Path) -> dict:
    if name == "backends":
        return {}
    if name == "add_relu":
        return {"x": _t(2, 8, 4, 4), "residual": _t(2, 8, 4, 4)}
    if name == "batchnorm":
        return {"x": _t(2, 256, 4, 4), "identity": _t(2, 256, 4, 4), "model": nn.Sequential(nn.BatchNorm2d(4)),
                "process_group": None}  # fmt: skip
    if name == "bn_relu_conv":
        return {"x": _t(2, 64, 6, 6), "scale": torch.rand(64) + 0.5, "shift": _t(64), "weight": _t(128, 64, 3, 3),
                "bn": nn.BatchNorm2d(64), "conv": nn.Conv2d(64, 128, 3, padding=1, bias=False)}  # fmt: skip
    if name == "tail":
        return {
            "x": _t(2, 64, 6, 6), "identity": _t(2, 256, 6, 6), "bn2": nn.BatchNorm2d(64),
            "conv3": nn.Conv2d(64, 256, 1, bias=False), "bn3": nn.BatchNorm2d(256), "scale": torch.rand(64) + 0.5,
            "shift": _t(64), "w": _t(256, 64, 1, 1), "bn_weight": torch.rand(256) + 0.5, "bn_bias": _t(256),
            "running_mean": _t(256), "running_var": torch.rand(256) + 0.5,
            "conv": nn.Conv2d(64, 128, 3, padding=1, bias=False), "bn": nn.BatchNorm2d(128),
        }  # fmt: skip
    if name == "dense_block":
        from fastblocks.models.densenet import _DenseBlock

        return {"x": _t(2, 16, 8, 8), "torchvision_block": _DenseBlock(2, 16, bn_size=4, growth_rate=8, drop_rate=0.0)}
    if name == "models":
        from fastblocks.models import resnet50

        torch.save(resnet50(fused=False).state_dict(), tmp_path / "resnet50.pth")  # "a checkpoint you have"
        return {"torch": torch, "torchvision_model": resnet50(fused=False)}
    raise AssertionError(f"README block marked with an unknown setup {name!r}: add it to tests/test_readme.py")


def test_every_python_block_is_marked():
    blocks = _blocks()
    assert blocks, "no ```python blocks found in README.md"
    unmarked = [line for marker, _, line in blocks if marker is None]
    assert not unmarked, f"README.md python blocks at lines {unmarked} have no <!-- readme-test: ... --> marker"


@pytest.mark.parametrize(
    "marker, code, line", _blocks(), ids=lambda v: v if isinstance(v, str) and " " not in v else None
)
def test_readme_block_runs(marker, code, line, tmp_path, monkeypatch):
    if marker is None:
        pytest.fail(f"README.md line {line}: unmarked block (see test_every_python_block_is_marked)")
    if marker.startswith("skip"):
        pytest.skip(f"README.md line {line}: {marker[4:].strip()}")
    monkeypatch.chdir(tmp_path)
    namespace = _setup(marker, tmp_path)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    finally:
        fastblocks.set_backend(None)  # the backends block sets a global choice
