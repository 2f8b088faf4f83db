"""Model-level benchmarks in pytest-benchmark: ResNet-50 and DenseNet-201, a training step and
inference, eager against fused (and torch.compile with ``--bench-compile`` on the CPU; always on
CUDA).

Sizes follow :func:`fastblocks.bench.models.default_config`: the real size on CUDA (batch 256 /
64 at 224, bf16 autocast, channels_last); on the CPU the quick size (batch 4 at 112, fp32), so
that ``pytest --benchmark`` finishes in minutes. ``fastblocks bench --models`` runs the same
models with the providers interleaved (the better comparison on a shared machine).

Run: ``pytest --benchmark -k models`` (or ``pytest benchmarks/bench_models.py --benchmark-only``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastblocks.bench import models as model_bench
from fastblocks.bench.ops import provider_available
from fastblocks.bench.timing import Timing, synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODELS = ("resnet50", "densenet201")
PROVIDERS = ("eager", "fused", "compile", "fused-compile")
_STATE: dict[str, dict] = {}  # one set of weights per model, shared by its providers


@pytest.mark.parametrize("mode", model_bench.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model", MODELS)
def test_model(request, benchmark, bench_env, _bench_rows, model, provider, mode):
    reason = provider_available(provider, DEVICE, allow_cpu_compile=request.config.getoption("--bench-compile"))
    if reason is not None:
        pytest.skip(reason)
    module, why = model_bench.load_models()
    if module is None:
        pytest.skip(why)
    builder = model_bench.builder_for(module, model)
    cfg = model_bench.default_config(DEVICE, model, quick=DEVICE.type == "cpu")
    if model not in _STATE:
        torch.manual_seed(0)
        _STATE[model] = copy.deepcopy(builder(fused=False).state_dict())
    net = model_bench.build_model(builder, provider, _STATE[model], DEVICE, cfg)
    x, y = model_bench.model_inputs(cfg, DEVICE)
    train_step, infer_step = model_bench.model_steps(net, x, y, cfg, DEVICE)
    step = train_step if mode == "train" else infer_step
    net.train(mode == "train")

    def call() -> None:
        step()
        synchronize(DEVICE)

    for _ in range(3 if provider.endswith("compile") else 2):  # warm-up (and compile)
        call()
    benchmark.pedantic(call, rounds=max(5, cfg.timing.get("min_reps", 5)), iterations=1)
    st = benchmark.stats.stats
    timing = Timing(st.median * 1e3, st.iqr * 1e3, [s * 1e3 for s in st.data], 1, "pytest-benchmark")
    flops = model_bench.count_flops(builder(fused=False).to(DEVICE), cfg, DEVICE)[mode]
    row = model_bench.finish_row(model, provider, mode, net, x, cfg, DEVICE, flops, timing, step, bench_env)
    benchmark.extra_info.update({k: row.get(k) for k in ("provider", "mode", "images_per_s", "saved_bytes")})
    _bench_rows.setdefault("bench_models", []).append(row)
