"""Wall-time measurement shared by sdexport bench, the Winograd tuning and the benchmark scripts.

Kept free of torch and diffusers so that importing it costs nothing: the benchmark scripts that do
not need PyTorch (the tokenizer's, say) do not load it at start-up.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Median and spread of wall time in milliseconds over ``repeats`` calls, after warm-up calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {"median_ms": float(np.median(samples)), "min_ms": samples[0], "max_ms": samples[-1],
            "iqr_ms": float(np.percentile(samples, 75) - np.percentile(samples, 25)),
            "stdev_ms": float(np.std(samples, ddof=1)) if len(samples) > 1 else 0.0, "repeats": repeats}
