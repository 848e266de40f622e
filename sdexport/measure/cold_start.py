"""Cold start: a fresh interpreter from its start to the first image, and its peak resident memory.

The one harness behind ``sdexport bench`` and the benchmark scripts. Each measurement is a child
process, so imports, model loading and first-call work are all counted and nothing warm in the
parent (imported modules, compiled kernels, page cache aside) helps it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The project root, for a source checkout that is not installed (the benchmark scripts).
_ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
spec = json.loads(sys.argv[1])
from sdexport.measure.machine import peak_rss_kb
if spec["engine"] == "runtime":
    from runtime.pipeline import Pipeline
else:
    import torch
    from sdexport.measure.bench import _reference_pipeline
    from sdexport.sources.diffusers import DiffusersSource
t_import = time.perf_counter() - t0
call = {"steps": spec["steps"], "height": spec["height"], "width": spec["width"]}
if spec["engine"] == "runtime":
    pipe = Pipeline.from_dir(spec["target"], options=spec["options"])
    if spec["warmup"]:
        pipe.warmup()
    t_open = time.perf_counter() - t0 - t_import
    if spec["seed"] is not None:
        call.update(seed=spec["seed"], rng="torch")
    image = pipe.generate(spec["prompt"], scheduler=spec["scheduler"], **call).image
else:
    pipe = _reference_pipeline(DiffusersSource.open(spec["target"]), spec["scheduler"])
    t_open = time.perf_counter() - t0 - t_import
    if spec["seed"] is not None:
        call["generator"] = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        image = pipe(spec["prompt"], num_inference_steps=call.pop("steps"), **call).images[0]
seconds = time.time() - float(sys.argv[2])
if spec["save"]:
    image.save(spec["save"])
print(json.dumps({"seconds": seconds, "import_s": t_import, "open_s": t_open,
                  "total_in_process_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_kb() / 1024}))
"""


def cold_start(engine: str, target: str | Path, prompt: str, *, steps: int, height: int, width: int,
               scheduler: str, options: dict | None = None, warmup: bool = False, seed: int | None = None,
               save: str | Path | None = None) -> dict:
    """One cold start of ``engine`` ("runtime": the artifacts in ``target`` with backend ``options``;
    "diffusers": the reference pipeline in ``target``).

    Returns ``seconds`` (process start to first image), ``wall_s`` (spawn to exit, as a user waits
    for a command), ``import_s``, ``open_s`` (loading, and ``warmup`` when asked), ``total_in_process_s``
    and ``peak_rss_mb``. ``seed`` None keeps the engine's default noise; ``save`` writes the image."""
    if engine not in ("runtime", "diffusers"):
        raise ValueError(f"cold_start engine must be 'runtime' or 'diffusers', not {engine!r}")
    spec = {"engine": engine, "target": str(Path(target).resolve()), "prompt": prompt, "steps": steps,
            "height": height, "width": width, "scheduler": scheduler, "options": options or None,
            "warmup": warmup, "seed": seed, "save": str(save) if save else None}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec), repr(time.time())],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"cold-start child ({engine}) failed: {last}")
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}
