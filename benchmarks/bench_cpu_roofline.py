"""How fast can an fp32 U-Net call be on this CPU? Its arithmetic against the CPU's measured f32 peak.

Counts the FLOPs of one U-Net call (SD 1.5 architecture, batch 2) by kind: convolutions and Linear
layers with torch's FlopCounterMode, attention from the shapes scaled_dot_product_attention is called
with (4 * B * heads * N * M * d). Measures this machine's f32 peak (an OpenVINO MatMul of 2048^3, a
oneDNN 3x3 convolution through torch, torch.mm) and the U-Net call itself: diffusers alone, then
OpenVINO fp32 with direct convolutions and with the export's Winograd plan, interleaved round by
round so that drift of a shared machine hits both alike. From these: the fastest any engine computing every
multiplication (direct convolutions) can be, FLOPs / peak, and what that means against diffusers.

    python benchmarks/bench_cpu_roofline.py       # needs the fp32 export bench_openvino_cpu.py writes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, markdown_table, prepare_model, timeit, unet_feeds, write_results  # noqa: E402


def count_flops(unet, feeds) -> dict[str, float]:
    """FLOPs of one call by kind; attention counted from the SDPA calls' shapes."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    attention = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        b, h, n, d = q.shape
        attention.append(4.0 * b * h * n * k.shape[-2] * d)  # Q K^T and (softmax) V, 2 FLOPs per MAC
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(*feeds)
    finally:
        F.scaled_dot_product_attention = sdpa
    by_op = {str(k): float(v) for k, v in counter.get_flop_counts()["Global"].items()}
    counted_attention = sum(v for k, v in by_op.items() if "attention" in k)
    return {
        "convolution": by_op.get("aten.convolution", 0.0),
        "linear (addmm, mm, bmm)": sum(by_op.get(k, 0.0) for k in ("aten.addmm", "aten.mm", "aten.bmm")),
        "attention (SDPA)": counted_attention or sum(attention),
    }


