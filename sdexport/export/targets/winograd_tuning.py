"""Which 3x3 convolutions of an OpenVINO model run faster as Winograd F(2) / F(4): measured, per shape.

The rewrite itself is :mod:`runtime.backends.openvino_winograd` (the runtime applies it when it compiles
for the CPU at f32). Whether it pays depends on the layer: on this project's CPU (2 cores, AVX-512), SD 1.5
at 256x256, batch 2, one convolution at a time, ms:

    C -> K @ H x W         direct   F(2)    F(4)
    320 -> 320 @ 32x32      8.5      7.9     6.0
    640 -> 640 @ 16x16      8.5      6.3     5.4
    1280 -> 1280 @ 8x8     10.0      7.6    16.5   (F(4): 4 tiles per image, the GEMM is too thin)
    1280 -> 1280 @ 4x4      4.4      7.2    11.3   (weight-bandwidth bound: U is 16/9 the size of w)
    4 -> 320 @ 32x32        0.6      1.9     1.4   (conv_in: too few channels to save anything)

So, like a TensorRT build choosing tactics, the export times every distinct shape on the export
machine (random weights: timing does not depend on them) and keeps the fastest, Winograd only when it
beats the direct convolution by ``MIN_GAIN``. The plan and the timings go into the manifest.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from tqdm.auto import tqdm

from runtime.backends.openvino import core
from runtime.backends.openvino_winograd import TILES, eligible_convs, fits, winograd_conv3x3
from sdexport.measure.timing import timeit
from sdexport.options import WINOGRAD_MODES

MIN_GAIN = 1.05  # below this the difference is within run-to-run noise on a busy machine


def _time_ms(model: ov.Model, x: np.ndarray, config: dict, repeats: int) -> float:
    request = core().compile_model(model, "CPU", config).create_infer_request()
    return timeit(lambda: request.infer([x]), repeats, warmup=2)["median_ms"]


def _layer(shape: tuple[int, ...], tile: int | None) -> ov.Model:
    n, c, k, h, w = shape
    weights = (np.random.default_rng(0).standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    x = ops.parameter([n, c, h, w], np.float32)
    if tile is None:
        y = ops.convolution(x, ops.constant(weights), [1, 1], [1, 1], [1, 1], [1, 1])
    else:
        y = winograd_conv3x3(x.output(0), ops.constant(weights).output(0), tile, shape)
    return ov.Model([y], [x])


def measure(shape: tuple[int, ...], threads: int = 0, repeats: int = 7) -> dict[str, float]:
    """ms of one convolution of this (N, C, K, H, W): direct and every tile that fits."""
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    x = np.random.default_rng(1).standard_normal(shape[:2] + shape[3:]).astype(np.float32)
    times = {"direct": _time_ms(_layer(shape, None), x, config, repeats)}
    for m in TILES:
        if fits(shape, m):
            times[f"f{m}"] = _time_ms(_layer(shape, m), x, config, repeats)
    return times


def plan(model: ov.Model, mode: str = "auto", threads: int = 0, label: str = "", progress: bool = False) -> dict | None:
    """The manifest's ``details["winograd"]``: per (N, C, K, H, W) of the model's eligible convolutions,
    the tile (0: direct) and, for ``auto``, what was measured. None when nothing is eligible or mode off."""
    if mode not in WINOGRAD_MODES:
        raise ValueError(f"winograd mode {mode!r}: use one of {', '.join(WINOGRAD_MODES)}")
    counts = Counter(shape for _, shape in eligible_convs(model))
    if mode == "off" or not counts:
        return None
    layers = []
    if mode == "auto":
        shapes = tqdm(sorted(counts), desc=f"winograd tuning {label}".strip(), unit="shape", leave=False,
                      disable=not progress)
        for shape in shapes:
            times = measure(shape, threads)
            best = min(times, key=times.get)
            tile = int(best[1:]) if best != "direct" and times[best] * MIN_GAIN <= times["direct"] else 0
            layers.append({"shape": list(shape), "count": counts[shape], "tile": tile,
                           "ms": {k: round(v, 3) for k, v in times.items()}})
    else:
        m = int(mode[1:])
        layers = [{"shape": list(s), "count": counts[s], "tile": m if fits(s, m) else 0} for s in sorted(counts)]
    chosen = [x for x in layers if x["tile"]]
    result = {
        "mode": mode,
        "applies_to": "OpenVINO CPU at f32 (the runtime's winograd option, default auto)",
        "layers": layers,
        "convolutions": sum(x["count"] for x in chosen),
        "of_eligible": sum(counts.values()),
        # the runtime holds U ((m+2)^2 taps) instead of w (9 taps) for every rewritten convolution
        "extra_weight_bytes": sum(x["count"] * 4 * x["shape"][1] * x["shape"][2] * ((x["tile"] + 2) ** 2 - 9)
                                  for x in chosen),
    }
    if mode == "auto":
        import os

        from sdexport.measure.machine import cpu_model

        result["tuned_on"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads or "default",
                              "openvino": ov.get_version().split("-")[0], "min_gain": MIN_GAIN}
        if chosen:
            saved = sum(x["count"] * (x["ms"]["direct"] - x["ms"][f"f{x['tile']}"]) for x in chosen)
            result["measured_saving_ms"] = round(saved, 2)
    return result
