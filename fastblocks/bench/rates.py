"""The machine's own yardsticks: measured copy bandwidth and matmul rate.

Memory-bound ops are reported in GB/s and as a percentage of what ``y.copy_(x)`` achieves on
the same device (read + write counted); convolutions and whole models in TFLOP/s and as a
percentage of a large matmul's rate (bf16 on GPUs, fp32 on the CPU). Measuring both here, with
the same timer as the benchmarks, keeps the percentages honest on any machine.
"""

from __future__ import annotations

import functools

import torch

from fastblocks.bench.timing import measure


def default_matmul_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (tensor cores), fp32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@functools.cache
def _copy_gbps(device: str, nbytes: int) -> float:
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=2, min_reps=5, min_time_s=0.3, max_time_s=3.0)
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int | None = None) -> float:
    """Measured ``dst.copy_(src)`` bandwidth in GB/s (bytes read + bytes written, 1 GB = 1e9 B).

    Args:
        device: the device.
        nbytes: size of the copied tensor (default: 1 GiB on CUDA, 128 MiB on the CPU: both far
            beyond the last-level cache).
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**27
    return _copy_gbps(str(device), int(nbytes))


@functools.cache
def _matmul_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=2, min_reps=3, min_time_s=0.3, max_time_s=3.0)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def matmul_tflops(device: torch.device | str, dtype: torch.dtype | None = None, n: int | None = None) -> float:
    """Measured rate of an ``n x n @ n x n`` matmul in TFLOP/s (2 n^3 flops).

    Args:
        device: the device.
        dtype: default bf16 on CUDA, fp32 on the CPU.
        n: matrix size (default 8192 on CUDA, 1024 on the CPU).
    """
    device = torch.device(device)
    dtype = dtype or default_matmul_dtype(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    return _matmul_tflops(str(device), dtype, int(n))


def yardsticks(device: torch.device | str, *, small: bool = False) -> dict:
    """``{"copy_gbps", "matmul_tflops", "matmul_dtype"}`` for ``device`` (cached per process).

    ``small=True`` uses small sizes (tests only: the numbers are then not the machine's peak).
    """
    device = torch.device(device)
    dtype = default_matmul_dtype(device)
    copy = copy_bandwidth_gbps(device, 2**22 if small else None)
    mm = matmul_tflops(device, dtype, 128 if small else None)
    return {
        "copy_gbps": float(f"{copy:.4g}"),
        "matmul_tflops": float(f"{mm:.4g}"),
        "matmul_dtype": str(dtype).split(".")[-1],
    }
