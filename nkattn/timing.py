"""GPU timing and FLOP accounting, one helper each (studies and benchmarks share them)."""

from __future__ import annotations

import re

import numpy as np


def attention_flops(batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool) -> float:
    """4·B·H·Nq·Nk·d (two matmuls), halved for causal."""
    flops = 4.0 * batch * heads * nq * nk * head_dim
    return flops / 2 if causal else flops


def cuda_time_ms(fn, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Median and spread of `fn()` in ms, timed with CUDA events on the default stream.

    Every launch (numba's and torch's default) goes to the legacy default stream,
    so events recorded there bracket the work.
    """
    from numba import cuda

    for _ in range(warmup):
        fn()
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cuda.event(timing=True), cuda.event(timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cuda.event_elapsed_time(start, stop))
    times = np.asarray(times)
    return {
        "median_ms": float(np.median(times)),
        "min_ms": float(times.min()),
        "p90_ms": float(np.percentile(times, 90)),
        "repeats": int(repeats),
    }


def device_name() -> str:
    from numba import cuda

    return cuda.get_current_device().name.decode() if isinstance(
        cuda.get_current_device().name, bytes
    ) else str(cuda.get_current_device().name)


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    match = re.search(r"([A-Z]\d{2,4}[A-Z]?)", name.upper())
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
