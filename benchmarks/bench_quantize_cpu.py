"""ONNX int8 quantization on this CPU: size, U-Net latency, and what each precision costs in quality.

For the SD 1.5 architecture at 256x256 (random weights: enough to measure how quantization error
propagates) or the tiny test pipeline, one ONNX export per setting:

    fp32, fp16                     the reference and the usual reduced precision
    int8                           int8 weights, no calibration (dynamic MatMuls, weight-only convolutions)
    int8-static                    QDQ, int8 symmetric activations (TensorRT, arm64), calibrated on pipeline runs
    int8-static (uint8 act.)       the same with uint8 asymmetric activations (what x86 ONNX Runtime fuses)
    mixed                          int8-static with blocks kept in float to meet a PSNR target set above
                                   what int8-static reaches (so the sensitivity pass has work to do)

Per setting: artifact and U-Net size; ms per U-Net call (batch 2 = classifier-free guidance) through
the runtime's ONNX Runtime session, all settings timed interleaved in one process so that load from
other processes hits them alike; the U-Net's PSNR against fp32 on calibration inputs (recorded by the
export); and the ``sdexport quality`` report: PSNR/SSIM per component against torch fp32 on held-out
recorded inputs, and end to end against diffusers (same seed, torch-compatible RNG).

    python benchmarks/bench_quantize_cpu.py --model tiny
    nohup python benchmarks/bench_quantize_cpu.py --model sd15 > .cache/bench/quantize.log 2>&1 &

Exports are kept under .cache/bench/ (keyed by model, setting and size) and reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, bar_chart, machine_info, markdown_table, prepare_model, write_results  # noqa: E402
from sdexport.errors import SdexportError  # noqa: E402

# (label, precision, [quantize] settings)
SETTINGS = [
    ("fp32", "fp32", {}),
    ("fp16", "fp16", {}),
    ("int8 (weights)", "int8", {}),
    ("int8-static", "int8-static", {}),
    ("int8-static, uint8 act.", "int8-static", {"activations": "uint8"}),
    ("mixed", "mixed", {}),
]
PROMPTS = ("a photo of an astronaut riding a horse on mars", "a watercolor illustration of a fox in a snowy birch forest")


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").replace("--", "-")


def export_setting(src: Path, out: Path, precision: str, quantize: dict, size: int, calibration: dict) -> float | None:
    """Static export (size x size, one prompt, batched CFG); seconds, or None when already there."""
    if (out / "sdexport.json").exists():
        return None
    from sdexport.export.run import export
    from sdexport.export.targets.base import ExportOptions
    from sdexport.options import QuantizeOptions
    from sdexport.quantize.calibration import CalibrationSettings

    options = ExportOptions(target="onnx", precision=precision, height=size, width=size, batch=1, overwrite=True,
                            calibration=CalibrationSettings(**calibration), quantize=QuantizeOptions(**quantize))
    start = time.perf_counter()
    export(src, out, options, progress=True)
    return time.perf_counter() - start


def unet_latency(artifacts: dict[str, Path], rounds: int, threads: int, baseline: str = "fp32") -> dict[str, dict]:
    """ms per U-Net call through the runtime's session. Each setting is timed interleaved with the
    fp32 baseline (one call each per round), so load from other processes hits both alike, and only
    two models are in memory at a time; the ratio to fp32 is taken within each pair."""
    from runtime.backends import open_session
    from runtime.manifest import Manifest

    def open_unet(path: Path):
        manifest = Manifest.load(path)
        return open_session(manifest.component("unet"), path, {"threads": threads} if threads else {}), manifest

    base, manifest = open_unet(artifacts[baseline])
    component = manifest.component("unet")
    rng = np.random.default_rng(0)
    shape = [d if isinstance(d, int) else 2 for d in component.inputs[0].shape]
    feeds = {"sample": rng.standard_normal(shape, np.float32), "timestep": np.full((shape[0],), 500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((shape[0], 77, manifest.model.text_hidden_size), np.float32)}
    base.run(feeds)
    out, base_all = {}, []
    for label, path in artifacts.items():
        if label == baseline:
            continue
        session, _ = open_unet(path)
        session.run(feeds)  # warm-up
        mine, theirs = [], []
        for _ in range(rounds):
            for target, session_ in ((theirs, base), (mine, session)):
                start = time.perf_counter()
                session_.run(feeds)
                target.append((time.perf_counter() - start) * 1e3)
        base_all += theirs
        out[label] = {"median_ms": float(np.median(mine)), "min_ms": float(np.min(mine)), "max_ms": float(np.max(mine)),
                      "fp32_median_ms_same_rounds": float(np.median(theirs)),
                      "speedup_vs_fp32": float(np.median(theirs) / np.median(mine)), "rounds": rounds, "batch": shape[0]}
        del session
        gc.collect()
    out[baseline] = {"median_ms": float(np.median(base_all)), "min_ms": float(np.min(base_all)), "max_ms": float(np.max(base_all)),
                     "speedup_vs_fp32": 1.0, "rounds": len(base_all), "batch": shape[0]}
    return {label: out[label] for label in artifacts}


def combined_grid(rows: dict[str, list], labels: list[str], path: Path, tile: int = 192) -> None:
    """One row per prompt: reference (torch fp32) | each setting, with its image PSNR."""
    from PIL import Image, ImageDraw

    header = 18
    columns = ["diffusers fp32"] + labels
    canvas = Image.new("RGB", (tile * len(columns), header + tile * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((c * tile + 3, 3), title[:30], fill="black")
    for r, (prompt, cells) in enumerate(rows.items()):
        for c, (image, caption) in enumerate(cells):
            canvas.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (c * tile, header + r * tile))
            draw.text((c * tile + 3, header + r * tile + 3), caption, fill="yellow")
    canvas.save(path)


def _db(v) -> str:
    return "identical" if v is None else f"{v:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--size", type=int, help="pixels (default: 256 for sd15, 64 for tiny)")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench"))
    parser.add_argument("--calibration-prompts", type=int, default=4)
    parser.add_argument("--calibration-steps", type=int, default=8)
    parser.add_argument("--mixed-margin", type=float, default=3.0, help="mixed target: int8-static's PSNR + this (dB)")
    parser.add_argument("--steps", type=int, default=12, help="end-to-end denoising steps")
    parser.add_argument("--rounds", type=int, default=5, help="timed U-Net calls per setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="labels of the settings to run (default: all)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    size = args.size or (256 if args.model == "sd15" else 64)
    src = prepare_model(args.model, work)
    calibration = {"samples": args.calibration_prompts * 4, "per_prompt": 4, "steps": args.calibration_steps,
                   "scheduler": "dpmpp-2m"}
    name = f"quantize-cpu-{args.model}"
    out_dir = Path(args.out)
    settings = [s for s in SETTINGS if not args.only or s[0] in args.only]
    result: dict = {"schema": "sdexport-bench-quantize/1", "machine": machine_info(), "model": args.model,
                    "size": size, "calibration": calibration, "settings": {}}

    # --- exports ---------------------------------------------------------------------------------
    artifacts: dict[str, Path] = {}
    for label, precision, quantize in settings:
        quantize = {**quantize, "eval_samples": 4 if args.model == "sd15" else 8}
        if precision == "mixed":
            if "int8-static" not in artifacts:
                continue
            static = json.loads((artifacts["int8-static"] / "sdexport.json").read_text())
            reached = static["components"]["unet"]["details"]["quantization"]["psnr_db"]
            quantize["min_psnr"] = float(math.ceil(reached + args.mixed_margin))
        out = work / f"quant-{args.model}-{slug(label)}-{size}"
        print(f"== {label}: exporting to {out}", file=sys.stderr, flush=True)
        try:
            seconds = export_setting(src, out, precision, quantize, size, calibration)
        except SdexportError as e:  # recorded, and the other settings still run
            print(f"   failed: {e}", file=sys.stderr, flush=True)
            result["failed"] = {**result.get("failed", {}), label: str(e)}
            continue
        artifacts[label] = out
        manifest = json.loads((out / "sdexport.json").read_text())
        unet = manifest["components"]["unet"]
        q = unet["details"].get("quantization", {})
        result["settings"][label] = {
            "precision": precision, "artifact": str(out), "export_seconds": seconds,
            "artifact_bytes": sum(f["bytes"] for c in manifest["components"].values() for f in c["files"]),
            "unet_bytes": sum(f["bytes"] for f in unet["files"]),
            "unet_precision": unet["precision"],
            "unet_psnr_calibration_db": q.get("psnr_db"),
            "unet_psnr_export_gate_db": unet["parity"].get("psnr_db"),
            "mixed": {k: q.get(k) for k in ("min_psnr_db", "kept_float", "int8_static_psnr_db", "sensitivity")} if precision == "mixed" else None,
            "components": {n: {"precision": c["precision"], "bytes": sum(f["bytes"] for f in c["files"])}
                           for n, c in manifest["components"].items()},
        }
        gc.collect()

    # --- latency ---------------------------------------------------------------------------------
    print("== U-Net latency", file=sys.stderr, flush=True)
    latency = unet_latency(artifacts, args.rounds, args.threads)
    for label, timing in latency.items():
        result["settings"][label]["unet_latency"] = timing
    write_results(name, result, report(result), out_dir)

    # --- quality ---------------------------------------------------------------------------------
    from sdexport.measure.quality import QualityConfig, run_quality, write_report

    config = QualityConfig(prompts=PROMPTS, seeds=(1,), steps=args.steps, samples=4, calibration_steps=args.calibration_steps,
                           threads=args.threads)
    cache: dict = {}
    grid_rows: dict[str, list] = {}
    for label, path in artifacts.items():
        print(f"== quality: {label}", file=sys.stderr, flush=True)
        quality = run_quality(path, src, config, progress=True, cache=cache)
        write_report(quality, out_dir / name / slug(label))
        for run in quality["end_to_end"]["runs"]:
            ref, ours = run["_images"]
            cells = grid_rows.setdefault(run["prompt"], [(ref, "")])
            cells.append((ours, f"{_db(run['psnr_db'])} dB"))
        entry = result["settings"][label]
        entry["quality"] = {
            "components": {n: {k: c.get(k) for k in ("precision", "bytes", "psnr_db", "psnr_db_worst_input", "ssim", "max_abs_err")}
                           for n, c in quality["components"].items()},
            "end_to_end": {k: v for k, v in quality["end_to_end"].items() if k != "runs"},
            "runs": [{k: v for k, v in r.items() if k != "_images"} for r in quality["end_to_end"]["runs"]],
        }
        write_results(name, result, report(result), out_dir)
        gc.collect()

    labels = list(artifacts)
    combined_grid(grid_rows, labels, out_dir / f"{name}-grid.png")
    bar_chart(out_dir / f"{name}-latency.png", f"U-Net call, batch 2, {size}x{size}, ONNX Runtime CPU ({args.threads} threads)",
              labels, [result["settings"][k]["unet_latency"]["median_ms"] for k in labels])
    bar_chart(out_dir / f"{name}-size.png", "U-Net file size", labels,
              [result["settings"][k]["unet_bytes"] / 1e6 for k in labels], unit="MB")
    write_results(name, result, report(result), out_dir)
    print(report(result))


def report(r: dict) -> str:
    m = r["machine"]
    rows = []
    for label, s in r["settings"].items():
        lat = s.get("unet_latency", {}).get("median_ms")
        speedup = s.get("unet_latency", {}).get("speedup_vs_fp32")
        q = s.get("quality", {})
        comps = q.get("components", {})
        e2e = q.get("end_to_end", {})
        rows.append([
            label, s["unet_precision"], f"{s['unet_bytes'] / 1e6:.0f}", f"{s['artifact_bytes'] / 1e6:.0f}",
            "-" if lat is None else f"{lat:,.0f}", "-" if speedup is None else f"{speedup:.2f}x",
            "-" if s["unet_psnr_calibration_db"] is None else _db(s["unet_psnr_calibration_db"]),
            *[_db(comps[n]["psnr_db"]) if n in comps else "-" for n in ("text_encoder", "unet", "vae_decoder")],
            _db(e2e.get("psnr_db")) if e2e else "-", f"{e2e['ssim_mean']:.3f}" if e2e.get("ssim_mean") is not None else "-",
        ])
    lines = [
        f"# ONNX int8 quantization on this CPU: {r['model']} at {r['size']}x{r['size']}",
        "",
        f"{m['cpu']} ({m['cores']} cores, shared with other jobs: latencies are medians of interleaved calls); "
        f"onnxruntime {m['libraries'].get('onnxruntime')}; calibration: {r['calibration']['samples']} U-Net inputs from "
        f"{r['calibration']['samples'] // 4} prompts x {r['calibration']['steps']} steps ({r['calibration']['scheduler']}).",
        "",
        markdown_table(
            ["setting", "U-Net precision", "U-Net MB", "all MB", "U-Net ms (batch 2)", "vs fp32",
             "U-Net PSNR on calibration dB", "text enc. PSNR dB", "U-Net PSNR dB", "VAE dec. PSNR dB",
             "image PSNR dB", "image SSIM"], rows),
        "",
        "U-Net ms: median of interleaved calls, each setting paired with fp32 (vs fp32: the ratio within the pair). "
        "U-Net PSNR on calibration: against the fp32 ONNX model on the export's calibration inputs (what `mixed` "
        "must meet). Component PSNR: `sdexport quality` against torch fp32 on held-out recorded inputs (seed 1). "
        "Image PSNR/SSIM: end to end against diffusers fp32, same prompts and seeds.",
    ]
    for label, error in r.get("failed", {}).items():
        lines += ["", f"{label}: export failed: {error}"]
    mixed = next((s["mixed"] for s in r["settings"].values() if s.get("mixed")), None)
    if mixed:
        kept = (mixed.get("kept_float") or {}).get("blocks") or []
        lines += ["", f"mixed: target {mixed['min_psnr_db']:g} dB (int8-static reaches {_db(mixed['int8_static_psnr_db'])} dB); "
                      f"kept in float (fp16 weights): {', '.join(kept) or 'nothing'}."]
        sens = (mixed.get("sensitivity") or {}).get("sensitivity")
        if sens:
            lines += ["", "Sensitivity (each block quantized alone, U-Net PSNR on calibration inputs):", "",
                      markdown_table(["block", "quantized nodes", "PSNR dB"],
                                     [[b, v["nodes"], _db(v["psnr_db"])] for b, v in sorted(sens.items(), key=lambda kv: kv[1]["psnr_db"] or 1e9)])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
