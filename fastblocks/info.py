"""What this installation can run: versions, device, and each op's backends (with reasons)."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from fastblocks import _backend, _ext


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """Everything ``fastblocks info`` prints, as a JSON-able dict."""
    import fastblocks  # noqa: F401  (registers every op)

    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "triton_interpreter": _backend.triton_interpreted(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "extension": "loaded" if _ext.loaded() else f"not loaded: {_ext.load_error()}",
        "extension_cuda": _ext.built_with_cuda(),
        "extension_cpu_isa": _ext.cpu_capability(),
        "forced_backend": _backend.get_backend(),
    }
    ops = {}
    for name in sorted(_backend.registered_ops()):
        ops[name] = {
            dev: {
                "selected": _safe_resolve(name, dev),
                "backends": _backend.availability(name, dev),
            }
            for dev in devices
        }
    return {"environment": env, "ops": ops}


def _safe_resolve(op: str, device: str) -> str:
    try:
        return _backend.resolve(op, device)
    except _backend.BackendUnavailableError as exc:
        return f"error: {exc}"


def report() -> str:
    """Human-readable ``fastblocks info`` text."""
    data = collect()
    lines = ["fastblocks environment"]
    for key, value in data["environment"].items():
        lines.append(f"  {key:<20} {value}")
    for op, per_device in data["ops"].items():
        lines.append(f"op {op}")
        for dev, entry in per_device.items():
            lines.append(f"  on {dev}: uses {entry['selected']}")
            for backend, reason in entry["backends"].items():
                status = "available" if reason is None else f"unavailable: {reason}"
                lines.append(f"    {backend:<10} {status}")
    return "\n".join(lines)
