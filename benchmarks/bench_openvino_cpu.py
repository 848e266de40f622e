"""OpenVINO and ONNX Runtime on this CPU against diffusers (PyTorch fp32), SD 1.5 architecture, one process.

For each setting: milliseconds per U-Net call (batch 2 = classifier-free guidance), end-to-end txt2img
time (tokenizer to PNG-ready image), image PSNR against the OpenVINO fp32 image and against diffusers
(same seed, torch-compatible RNG), artifact sizes; and cold start (a child process from its start to
the first image) with an empty and with a warm compiled-model cache.

Settings: diffusers fp32; ONNX Runtime fp32 (the onnx target, same static shapes); OpenVINO fp32 IR with
the f32 precision hint (parity; the export's Winograd plan applied, as users get it, and without it:
direct convolutions) and with bf16 (this CPU's native choice); int8 weight-only; int4 weights (U-Net);
hybrid (int8 activations for the convolutions, calibrated on real pipeline runs); int8-static (int8
activations for the MatMuls too, same calibration) - each quantized IR under both hints.

    python benchmarks/bench_openvino_cpu.py                 # SD 1.5 architecture at 256x256
    python benchmarks/bench_openvino_cpu.py --model tiny    # a quick check of the script itself

Exports are cached under .cache/bench/ (keyed by model, precision and size).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, bar_chart, machine_info, markdown_table, prepare_model, timeit, unet_feeds, write_results  # noqa: E402
from runtime.metrics import psnr  # noqa: E402

PROMPT = "a photo of a red circle in the top left on a blue background"
PRECISIONS = ("fp32", "int8", "int4", "hybrid", "int8-static")

# (label, export, OpenVINO INFERENCE_PRECISION_HINT); "onnx-fp32" is the onnx target, the rest openvino.
# Labels ending in DIRECT run with the runtime's winograd option off.
FP32 = "OpenVINO fp32, f32 hint"
DIRECT = ", direct convolutions"
SETTINGS = [
    ("ONNX Runtime fp32", "onnx-fp32", None),
    (FP32, "fp32", "f32"),
    (FP32 + DIRECT, "fp32", "f32"),
    ("OpenVINO fp32, bf16 hint", "fp32", "bf16"),
    ("OpenVINO int8 weights, f32 hint", "int8", "f32"),
    ("OpenVINO int8 weights, bf16 hint", "int8", "bf16"),
    ("OpenVINO int4 weights, f32 hint", "int4", "f32"),
    ("OpenVINO int4 weights, bf16 hint", "int4", "bf16"),
    ("OpenVINO hybrid int8, f32 hint", "hybrid", "f32"),
    ("OpenVINO hybrid int8, bf16 hint", "hybrid", "bf16"),
    ("OpenVINO int8-static, f32 hint", "int8-static", "f32"),
    ("OpenVINO int8-static, bf16 hint", "int8-static", "bf16"),
]

def export_static(src: Path, out: Path, target: str, precision: str, size: int, calibration: dict) -> float | None:
    """Static export (size x size, one prompt per call); returns seconds, or None when cached."""
    if (out / "sdexport.json").exists():
        return None
    from sdexport.export.run import export
    from sdexport.export.targets.base import ExportOptions
    from sdexport.quantize.calibration import CalibrationSettings

    options = ExportOptions(target=target, precision=precision, height=size, width=size, batch=1,
                            calibration=CalibrationSettings(**calibration), overwrite=True)
    start = time.perf_counter()
    export(src, out, options, progress=True)
    return time.perf_counter() - start


def runtime_overhead(stats: dict) -> dict:
    """The runtime's own share of one generation (tokenizer, scheduler, CFG arithmetic, image
    conversion): its total time minus the model calls, from the pipeline's per-component timings."""
    seconds = stats["component_seconds"]
    own = seconds["total"] - sum(v for k, v in seconds.items() if k != "total")
    return {"seconds": own, "percent_of_end_to_end": 100.0 * own / seconds["total"]}


def overhead_line(runtime_stats: dict) -> str:
    parts = [f"{label} {v['overhead']['seconds'] * 1e3:.0f} ms ({v['overhead']['percent_of_end_to_end']:.2f}%)"
             for label, v in runtime_stats.items()]
    return "- runtime overhead per generation (end to end minus model calls): " + "; ".join(parts)


def runtime_options(label: str, threads: int, hint: str | None, cache: str | None) -> dict:
    """Backend options: OpenVINO settings take a precision hint, a cache and the Winograd switch; ONNX Runtime none."""
    if hint is None:
        return {"threads": threads}
    return {"threads": threads, "precision_hint": hint, "cache_dir": cache,
            "winograd": "off" if label.endswith(DIRECT) else "auto"}


