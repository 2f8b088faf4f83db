"""Timing: warm-up, then repeated samples; median and inter-quartile range, raw samples kept.

CPU: ``time.perf_counter`` around one or several calls (several when one call is shorter than
``_MIN_SAMPLE_S``, so the timer's resolution and the loop overhead do not matter).
:func:`measure_interleaved` times several callables (the providers of one case) round by round,
one sample of each per round in a rotating order, so the slow drifts of a shared CPU machine
(other tenants, clock frequency, the allocator's state) fall on all of them alike; a comparison
of medians taken minutes apart, one provider after the other, would carry those drifts.
CUDA: a pair of CUDA events around each sample, all read after one synchronization at the end,
so the host never waits between samples; optionally the L2 cache is flushed before each sample
(as ``triton.testing.do_bench`` does) so a tensor that fits in L2 is not timed from cache.

Comparing two interleaved callables: :func:`paired_ratio` takes the ratio of their samples round by
round (a drift that slows one round slows both of its samples) and gives the median of those
ratios with a distribution-free confidence interval, so a difference smaller than the machine's
noise reads as an interval that straddles 1 rather than as two medians in some order.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

_MIN_SAMPLE_S = 1e-3  # CPU: a sample lasts at least 1 ms (several calls if needed)
_MIN_SAMPLE_CUDA_S = 2e-5  # CUDA: events resolve ~0.5 us; batch calls shorter than 20 us
_L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100/H200: 50 MB)


@dataclass
class Timing:
    """Result of :func:`measure`; times in milliseconds per call.

    Attributes:
        median_ms: median over the samples.
        iqr_ms: inter-quartile range (75th - 25th percentile) of the samples: the spread.
        samples_ms: every sample (each the mean of ``calls_per_sample`` calls).
        calls_per_sample: calls timed together in one sample.
        method: ``"perf_counter"`` (CPU), ``"perf_counter_interleaved"`` (CPU, samples taken in
            alternation with other callables) or ``"cuda_events"``.
        first_call_ms: duration of the first warm-up call (includes one-off costs: compilation,
            autotuning, allocator growth).
    """

    median_ms: float
    iqr_ms: float
    samples_ms: list[float] = field(repr=False)
    calls_per_sample: int = 1
    method: str = "perf_counter"
    first_call_ms: float = math.nan

    def as_dict(self) -> dict:
        """JSON-able form (samples rounded to 4 significant digits)."""
        d = asdict(self)
        d["samples_ms"] = [float(f"{s:.4g}") for s in self.samples_ms]
        return d


def synchronize(device: torch.device | str) -> None:
    """Wait for ``device`` to finish its queued work (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples_ms: list[float]) -> tuple[float, float]:
    """``(median, inter-quartile range)`` of ``samples_ms`` (IQR 0 for fewer than 2 samples)."""
    if not samples_ms:
        raise ValueError("summarize needs at least one sample")
    if len(samples_ms) < 2:
        return samples_ms[0], 0.0
    q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return statistics.median(samples_ms), q3 - q1


def paired_ratio(
    base_ms: list[float], ms: list[float], confidence: float = 0.95
) -> tuple[float, float | None, float | None]:
    """``base / ms`` round by round: the median ratio and a confidence interval for it.

    The samples must be paired (sample ``i`` of both taken in round ``i`` of one
    :func:`measure_interleaved` call). The interval is the sign test's, distribution-free: the
    order statistics ``r_(j)``, ``r_(n+1-j)`` of the ``n`` ratios, ``j`` the largest with
    ``2 P(Binomial(n, 1/2) < j) <= 1 - confidence`` (its coverage is at least ``confidence``).

    Args:
        base_ms, ms: per-round samples, equal lengths, all positive.
        confidence: the interval's coverage, in ``(0, 1)``.

    Returns:
        ``(median, low, high)``; ``low`` and ``high`` are ``None`` when ``n`` is too small for
        that coverage (``n < 6`` at 0.95).
    """
    if len(base_ms) != len(ms) or not ms:
        raise ValueError(
            f"paired_ratio needs two equally long, non-empty sample lists, got {len(base_ms)} and {len(ms)}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if min(ms) <= 0 or min(base_ms) <= 0:
        raise ValueError("paired_ratio needs positive samples")
    ratios = sorted(b / m for b, m in zip(base_ms, ms))
    n = len(ratios)
    alpha, j, below = 1.0 - confidence, 0, 0.0  # below: P(K < j), K ~ Binomial(n, 1/2)
    while j < n:
        nxt = below + math.comb(n, j) / 2.0**n
        if 2.0 * nxt > alpha:
            break
        below, j = nxt, j + 1
    if j == 0:
        return statistics.median(ratios), None, None
    return statistics.median(ratios), ratios[j - 1], ratios[n - j]


def _done(n: int, elapsed: float, min_reps: int, max_reps: int, min_time_s: float, max_time_s: float) -> bool:
    if n >= max_reps:
        return True
    if elapsed >= max_time_s and n >= 1:
        return True
    return n >= min_reps and elapsed >= min_time_s


def _warm(fn: Callable[[], object], device: torch.device, warmup: int) -> tuple[float, float]:
    """Run ``fn`` ``max(1, warmup)`` times; return (first call, last call) durations in seconds."""
    first = last = 0.0
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        last = time.perf_counter() - t0
        if i == 0:
            first = last
    return first, last


def measure(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    min_reps: int = 5,
    max_reps: int = 200,
    min_time_s: float = 0.5,
    max_time_s: float = 10.0,
    flush_l2: bool = False,
) -> Timing:
    """Time ``fn()`` (which must do the whole thing measured, e.g. forward and backward).

    Args:
        fn: the callable; its result is ignored.
        device: where ``fn`` runs (CUDA: timed with events, synchronized at the end).
        warmup: untimed calls first (at least one: it also estimates the duration).
        min_reps, max_reps: bounds on the number of samples.
        min_time_s: keep sampling until this much time was spent (and ``min_reps`` reached).
        max_time_s: stop after this much time even below ``min_reps`` (at least one sample).
        flush_l2: CUDA only: overwrite a 256 MB buffer before each sample (cold L2).

    Returns:
        a :class:`Timing` with the median, IQR and raw samples in ms per call.
    """
    device = torch.device(device)
    first, est = _warm(fn, device, warmup)
    est = max(est, 1e-9)
    if device.type == "cuda":
        return _measure_cuda(fn, device, est, first, min_reps, max_reps, min_time_s, max_time_s, flush_l2)
    calls = max(1, math.ceil(_MIN_SAMPLE_S / est))
    samples: list[float] = []
    start = time.perf_counter()
    while not _done(len(samples), time.perf_counter() - start, min_reps, max_reps, min_time_s, max_time_s):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e3)
    median, iqr = summarize(samples)
    return Timing(median, iqr, samples, calls, "perf_counter", first * 1e3)


