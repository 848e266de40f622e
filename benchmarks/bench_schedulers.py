"""Per-step overhead of each runtime scheduler (the model call excluded), on the CPU.

    python benchmarks/bench_schedulers.py [--steps 25] [--repeats 20] [--out benchmarks/results/schedulers-cpu.json]

For a 2x4x64x64 float32 latent (batch 2 of a 512x512 image) and the SD 1.5 scheduler config, each
short-named scheduler runs whole ``--steps``-step loops of ``scale_model_input`` + ``step`` on a
fixed model output; the figure is the loop time divided by its number of timesteps (median and
best of ``--repeats`` loops), in milliseconds. Every scheduler is timed with numpy's generator;
the stochastic ones (they draw noise every step) again with the torch-compatible generator, which
reproduces torch.randn bit for bit in numpy and costs more. The noise draw alone is timed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, markdown_table  # noqa: E402
from runtime.rng import make_rng  # noqa: E402
from runtime.schedulers import SCHEDULER_NAMES, scheduler_from_config  # noqa: E402

SHAPE = (2, 4, 64, 64)
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
STOCHASTIC = ("euler-a", "ddpm", "lcm")  # and DDIM with eta > 0, timed as "ddim eta=1"


def time_loop(name: str, rng_kind: str, steps: int, repeats: int, eta: float | None = None) -> dict:
    sched = scheduler_from_config(SD15, name)
    model_output = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    start = np.random.default_rng(2).standard_normal(SHAPE, dtype=np.float32)
    extra = {} if eta is None else {"eta": eta}
    per_step = []
    for repeat in range(repeats + 1):  # the first loop warms caches and is not counted
        sched.set_timesteps(steps)
        rng = make_rng(repeat, rng_kind)
        x = start * np.float32(sched.init_noise_sigma)
        timesteps = sched.timesteps
        t0 = time.perf_counter()
        for t in timesteps:
            sched.scale_model_input(x, t)
            x = sched.step(model_output, t, x, rng=rng, **extra)
        elapsed = time.perf_counter() - t0
        assert np.isfinite(x).all(), name
        if repeat:
            per_step.append(elapsed * 1e3 / len(timesteps))
    return {
        "scheduler": name if eta is None else f"{name} eta={eta:g}",
        "class": type(sched).__name__,
        "rng": rng_kind,
        "timesteps": int(len(sched.timesteps)),
        "median_ms_per_step": statistics.median(per_step),
        "min_ms_per_step": min(per_step),
    }


def time_noise(rng_kind: str, steps: int, repeats: int) -> dict:
    """The noise draw alone (one per step in the stochastic schedulers), for scale."""
    per_step = []
    for repeat in range(repeats + 1):
        rng = make_rng(repeat, rng_kind)
        t0 = time.perf_counter()
        for _ in range(steps):
            rng.randn(SHAPE)
        if repeat:
            per_step.append((time.perf_counter() - t0) * 1e3 / steps)
    return {
        "scheduler": "(rng.randn alone)",
        "class": "-",
        "rng": rng_kind,
        "timesteps": steps,
        "median_ms_per_step": statistics.median(per_step),
        "min_ms_per_step": min(per_step),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "schedulers-cpu.json")
    args = parser.parse_args(argv)

    results = [time_loop(name, "numpy", args.steps, args.repeats) for name in SCHEDULER_NAMES]
    results.append(time_loop("ddim", "numpy", args.steps, args.repeats, eta=1.0))
    for name in STOCHASTIC:
        results.append(time_loop(name, "torch", args.steps, args.repeats))
    results.append(time_loop("ddim", "torch", args.steps, args.repeats, eta=1.0))
    results += [time_noise(kind, args.steps, args.repeats) for kind in ("numpy", "torch")]

    rows = [[r["scheduler"], r["class"], r["rng"], r["median_ms_per_step"], r["min_ms_per_step"]] for r in results]
    print(f"Scheduler overhead per step, {'x'.join(map(str, SHAPE))} float32 latent, {args.steps} steps, "
          f"median and best of {args.repeats} loops (model excluded)\n")  # fmt: skip
    print(markdown_table(["scheduler", "class", "rng", "median ms/step", "best ms/step"], rows))

    report = {
        "benchmark": "scheduler overhead per step",
        "latent_shape": list(SHAPE),
        "steps": args.steps,
        "repeats": args.repeats,
        "numpy": np.__version__,
        "machine": machine_info(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