def winograd_line(artifact: Path) -> str:
    """What the fp32 export's Winograd plan does to the U-Net, from its manifest."""
    from runtime.manifest import Manifest

    plan = Manifest.load(artifact).component("unet").details.get("winograd")
    if not plan:
        return "- U-Net Winograd plan: none"
    tiles = {}
    for layer in plan["layers"]:
        tiles[layer["tile"]] = tiles.get(layer["tile"], 0) + layer["count"]
    split = ", ".join(f"{n} {'direct' if t == 0 else f'F({t}x{t},3x3)'}" for t, n in sorted(tiles.items(), reverse=True))
    return (f"- U-Net Winograd plan (tuned at export, {plan['tuned_on']['threads']} threads): {plan['convolutions']} of "
            f"{plan['of_eligible']} 3x3 convolutions rewritten ({split}); measured per layer at export: "
            f"{plan.get('measured_saving_ms', 0):.0f} ms less per call; "
            f"+{plan['extra_weight_bytes'] / 1e6:,.0f} MB of transformed weights in memory")


def artifact_sizes(directory: Path) -> dict:
    from runtime.manifest import Manifest

    manifest = Manifest.load(directory)
    return {name: {"precision": c.precision, "bytes": c.size_bytes, "parity_psnr_db": c.parity.get("psnr_db")}
            for name, c in manifest.components.items()}