def cuda_reps(per_sample: float, min_reps: int, max_reps: int, min_time_s: float, max_time_s: float) -> int:
    """Samples of a CUDA measurement, decided from the estimated seconds per sample (so the host
    never synchronizes mid-run): enough for ``min_time_s`` within ``[min_reps, max_reps]``, at
    most what ``max_time_s`` allows (which may be infinite), at least one."""
    reps = max(min_reps, min(max_reps, math.ceil(min_time_s / per_sample)))
    if math.isfinite(max_time_s):
        reps = min(reps, math.floor(max_time_s / per_sample) or 1)
    return max(1, reps)


def _measure_cuda(
    fn: Callable[[], object],
    device: torch.device,
    est: float,
    first: float,
    min_reps: int,
    max_reps: int,
    min_time_s: float,
    max_time_s: float,
    flush_l2: bool,
) -> Timing:
    calls = 1 if flush_l2 else max(1, math.ceil(_MIN_SAMPLE_CUDA_S / est))
    reps = cuda_reps(est * calls, min_reps, max_reps, min_time_s, max_time_s)
    cache = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    with torch.cuda.device(device):
        for begin, end in events:
            if cache is not None:
                cache.zero_()
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
        torch.cuda.synchronize(device)
    samples = [begin.elapsed_time(end) / calls for begin, end in events]
    median, iqr = summarize(samples)
    return Timing(median, iqr, samples, calls, "cuda_events", first * 1e3)


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    min_reps: int = 5,
    max_reps: int = 200,
    min_time_s: float = 0.5,
    max_time_s: float = 10.0,
    flush_l2: bool = False,
) -> dict[str, Timing]:
    """Time each of ``fns`` with samples taken in alternation (see the module docstring).

    Round ``k`` takes one sample of every callable, starting at callable ``k mod len(fns)``.
    Sampling stops when every callable has ``min_reps`` samples and ``min_time_s`` of them, or
    ``max_reps`` samples, or after ``max_time_s`` per callable (at least one round). On CUDA,
    where events time the device and not the host, each callable is measured with
    :func:`measure` in turn.

    Args:
        fns: ``{label: callable}``; each callable does the whole thing measured.
        device, warmup, min_reps, max_reps, min_time_s, max_time_s, flush_l2: as :func:`measure`
            (the time limits apply to each callable).

    Returns:
        ``{label: Timing}`` in the order of ``fns``.
    """
    device = torch.device(device)
    if not fns:
        raise ValueError("measure_interleaved needs at least one callable")
    if device.type == "cuda":
        kw = dict(warmup=warmup, min_reps=min_reps, max_reps=max_reps, min_time_s=min_time_s, max_time_s=max_time_s)
        return {k: measure(f, device, flush_l2=flush_l2, **kw) for k, f in fns.items()}
    labels = list(fns)
    firsts, calls = {}, {}
    for k in labels:  # warm every callable before the first timed round
        first, est = _warm(fns[k], device, warmup)
        firsts[k], calls[k] = first, max(1, math.ceil(_MIN_SAMPLE_S / max(est, 1e-9)))
    samples: dict[str, list[float]] = {k: [] for k in labels}
    spent = dict.fromkeys(labels, 0.0)
    rnd = 0

    def done() -> bool:
        n = min(len(v) for v in samples.values())
        return _done(n, min(spent.values()), min_reps, max_reps, min_time_s, max_time_s)

    while not done():
        for j in range(len(labels)):
            k = labels[(rnd + j) % len(labels)]
            fn, c = fns[k], calls[k]
            t0 = time.perf_counter()
            for _ in range(c):
                fn()
            dt = time.perf_counter() - t0
            samples[k].append(dt / c * 1e3)
            spent[k] += dt
        rnd += 1
    out = {}
    for k in labels:
        median, iqr = summarize(samples[k])
        out[k] = Timing(median, iqr, samples[k], calls[k], "perf_counter_interleaved", firsts[k] * 1e3)
    return out
