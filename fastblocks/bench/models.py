"""Model-level benchmarks: a training step and inference, per provider, same weights.

Providers (each starts from the same ``state_dict``, dtype, layout and batch):

=============  ============================================================================
eager          ``fastblocks.models.<name>(fused=False)``: the torchvision-equivalent model
compile        ``torch.compile`` of the eager model
checkpoint     the eager twin with ``memory_efficient=True`` (torchvision's checkpointed
               DenseNet; models without that option skip it)
fused          ``fastblocks.models.<name>(fused=True)``
fused-compile  ``torch.compile`` of the fused model
folded         inference only: :func:`fastblocks.fold_bn` of the eager model (BN folded into
               the convolutions; conv + bias (+ residual) + ReLU in one oneDNN/cuDNN call)
=============  ============================================================================

Training step = ``zero_grad``, forward under autocast (when the dtype is not fp32), cross
entropy on random labels, backward, SGD (momentum 0.9) step. Inference = ``eval()`` forward
under ``torch.inference_mode``. Warm-up steps come first; a compile provider's compile time is
its first step minus the median step, reported apart (``compile_s``). FLOPs are counted once
on the eager model with ``torch.utils.flop_counter`` (the math is the same for every provider;
checkpointing's recomputation is not counted).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fastblocks.bench.memory import CUDA_PEAK, SAVED, cuda_peak_bytes, saved_bytes
from fastblocks.bench.ops import dtype_name
from fastblocks.bench.timing import Timing, measure_interleaved, synchronize

MODELS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                           "densenet121", "densenet169", "densenet201")  # fmt: skip
PROVIDERS: tuple[str, ...] = ("eager", "compile", "checkpoint", "fused", "fused-compile", "folded")
MODES: tuple[str, ...] = ("train", "infer")
# Providers that apply to some modes only (the others run every mode): a folded model cannot train.
_PROVIDER_MODES: dict[str, tuple[str, ...]] = {"folded": ("infer",)}


def provider_modes(provider: str, modes: tuple[str, ...] = MODES) -> tuple[str, ...]:
    """The modes of ``modes`` that ``provider`` runs (``folded``: ``infer`` only)."""
    allowed = _PROVIDER_MODES.get(provider, MODES)
    return tuple(m for m in modes if m in allowed)


def load_models() -> tuple[object | None, str | None]:
    """``(fastblocks.models, None)``, or ``(None, why it cannot be used)``."""
    try:
        module = importlib.import_module("fastblocks.models")
    except Exception as exc:  # an unfinished or broken package must not break the benchmarks
        return None, f"fastblocks.models does not import ({type(exc).__name__}: {exc})"
    if not any(builder_for(module, m) is not None for m in MODELS):
        return None, "fastblocks.models defines no model builders yet"
    return module, None


def builder_for(module: object, name: str) -> Callable[..., nn.Module] | None:
    """The builder of model ``name``: ``module.<name>``, else the one the model registry names."""
    fn = getattr(module, name, None)
    if callable(fn):
        return fn
    try:
        registry = importlib.import_module("fastblocks.models.registry")
        available = registry.list_models()
    except Exception:  # no registry (yet), or one of its model files does not import
        return None
    return functools.partial(registry.get_model, name) if name in available else None


@dataclass
class ModelConfig:
    """What one model-level measurement runs.

    Attributes:
        batch_size, image_size: input ``[batch_size, 3, image_size, image_size]``.
        dtype: fp32 (no autocast) or the autocast dtype (bf16/fp16).
        channels_last: model and input in NHWC.
        num_classes: classifier size.
        timing: keyword arguments of :func:`fastblocks.bench.timing.measure_interleaved` (those of ``measure``).
    """

    batch_size: int
    image_size: int
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    num_classes: int = 1000
    timing: dict = field(default_factory=dict)

    @property
    def layout(self) -> str:
        """``"channels_last"`` or ``"nchw"``."""
        return "channels_last" if self.channels_last else "nchw"


def default_config(device: torch.device | str, name: str, *, quick: bool = False) -> ModelConfig:
    """Sizes that fit the device: GPUs batch 256 (ResNet) / 64 (DenseNet) at 224, bf16, NHWC;
    the CPU batch 8 fp32 at 224 (``quick``: batch 4 at 112, few repetitions)."""
    if torch.device(device).type == "cuda":
        timing = {"warmup": 5, "min_reps": 10, "min_time_s": 2.0, "max_time_s": 20.0}
        if quick:
            timing = {"warmup": 3, "min_reps": 5, "min_time_s": 0.5, "max_time_s": 5.0}
        return ModelConfig(64 if name.startswith("densenet") else 256, 224, torch.bfloat16, True, timing=timing)
    if quick:
        return ModelConfig(4, 112, timing={"warmup": 1, "min_reps": 3, "min_time_s": 0.5, "max_time_s": 3.0})
    return ModelConfig(8, 224, timing={"warmup": 2, "min_reps": 7, "min_time_s": 2.0, "max_time_s": 40.0})


def _classes(cfg: ModelConfig) -> dict:
    # Builders are called as torchvision's: num_classes only when it is not the default.
    return {} if cfg.num_classes == 1000 else {"num_classes": cfg.num_classes}


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def build_model(
    builder: Callable[..., nn.Module], provider: str, state: dict, device: torch.device, cfg: ModelConfig
) -> nn.Module:
    """The ``provider``'s model with weights ``state``, on ``device`` in ``cfg``'s layout.

    Raises:
        NotImplementedError: the provider does not apply to this model (e.g. checkpoint on a
            model without ``memory_efficient``).
    """
    kwargs: dict = {"fused": provider.startswith("fused"), **_classes(cfg)}
    if provider == "checkpoint":
        kwargs["memory_efficient"] = True
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        if provider == "checkpoint":
            raise NotImplementedError(f"no memory_efficient (checkpointed) variant ({exc})") from exc
        raise
    if provider == "checkpoint" and not any(
        getattr(m, "memory_efficient", False) and hasattr(m, "call_checkpoint_bottleneck") for m in model.modules()
    ):
        raise NotImplementedError("its eager twin has no checkpointed (memory_efficient) layers")
    model.load_state_dict(state)
    model = model.to(device=device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    if provider == "folded":
        from fastblocks.nn.fold import fold_bn

        model = fold_bn(model, inplace=True)
    if provider.endswith("compile"):
        torch._dynamo.reset()  # a fresh cache per model: dynamo's limit would run later ones eagerly
        model = torch.compile(model)
    return model


def model_inputs(cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch: images ``[B, 3, S, S]`` (cfg's layout) and labels ``[B]``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=g)
    x = x.to(device=device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g).to(device)
    return x, y


def model_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ModelConfig, device: torch.device
) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(train_step, infer_step)`` of ``model`` on images ``x [B, 3, S, S]`` and labels ``y [B]``:
    forward + cross-entropy + backward + SGD step; forward under inference mode."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, cfg.dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def infer_step() -> None:
        with torch.inference_mode(), _autocast(device, cfg.dtype):
            model(x)

    return train_step, infer_step


def count_flops(model: nn.Module, cfg: ModelConfig, device: torch.device) -> dict[str, int]:
    """FLOPs of one training step (forward + backward) and one inference, for ``model``.

    Counted at batch 2 and scaled (every counted op, convolutions and matmuls, is linear in the
    batch), so counting costs a small fraction of a step.
    """
    from torch.utils.flop_counter import FlopCounterMode

    small = min(2, cfg.batch_size)
    x, y = model_inputs(dataclasses.replace(cfg, batch_size=small), device)
    model.train()
    with FlopCounterMode(display=False) as counter, _autocast(device, cfg.dtype):
        F.cross_entropy(model(x), y).backward()
    train = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), _autocast(device, cfg.dtype):
        model(x)
    model.train()
    scale = cfg.batch_size / small
    return {"train": int(train * scale), "infer": int(counter.get_total_flops() * scale)}


def _row(name: str, provider: str, mode: str, cfg: ModelConfig, timing, extra: dict, yardsticks: dict | None) -> dict:
    shape = [cfg.batch_size, 3, cfg.image_size, cfg.image_size]
    tflops = extra.get("flops") and extra["flops"] / (timing.median_ms * 1e-3) / 1e12
    mm = (yardsticks or {}).get("matmul_tflops")
    return {
        "case": f"{name}/{mode}/{provider}/{'x'.join(map(str, shape))}/{dtype_name(cfg.dtype)}/{cfg.layout}",
        "kind": "model",
        "name": name,
        "provider": provider,
        "mode": mode,
        "shape": shape,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "dtype": dtype_name(cfg.dtype),
        "autocast": cfg.dtype != torch.float32,
        "layout": cfg.layout,
        "backend": None,
        "median_ms": timing.median_ms,
        "spread_ms": timing.iqr_ms,
        "spread_kind": "iqr",
        "samples_ms": timing.as_dict()["samples_ms"],
        "calls_per_sample": timing.calls_per_sample,
        "timer": timing.method,
        "gbps": None,
        "pct_copy": None,
        "flops": extra.get("flops"),
        "tflops": float(f"{tflops:.4g}") if tflops else None,
        "pct_matmul": round(100 * tflops / mm, 1) if tflops and mm else None,
        "images_per_s": round(cfg.batch_size / (timing.median_ms * 1e-3), 2),
        "saved_bytes": extra.get("saved"),
        "peak_bytes": extra.get("peak"),
        "memory_kind": CUDA_PEAK if extra.get("peak") is not None else SAVED,
        "compile_s": extra.get("compile_s"),
    }


def run_model(
    name: str,
    builder: Callable[..., nn.Module],
    providers: list[str] | tuple[str, ...],
    device: torch.device | str,
    cfg: ModelConfig,
    *,
    yardsticks: dict | None = None,
    modes: tuple[str, ...] = MODES,
    on_skip: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Benchmark ``name`` under each provider; one row per (provider, mode) that ran
    (a provider runs the modes of :func:`provider_modes` only).

    Every provider's model is built first; then, mode by mode, their steps are timed together
    with samples in alternation (:func:`fastblocks.bench.timing.measure_interleaved`), so that a
    drift of a shared machine does not fall on one provider only.

    Args:
        builder: ``builder(fused=bool[, memory_efficient=True][, num_classes=int]) -> nn.Module``.
        on_skip: called with a message for each provider that does not apply or fails.
        progress: called with a short label after each (provider, mode).
    """
    device = torch.device(device)
    torch.manual_seed(0)
    reference = builder(fused=False, **_classes(cfg))
    state = copy.deepcopy(reference.state_dict())
    flops = count_flops(reference.to(device), cfg, device)
    del reference
    x, y = model_inputs(cfg, device)
    models: dict[str, nn.Module] = {}
    for provider in providers:
        if not provider_modes(provider, modes):
            continue
        try:
            models[provider] = build_model(builder, provider, state, device, cfg)
        except NotImplementedError as exc:
            if on_skip:
                on_skip(f"{name}/{provider}: skipped, {exc}")
        except Exception as exc:  # one broken provider must not lose the others' numbers
            if on_skip:
                on_skip(f"{name}/{provider}: failed, {type(exc).__name__}: {exc}")
    rows = []
    for mode in modes:
        steps: dict[str, Callable[[], None]] = {}
        first_s: dict[str, float] = {}
        for provider, model in models.items():
            if mode not in provider_modes(provider, modes):
                continue
            train_step, infer_step = model_steps(model, x, y, cfg, device)
            step = train_step if mode == "train" else infer_step
            model.train(mode == "train")
            try:  # a first step alone (it compiles): a provider that fails is reported and left out
                start = time.perf_counter()
                step()
                synchronize(device)
                first_s[provider] = time.perf_counter() - start
            except Exception as exc:
                if on_skip:
                    on_skip(f"{name}/{provider}: failed, {type(exc).__name__}: {exc}")
                continue
            steps[provider] = step
        if not steps:
            continue
        kw = dict(cfg.timing)
        if any(p.endswith("compile") for p in steps):  # the first calls compile (and may recompile once)
            kw["warmup"] = max(kw.get("warmup", 3), 3)
        timings = measure_interleaved(steps, device, **kw)
        for provider, timing in timings.items():
            rows.append(finish_row(name, provider, mode, models[provider], x, cfg, device, flops[mode], timing,
                                steps[provider], yardsticks, first_s[provider]))  # fmt: skip
            if progress:
                progress(f"{name} {provider} {mode}")
    for provider in list(models):
        models[provider].train()
        del models[provider]
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def finish_row(
    name: str,
    provider: str,
    mode: str,
    model: nn.Module,
    x: torch.Tensor,
    cfg: ModelConfig,
    device: torch.device,
    flops: int,
    timing: Timing,
    step: Callable[[], None],
    yardsticks: dict | None,
    first_s: float | None = None,
) -> dict:
    """The row of one timed (provider, mode), with its memory measured. ``first_s``: seconds of
    the provider's first step in this mode (compiled providers: its compile time plus one step,
    reported as ``compile_s`` once the median step is taken off)."""
    extra: dict = {"flops": flops}
    if provider.endswith("compile"):
        first_ms = timing.first_call_ms if first_s is None else first_s * 1e3
        extra["compile_s"] = round(max(first_ms - timing.median_ms, 0.0) / 1e3, 3)
    if mode == "train":
        model.train()
        with _autocast(device, cfg.dtype):
            _, extra["saved"] = saved_bytes(lambda: model(x), exclude=list(model.parameters()))
    if device.type == "cuda":
        model.train(mode == "train")
        extra["peak"] = cuda_peak_bytes(step, device)
    model.train()
    return _row(name, provider, mode, cfg, timing, extra, yardsticks)