def openvino_matmul_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([n, n], np.float32)
    w = ops.constant((np.random.default_rng(0).standard_normal((n, n)) * 0.02).astype(np.float32))
    compiled = ov.Core().compile_model(ov.Model([ops.matmul(a, w, False, True)], [a]), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                                        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    return 2 * n**3 / _best(lambda: request.infer([x]), repeats) / 1e9


def torch_gflops(threads: int, repeats: int = 10) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x, conv = torch.randn(2, 320, 64, 64), torch.nn.Conv2d(320, 320, 3, padding=1)
    with torch.no_grad():
        mm = 2 * 2048**3 / _best(lambda: a @ b, repeats) / 1e9
        cv = 2 * 2 * 320 * 320 * 9 * 64 * 64 / _best(lambda: conv(x), repeats) / 1e9
    return {"torch.mm 2048^3": mm, "torch conv3x3 320->320 2x64x64 (oneDNN)": cv}


def _best(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls after 3 warm-up calls: a peak, not a typical time."""
    return timeit(fn, repeats, warmup=3)["min_ms"] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--artifact", type=Path, help="OpenVINO fp32 static export (default: the OpenVINO bench's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    artifact = args.artifact or args.work / f"sd15-openvino-fp32-{args.size}"
    if not (artifact / "sdexport.json").exists():
        sys.exit(f"bench_cpu_roofline: error: {artifact}: no export; run benchmarks/bench_openvino_cpu.py first")

    import torch
    from diffusers import UNet2DConditionModel

    from runtime.backends import open_session
    from runtime.manifest import Manifest

    torch.set_num_threads(args.threads)
    src = prepare_model("sd15", args.work)
    unet = UNet2DConditionModel.from_pretrained(str(src), subfolder="unet").eval()
    manifest = Manifest.load(artifact)
    component = manifest.component("unet")
    feeds = unet_feeds(manifest.model, args.size)
    tfeeds = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")]
    flops = count_flops(unet, tfeeds)
    total = sum(flops.values())
    print(f"U-Net call: {total / 1e9:.1f} GFLOP", file=sys.stderr)

    peaks = {"OpenVINO MatMul 2048^3": openvino_matmul_gflops(args.threads), **torch_gflops(args.threads)}
    peak = max(peaks.values())
    print(f"peaks GFLOP/s: {peaks}", file=sys.stderr)

    # diffusers first and alone: torch's OpenMP threads and OpenVINO's TBB threads spin-wait after a
    # call, so interleaving the two runtimes on 2 cores slows torch (measured: 2,278 ms interleaved
    # against 1,765-1,868 ms alone), which would flatter us. The two OpenVINO settings are interleaved.
    times: dict[str, list[float]] = {"diffusers fp32 (PyTorch)": []}
    with torch.no_grad():
        unet(*tfeeds)
        for _ in range(args.rounds):
            start = time.perf_counter()
            unet(*tfeeds)
            times["diffusers fp32 (PyTorch)"].append((time.perf_counter() - start) * 1e3)
    del unet
    sessions = {
        "OpenVINO fp32, direct convolutions": open_session(component, artifact, {"threads": args.threads, "cache_dir": "",
                                                                                  "winograd": "off"}),
        "OpenVINO fp32, Winograd plan": open_session(component, artifact, {"threads": args.threads, "cache_dir": ""}),
    }
    for name, session in sessions.items():
        session.run(feeds)
        times[name] = []
    for _ in range(args.rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    median = {name: float(np.median(v)) for name, v in times.items()}
    base = median["diffusers fp32 (PyTorch)"]
    floor_ms = total / peak / 1e6
    result = {
        "machine": machine_info(), "size": args.size, "batch": 2, "threads": args.threads, "rounds": args.rounds,
        "flops": flops, "total_flops": total, "peak_gflops": peaks, "unet_ms": times, "median_ms": median,
        "floor_ms_direct_fp32": floor_ms, "max_speedup_direct_fp32": base / floor_ms,
        "winograd_plan": {k: v for k, v in component.details.get("winograd", {}).items() if k != "layers"},
    }
    rows = [[k, f"{v / 1e9:.1f}", f"{100 * v / total:.0f}%"] for k, v in flops.items()] + [["total", f"{total / 1e9:.1f}", "100%"]]
    engine_rows = [[name, ms, base / ms, f"{total / ms / 1e6:.0f}", f"{100 * total / ms / 1e6 / peak:.0f}%"]
                   for name, ms in median.items()]
    md = "\n".join([
        f"# fp32 roofline of the SD 1.5 U-Net call on this CPU ({args.size}x{args.size}, batch 2, {args.threads} threads)",
        f"machine: {result['machine']['cpu']} ({result['machine']['cores']} cores); command: `{result['machine']['command']}`",
        "",
        "## Arithmetic of one call",
        "",
        markdown_table(["kind", "GFLOP", "share"], rows),
        "",
        "## Measured f32 peak (GFLOP/s, best of 10)",
        "",
        markdown_table(["kernel", "GFLOP/s"], [[k, f"{v:.0f}"] for k, v in peaks.items()]),
        "",
        f"## U-Net call, median of {args.rounds} (diffusers alone, then the two OpenVINO settings interleaved)",
        "",
        markdown_table(["engine", "ms", "x diffusers", "GFLOP/s (direct FLOPs / time)", "of peak"], engine_rows),
        "",
        f"- fastest possible fp32 call computing every multiplication: {total / 1e9:.0f} GFLOP / {peak:.0f} GFLOP/s = "
        f"**{floor_ms:.0f} ms, {base / floor_ms:.2f}x diffusers** in this run (before any memory traffic, "
        f"normalization, softmax or layout work)",
        f"- 2.5x diffusers would need {base / 2.5:.0f} ms, i.e. {total / (base / 2.5) / 1e6:.0f} GFLOP/s of direct FLOPs",
        "- only fewer multiplications go below the floor: the Winograd plan "
        f"({result['winograd_plan'].get('convolutions', 0)} of {result['winograd_plan'].get('of_eligible', 0)} 3x3 convolutions) "
        f"gives {median['OpenVINO fp32, Winograd plan']:.0f} ms; the Linear layers alone "
        f"({flops['linear (addmm, mm, bmm)'] / 1e9:.0f} GFLOP) need {flops['linear (addmm, mm, bmm)'] / peak / 1e6:.0f} ms at peak",
    ])
    write_results(f"cpu-roofline-sd15-{args.size}", result, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