def cold_start(artifact: Path, options: dict, cache: Path | None, args, size: int, out_png: Path) -> dict:
    """The shared harness (sdexport.measure.cold_start), warmed up and seeded like the timed runs."""
    from sdexport.measure.cold_start import cold_start as measure

    return measure("runtime", artifact, PROMPT, steps=args.steps, height=size, width=size, scheduler=args.scheduler,
                   options=dict(options, cache_dir=str(cache) if cache else ""), warmup=True, seed=1, save=out_png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "sd15"), default="sd15")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 256 sd15, 64 tiny)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="dpmpp-2m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--e2e-repeats", type=int, default=2)
    ap.add_argument("--calibration-samples", type=int, default=64)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                    help="OpenVINO exports to measure (default: all)")
    ap.add_argument("--export-only", action="store_true", help="write (or reuse) the exports and stop")
    args = ap.parse_args()
    size = args.size or (256 if args.model == "sd15" else 64)

    import torch

    from sdexport.errors import SdexportError

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    src = prepare_model(args.model, args.work)
    calibration = {"samples": args.calibration_samples, "steps": args.steps, "scheduler": args.scheduler}
    artifacts, export_seconds, export_failures = {}, {}, {}
    for precision in ("onnx-fp32", *args.precisions):
        target = "onnx" if precision.startswith("onnx") else "openvino"
        out = args.work / f"{args.model}-{target}-{precision.removeprefix('onnx-')}-{size}"
        try:
            seconds = export_static(src, out, target, precision.removeprefix("onnx-"), size, calibration)
        except SdexportError as e:  # reported in the results, the other settings still run
            export_failures[precision] = str(e)
            print(f"export {precision} failed: {e}", file=sys.stderr)
            continue
        finally:
            gc.collect()
        artifacts[precision] = out
        if seconds is not None:
            export_seconds[precision] = seconds
    if args.export_only:
        return

    import diffusers

    from runtime import Pipeline
    from sdexport.measure.reference_schedulers import use_scheduler

    results: dict = {"machine": machine_info(), "model": args.model, "size": size, "batch": 2, "steps": args.steps,
                     "scheduler": args.scheduler, "threads": args.threads, "calibration": calibration,
                     "export_seconds": export_seconds, "export_failures": export_failures}
    e2e_kwargs = dict(steps=args.steps, scheduler=args.scheduler, seed=1, rng="torch", height=size, width=size)
    per_call, e2e, images = {}, {}, {}

    # --- diffusers / PyTorch fp32 --------------------------------------------------------------
    pipe_pt = diffusers.StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
    pipe_pt.set_progress_bar_config(disable=True)
    use_scheduler(pipe_pt, args.scheduler)
    info = Pipeline.from_dir(artifacts["fp32"]).info
    feeds = unet_feeds(info, size)
    tfeeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
    label_pt = f"diffusers fp32 ({args.threads} threads)"
    with torch.no_grad():
        per_call[label_pt] = timeit(lambda: pipe_pt.unet(tfeeds["sample"], tfeeds["timestep"], tfeeds["encoder_hidden_states"]),
                                    args.repeats)
        pt_images = []

        def run_pt():
            pt_images.append(pipe_pt(PROMPT, num_inference_steps=args.steps, height=size, width=size,
                                     generator=torch.Generator().manual_seed(1)).images[0])

        e2e[label_pt] = timeit(run_pt, args.e2e_repeats, warmup=0)
    images[label_pt] = pt_images[-1]
    del pipe_pt, tfeeds
    gc.collect()
    print(f"{label_pt}: U-Net {per_call[label_pt]['median_ms']:.0f} ms, e2e {e2e[label_pt]['median_ms'] / 1e3:.1f} s", file=sys.stderr)

    # --- OpenVINO settings ----------------------------------------------------------------------
    runtime_stats = {}
    with tempfile.TemporaryDirectory(prefix="sdexport-bench-ovcache-") as cache:
        for label, precision, hint in SETTINGS:
            if precision not in artifacts:
                continue
            options = runtime_options(label, args.threads, hint, cache)
            pipe = Pipeline.from_dir(artifacts[precision], options=options)
            start = time.perf_counter()
            pipe.warmup()
            open_s = time.perf_counter() - start
            unet = pipe.session("unet")
            per_call[label] = timeit(lambda: unet.run(feeds), args.repeats)
            runs = []
            e2e[label] = timeit(lambda: runs.append(pipe.generate(PROMPT, **e2e_kwargs)), args.e2e_repeats, warmup=0)
            images[label] = runs[-1].image
            runtime_stats[label] = {"open_s": open_s, "component_seconds": runs[-1].timings, "calls": runs[-1].calls}
            runtime_stats[label]["overhead"] = runtime_overhead(runtime_stats[label])
            print(f"{label}: U-Net {per_call[label]['median_ms']:.0f} ms, e2e {e2e[label]['median_ms'] / 1e3:.1f} s",
                  file=sys.stderr)
            del pipe, unet, runs
            gc.collect()

    # --- parity of the images -------------------------------------------------------------------
    def image_psnr(a, b) -> float:
        return psnr(np.asarray(a, np.float64), np.asarray(b, np.float64), peak=255.0)

    ref_ov = images[FP32]
    parity = {label: {"psnr_db_vs_openvino_fp32": image_psnr(ref_ov, img), "psnr_db_vs_diffusers": image_psnr(images[label_pt], img)}
              for label, img in images.items()}
    image_dir = args.work / f"openvino-cpu-{args.model}-{size}-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, (label, img) in enumerate(images.items()):
        slug = "-".join(part.replace(" ", "_") for part in label.replace("(", "").replace(")", "").split(", "))
        img.save(image_dir / f"{i}-{slug}.png")

    # --- cold start -----------------------------------------------------------------------------
    best = max((s for s in SETTINGS if s[0] in per_call and s[0].startswith("OpenVINO")), key=lambda s: (parity[s[0]]["psnr_db_vs_openvino_fp32"] >= 30.0,
                                                      -per_call[s[0]]["median_ms"]))
    cold = {}
    fp32 = [s for s in SETTINGS if s[0] in (FP32, FP32 + DIRECT)]
    for label, precision, hint in fp32 + ([best] if best not in fp32 else []):
        options = runtime_options(label, args.threads, hint, None)
        with tempfile.TemporaryDirectory(prefix="sdexport-bench-cold-") as tmp:
            cache = Path(tmp) / "cache"
            cold[label] = {
                "no cache": cold_start(artifacts[precision], options, None, args, size, Path(tmp) / "a.png"),
                "empty cache": cold_start(artifacts[precision], options, cache, args, size, Path(tmp) / "b.png"),
                "warm cache": cold_start(artifacts[precision], options, cache, args, size, Path(tmp) / "c.png"),
                "cache_bytes": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()),
            }
        print(f"cold start {label}: {json.dumps(cold[label])}", file=sys.stderr)

    sizes = {p: artifact_sizes(a) for p, a in artifacts.items()}
    base_ms = per_call[label_pt]["median_ms"]
    base_e2e = e2e[label_pt]["median_ms"]
    results.update(per_call=per_call, end_to_end=e2e, image_parity=parity, runtime=runtime_stats,
                   cold_start=cold, artifact_sizes=sizes,
                   speedup_per_call={k: base_ms / v["median_ms"] for k, v in per_call.items()},
                   speedup_end_to_end={k: base_e2e / v["median_ms"] for k, v in e2e.items()},
                   best_setting=best[0])

    # --- report ---------------------------------------------------------------------------------
    rows = []
    for label in per_call:
        p = parity[label]
        rows.append([label, per_call[label]["median_ms"], base_ms / per_call[label]["median_ms"],
                     e2e[label]["median_ms"] / 1e3, base_e2e / e2e[label]["median_ms"],
                     "-" if label == FP32 else f"{p['psnr_db_vs_openvino_fp32']:.1f}",
                     "-" if label == label_pt else f"{p['psnr_db_vs_diffusers']:.1f}"])
    size_rows = []
    for precision, comps in sizes.items():
        total = sum(c["bytes"] for c in comps.values())
        size_rows.append([precision if precision.startswith("onnx") else f"openvino-{precision}", *(f"{comps[n]['bytes'] / 1e6:,.1f} ({comps[n]['precision']})" for n in
                                       ("text_encoder", "unet", "vae_encoder", "vae_decoder")), f"{total / 1e6:,.1f}",
                          f"{comps['unet']['parity_psnr_db'] or float('inf'):.1f}"])
    cold_rows = [[label, f"{v['no cache']['wall_s']:.1f}", f"{v['empty cache']['wall_s']:.1f}", f"{v['warm cache']['wall_s']:.1f}",
                  f"{v['empty cache']['open_s']:.1f} / {v['warm cache']['open_s']:.1f}", f"{v['cache_bytes'] / 1e6:,.0f}",
                  f"{v['no cache'].get('peak_rss_mb') or 0:,.0f} / {v['warm cache'].get('peak_rss_mb') or 0:,.0f}"]
                 for label, v in cold.items()]
    fp32_ms = per_call[FP32]["median_ms"]
    direct_ms = per_call[FP32 + DIRECT]["median_ms"]
    best_ms = per_call[best[0]]["median_ms"]
    name = f"openvino-cpu-{args.model}-{size}"
    md = "\n".join([
        f"# OpenVINO and ONNX Runtime vs diffusers on CPU: {args.model} architecture at {size}x{size}, batch 2 (CFG), {args.threads} threads",
        f"machine: {results['machine']['cpu']} ({results['machine']['cores']} cores); command: `{results['machine']['command']}`; "
        f"openvino {results['machine']['libraries'].get('openvino')}, nncf {results['machine']['libraries'].get('nncf')}, "
        f"torch {results['machine']['libraries'].get('torch')}",
        "",
        f"End to end: {args.steps} steps {args.scheduler}, seed 1, torch-compatible RNG, static IR ({size}x{size}, one prompt). "
        "Image PSNR on the 8-bit images.",
        "",
        markdown_table(["setting", "U-Net ms", "x diffusers", "end to end s", "x diffusers", "image PSNR vs OV fp32 dB",
                        "image PSNR vs diffusers dB"], rows),
        "",
        f"- OpenVINO fp32 (f32 hint) per U-Net call: {base_ms / fp32_ms:.2f}x diffusers (goal >= 2.5x); "
        f"with direct convolutions {base_ms / direct_ms:.2f}x",
        winograd_line(artifacts["fp32"]),
        f"- best setting with image PSNR >= 30 dB vs fp32: **{best[0]}**, {base_ms / best_ms:.2f}x diffusers per U-Net call (goal >= 5x), "
        f"image PSNR {parity[best[0]]['psnr_db_vs_openvino_fp32']:.1f} dB vs OpenVINO fp32",
        overhead_line(runtime_stats),
        "",
        "## Artifact sizes (MB, component precision) and U-Net parity vs torch at export",
        "",
        markdown_table(["export", "text_encoder", "unet", "vae_encoder", "vae_decoder", "total MB", "U-Net PSNR dB"], size_rows),
        "",
        "## Cold start: child process start to first image (s)",
        "",
        markdown_table(["setting", "no cache", "empty cache", "warm cache", "open+compile s (empty / warm)", "cache MB",
                        "peak RSS MB (no cache / warm)"], cold_rows),
        "",
        f"Calibration for hybrid: {json.dumps(calibration)}; export seconds this run: "
        f"{json.dumps({k: round(v) for k, v in export_seconds.items()}) if export_seconds else 'exports were cached'}.",
    ])
    out = write_results(name, results, md, args.out)
    bar_chart(out / f"{name}.png", f"U-Net call, {args.model} {size}x{size} batch 2, CPU {args.threads} threads (ms, lower is better)",
              list(per_call), [v["median_ms"] for v in per_call.values()])
    print(md)


if __name__ == "__main__":
    main()
