"""The environment a benchmark ran in: hardware, versions, date, command, commit.

Every results file carries this record, so each number names the machine and the command that
produced it (STYLE.md item 10).
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or ``None`` when there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


@functools.cache
def git_commit() -> str | None:
    """``<sha>`` (``+dirty`` when the tree has changes) of the checkout fastblocks runs from, or None."""
    root = str(Path(__file__).resolve().parents[2])
    sha = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if sha is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return sha + ("+dirty" if dirty else "")


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on Unix
        return None


def cpu_snapshot() -> tuple[float, float, float] | None:
    """``(wall s, CPU s busy on the whole machine, CPU s of this process)`` now, from
    ``/proc/stat`` and ``os.times`` (``None`` where ``/proc/stat`` is missing). Two snapshots give
    the CPU time other processes took in between (:func:`contention_warning`)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    t = os.times()
    return time.monotonic(), (sum(fields[:8]) - idle) / hz, t.user + t.system


def contention_warning(
    start: tuple[float, float, float] | None,
    cores: int | None,
    end: tuple[float, float, float] | None = None,
) -> str | None:
    """A warning when, between the snapshots ``start`` and ``end`` (default: now), other
    processes used more than a quarter of the machine's CPU time. The benchmark's own threads
    are not counted, unlike in the load average, which a 2-thread benchmark raises to 2 by itself."""
    end = end or cpu_snapshot()
    if start is None or end is None or not cores:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[2] - start[2])
    if wall <= 0 or others <= 0.25 * wall * cores:
        return None
    return (
        f"other processes used {others / wall:.2f} of the {cores} CPUs during the run: they competed "
        "for the cores and the timings below are unreliable"
    )


def busy_warning(env: dict) -> str | None:
    """A warning when other processes compete for the CPU (timings then mean little).

    On a 2-core machine, a second busy process makes PyTorch's OpenMP threads wait for each
    other at every parallel region: steps measured 10-40x slower, not 2x.
    """
    load, cores = env.get("load_average"), env.get("cpu_count")
    if load is None or not cores or load < 0.75 * cores:
        return None
    return (
        f"the machine is busy (1-minute load average {load} on {cores} CPUs): other processes compete "
        "for the cores and the timings below are unreliable"
    )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device | str) -> str:
    """Human name of ``device``: the GPU's name, or the CPU's model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slugify(text: str) -> str:
    """Lower-case ``text`` with every run of other characters turned into one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: torch.device | str) -> str:
    """Folder name of a device's results: ``cuda-nvidia-h200``, ``cpu-amd-epyc``..."""
    device = torch.device(device)
    name = device_name(device)
    name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", " ", name, flags=re.IGNORECASE)
    return f"{device.type}-{slugify(name)}"


def command_line(argv: list[str] | None = None, prog: str | None = None) -> str:
    """The command being run, as a shell line (``prog`` + ``argv`` when given, else ``sys.argv``)."""
    if argv is None:
        argv = sys.argv[1:]
        if prog is None:
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
            if prog in {"__main__.py", "-c"}:
                prog = "python -m " + ("pytest" if "pytest" in sys.modules else "fastblocks")
    return " ".join(filter(None, [prog, shlex.join(argv)]))


def environment(device: torch.device | str, *, command: str | None = None) -> dict:
    """The record stored with every result: device, versions, threads, date, command, commit.

    Args:
        device: the device the numbers are for.
        command: the command line that produced them (default: this process's ``sys.argv``).
    """
    from fastblocks import __version__, _backend, _ext

    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "driver": driver_version(),
        "gpu_memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
        "fastblocks": __version__,
        "extension": "loaded" if _ext.loaded() else f"not loaded: {_ext.load_error()}",
        "triton_interpreter": _backend.triton_interpreted(),
        "forced_backend": _backend.get_backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else command_line(),
        "git_commit": git_commit(),
    }


def summary_line(env: dict) -> str:
    """One line naming the hardware and versions of ``env`` (for tables and the README)."""
    parts = [env.get("device_name") or "?"]
    if env.get("device") == "cuda":
        parts.append(f"driver {env.get('driver')}, CUDA {env.get('cuda')}, Triton {env.get('triton')}")
    else:
        parts.append(f"{env.get('threads')} threads")
        if env.get("load_average") is not None:
            parts.append(f"load {env['load_average']}")
    parts.append(f"torch {env.get('torch')}")
    if env.get("copy_gbps"):
        parts.append(f"copy {env['copy_gbps']:.1f} GB/s")
    if env.get("matmul_tflops"):
        parts.append(f"{env.get('matmul_dtype', '')} matmul {env['matmul_tflops']:.2f} TFLOP/s".strip())
    parts.append(env.get("date", "?")[:16].replace("T", " ") + " UTC")
    if env.get("git_commit"):
        sha = env["git_commit"]
        parts.append(f"commit {sha[:12]}" + (" (uncommitted changes)" if sha.endswith("+dirty") else ""))
    return "; ".join(parts)
