"""What the suite collects: CUDA cases only where CUDA is, never the ``cuda`` backend on CPU tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers import cuda_backend_on_cpu, runs_on_cuda


def _item(**params: object) -> SimpleNamespace:
    return SimpleNamespace(callspec=SimpleNamespace(params=params))


@pytest.mark.parametrize(
    "params,never,on_cuda",
    [
        ({"backend": "cuda"}, True, False),
        ({"backend": "cuda", "device": "cpu"}, True, False),
        ({"backend": "cuda", "device": "cuda"}, False, True),
        ({"backend": "cuda", "device": "cuda:1"}, False, True),
        ({"backend": "triton", "device": "cpu"}, False, False),
        ({"backend": "cpu"}, False, False),
        ({}, False, False),
    ],
)
def test_cuda_backend_on_cpu_items_are_recognised(params: dict, never: bool, on_cuda: bool) -> None:
    item = _item(**params)
    assert cuda_backend_on_cpu(item) is never
    assert runs_on_cuda(item) is on_cuda


def test_no_collected_item_runs_the_cuda_backend_on_cpu_tensors(request: pytest.FixtureRequest) -> None:
    leftover = [item.nodeid for item in request.session.items if cuda_backend_on_cpu(item)]
    assert not leftover, leftover[:5]
