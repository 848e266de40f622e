"""Parity of a written component against its torch module, on the same inputs.

Every conversion ends here: the component is loaded by the runtime backend that will run it,
fed the spec's example inputs, and compared output by output with torch (fp32). The worst output
decides; the numbers go into the manifest and the export fails below the spec's PSNR floor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime.backends import open_session
from runtime.manifest import Component
from runtime.metrics import finite, max_abs_error, psnr
from sdexport.export.components import ComponentSpec, Shape


def validation_shape(spec: ComponentSpec, trace: Shape, static: bool, multiple: int) -> Shape:
    """Static exports are checked at their shape; dynamic ones at another batch and a non-square
    size, so a dimension baked in by the trace shows up as an error here, not in a user's run."""
    if static:
        return trace
    return Shape(trace.batch + 1, trace.height, trace.width + multiple, trace.cfg_batch, trace.prompt_chunks + 1)


def measure(component: Component, root: Path, spec: ComponentSpec, module: torch.nn.Module, shape: Shape,
            backend_options: dict | None = None, seed: int = 1) -> dict:
    example = spec.example(shape, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = module(*example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = open_session(component, root, backend_options or {})
    got = session.run({t.name: x.numpy() for t, x in zip(spec.inputs, example)})
    per_output = {}
    for t, ref in zip(spec.outputs, expected):
        ref = ref.float().numpy()
        out = np.asarray(got[t.name], np.float32)
        per_output[t.name] = {"max_abs_err": max_abs_error(ref, out), "psnr_db": psnr(ref, out)}
    worst = min(per_output.values(), key=lambda r: r["psnr_db"])
    return {
        "reference": "torch fp32",
        "shape": {"batch": shape.batch, "height": shape.height, "width": shape.width, "prompt_chunks": shape.prompt_chunks},
        "max_abs_err": max(r["max_abs_err"] for r in per_output.values()),
        "psnr_db": finite(worst["psnr_db"]),
        "finite": all(np.isfinite(np.asarray(got[t.name])).all() for t in spec.outputs),
        "outputs": {k: {"max_abs_err": v["max_abs_err"], "psnr_db": finite(v["psnr_db"])} for k, v in per_output.items()},
    }


def gate(spec: ComponentSpec, precision: str, options=None) -> float:
    """The PSNR floor (dB) a converted component must reach against torch fp32."""
    if precision == "fp32":
        override = getattr(options, "min_psnr_fp32", None)
        return spec.min_psnr_fp32 if override is None else override
    override = getattr(options, "min_psnr_reduced", None)
    return spec.min_psnr_reduced if override is None else override


def passes(result: dict, floor: float) -> bool:
    value = result["psnr_db"]
    return result["finite"] and (value is None or value >= floor)  # None: identical (inf dB)
