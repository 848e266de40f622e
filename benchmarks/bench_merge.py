"""Peak memory of checkpoint merging on two SD 1.5-sized checkpoints.

Writes two random checkpoints with the SD 1.5 single-file layout (the tensor names and shapes of
``sdexport/sources/configs/sd1`` in A1111 naming, 1,131 tensors, 4.27 GB in fp32 / 2.13 GB in fp16), then merges
them in fresh child processes and reads each child's peak resident memory (``VmHWM``) and its resident
memory after the imports, before merging (the baseline):

- ``sdexport``: :func:`sdexport.sources.merge.merge_checkpoints` (plain reads in blocks of rows, streamed writer);
- ``safe_open``: the same loop reading through ``safetensors.safe_open`` (memory-mapped: the pages it
  touches stay resident while the file is open), to show why sdexport reads without a map;
- ``load_file`` (only with ``--naive``): both models loaded whole, merged, saved with ``save_file``.

The goal (issue 10): peak RSS of the merge under 1.5x one checkpoint's size.

    python -m benchmarks.bench_merge [--dtype fp32|fp16] [--naive] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.5


def sd15_plan(dtype: str = "fp32"):
    """Names, shapes, dtypes of an SD 1.5 single file (meta tensors), from the shipped config."""
    import torch

    from sdexport.sources.convert import original_plan
    from sdexport.sources.models import CONFIGS_DIR, read_configs

    plan = original_plan(read_configs(CONFIGS_DIR / "sd1"))
    target = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    return {k: (v.dtype if not v.is_floating_point() else target, tuple(v.shape)) for k, v in plan.items()}


def write_random_checkpoint(path: Path, plan: dict, seed: int) -> Path:
    """Stream random tensors of the plan's shapes into a safetensors file (one tensor in memory at a time)."""
    import torch

    from sdexport.sources.checkpoint import SafetensorsWriter

    gen = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(path, [(k, d, s) for k, (d, s) in plan.items()], {"format": "pt"}) as writer:
        for name, (dtype, shape) in plan.items():
            if dtype.is_floating_point:
                tensor = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
            else:
                tensor = torch.arange(shape[-1]).reshape(shape).to(dtype) if shape else torch.zeros((), dtype=dtype)
            writer.write(name, tensor)
    return path


CHILD = r"""
import torch, safetensors.torch
from sdexport.sources.merge import merge_checkpoints, merge_tensor
from sdexport.sources.checkpoint import SafetensorsWriter
kind, a, b, out, alpha, method, base = sys.argv[1:8]
base = None if base == "-" else base
baseline = rss("VmRSS:")
start = time.perf_counter()
if kind == "sdexport":
    merge_checkpoints(a, b, float(alpha), out, method=method, base=base)
elif kind == "safe_open":
    from safetensors import safe_open
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        names = list(fa.keys())
        entries = []
        for k in names:
            s = fa.get_slice(k)
            entries.append((k, getattr(torch, {"F32": "float32", "F16": "float16", "I64": "int64"}[s.get_dtype()]), tuple(s.get_shape())))
        with SafetensorsWriter(out, entries, {"format": "pt"}) as w:
            for k in names:
                w.write(k, merge_tensor(fa.get_tensor(k), fb.get_tensor(k), float(alpha)))
else:
    ta, tb = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    safetensors.torch.save_file({k: merge_tensor(ta[k], tb[k], float(alpha)) for k in ta}, out)
print(json.dumps({"baseline_rss": baseline, "peak_rss": rss("VmHWM:"), "seconds": time.perf_counter() - start}))
"""


def measure(kind: str, a: Path, b: Path, out: Path, alpha: float = 0.3, method: str = "weighted",
            base: Path | None = None) -> dict:
    """Run one merge in a fresh Python process; its peak and baseline resident memory in bytes, and seconds."""
    from sdexport.measure.child import run_child

    try:
        return run_child(CHILD, kind, a, b, out, alpha, method, base or "-")
    except RuntimeError as e:
        raise RuntimeError(f"{kind} merge failed: {e}") from None


def markdown(data: dict) -> str:
    from benchmarks.common import markdown_table

    size = data["checkpoint_bytes"]
    rows = [[r["kind"], r["method"], f"{r['baseline_rss'] / 1e9:.2f}", f"{r['peak_rss'] / 1e9:.2f}", f"{r['ratio']:.2f}x",
             f"{r['seconds']:.1f}", "yes" if r["ratio"] < GOAL else "no"] for r in data["runs"]]
    return "\n".join([
        f"# Checkpoint merge memory: two SD 1.5-sized checkpoints ({data['dtype']}, {size / 1e9:.2f} GB each)",
        "",
        f"{data['machine']['cpu']}, {data['machine']['cores']} cores; {data['machine']['date']}.",
        "Peak = the merging process's VmHWM (python + torch included); baseline = its RSS after the imports.",
        "",
        markdown_table(["reader", "method", "baseline GB", "peak GB", "peak / checkpoint", "seconds", f"< {GOAL}x"], rows),
        "",
        "sdexport reads tensors with plain file reads (large ones in 16 MB blocks of rows: the formulas are",
        "elementwise) into buffers reused by every block, and appends each merged block to the output, so the",
        "process holds a few blocks at a time.",
        "safetensors' safe_open memory-maps the inputs: every page read stays resident (and counts in RSS) until",
        "the file is closed, so its peak grows with both inputs (how much stays resident depends on the memory",
        "the machine has free); load_file holds both models and the result.",
        "add-difference reads A twice here (base = A): the memory pattern of three inputs.",
        "Seconds are wall time; the inputs were just written, so they are read from the page cache.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--naive", action="store_true", help="also measure load_file + save_file (2 models in memory)")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_info, write_results

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        plan = sd15_plan(args.dtype)
        t = time.perf_counter()
        a = write_random_checkpoint(work / "a.safetensors", plan, seed=1)
        b = write_random_checkpoint(work / "b.safetensors", plan, seed=2)
        size = a.stat().st_size
        print(f"wrote 2 x {size / 1e9:.2f} GB ({len(plan)} tensors) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        runs = [("sdexport", "weighted", None), ("sdexport", "add-difference", a), ("safe_open", "weighted", None)]
        if args.naive:
            runs.append(("load_file", "weighted", None))
        results = []
        for kind, method, base in runs:
            out = work / f"merged-{kind}-{method}.safetensors"
            r = measure(kind, a, b, out, 0.3, method, base)
            r.update(kind=kind, method=method, ratio=r["peak_rss"] / size,
                     merge_increment_ratio=(r["peak_rss"] - r["baseline_rss"]) / size)
            out.unlink()
            results.append(r)
            print(f"{kind} {method}: peak {r['peak_rss'] / 1e9:.2f} GB ({r['ratio']:.2f}x)", file=sys.stderr)
        data = {
            "benchmark": "merge", "machine": machine_info(), "dtype": args.dtype, "checkpoint_bytes": size,
            "tensors": len(plan), "goal": f"peak RSS < {GOAL}x one checkpoint", "runs": results,
        }
        md = markdown(data)
        write_results(f"merge-{args.dtype}", data, md, args.out)
        print(md)
        return 0 if all(r["ratio"] < GOAL for r in results if r["kind"] == "sdexport") else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
