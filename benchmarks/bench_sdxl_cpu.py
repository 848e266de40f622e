"""SDXL architecture on this CPU: diffusers (PyTorch fp32) vs ONNX Runtime fp32 vs OpenVINO fp32 / int8-static.

Per U-Net call (batch 2 = classifier-free guidance, with text_embeds and time_ids), end-to-end txt2img
time, image PSNR against diffusers (same seed, torch-compatible RNG), artifact sizes, and peak resident
memory of each export and of each engine's run. Every export and every engine runs in its own fresh
process (its peak is its own, and one engine's 14 GB is freed before the next loads).

    python benchmarks/bench_sdxl_cpu.py                 # SDXL base 1.0 architecture, random weights, 512x512
    python benchmarks/bench_sdxl_cpu.py --model tiny    # the tiny SDXL of tests/test_sdxl.py: checks the script

The full-size model is 14 GB of fp32 weights (U-Net 10.3 GB): run it alone on the machine. Exports
are cached under .cache/bench/ with their measured cost, and so is each engine's run (``--fresh``
measures them again), so an engine added later is measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, bar_chart, machine_info, markdown_table, timeit, write_results  # noqa: E402
from sdexport.measure.child import export_cost, run_child  # noqa: E402

PROMPT = "a photo of a red circle in the top left on a blue background"
DIFFUSERS = "diffusers fp32"
# label -> (export folder suffix, target, export flags). int8-static calibrates on 4 prompts x 4 steps
# (16 U-Net calls of diffusers' SDXL pipeline at 512x512, ~10 min on this CPU).
ENGINES = {
    "ONNX Runtime fp32": ("onnx", "onnx", ()),
    "OpenVINO fp32": ("openvino", "openvino", ()),
    "OpenVINO int8-static": ("openvino-int8-static", "openvino",
                             ("--precision", "int8-static", "--calibration-prompts", "4", "--calibration-steps", "4")),
}
ENGINE_CHILD = "from benchmarks.bench_sdxl_cpu import engine_child\nengine_child(sys.argv[1:], rss)\n"


def prepare(kind: str, work: Path) -> Path:
    from sdexport.demo.tiny_sdxl import save_sdxl_random, save_tiny_sdxl

    src = work / f"sdxl-{kind}-diffusers"
    if not (src / "model_index.json").exists():
        print(f"building {kind} SDXL in {src}", file=sys.stderr)
        save_sdxl_random(src) if kind == "full" else save_tiny_sdxl(src)
    return src


def export_stats(src: Path, out: Path, target: str, *extra: str) -> dict:
    """The export's wall time and peak RSS, measured in its own process (kept beside the cached export)."""
    record = out.with_name(out.name + ".export.json")
    if (out / "sdexport.json").exists() and record.exists():
        return json.loads(record.read_text())
    print(f"exporting {out.name}", file=sys.stderr)
    cost = export_cost(src, "--target", target, "--out", out, "--overwrite", *extra)
    stats = {"seconds": cost["seconds"], "peak_rss_gib": cost["peak_rss"] / 2**30, "flags": list(extra)}
    record.write_text(json.dumps(stats))
    return stats


def unet_feeds(info, size: int) -> dict[str, np.ndarray]:
    h = size // info.vae_scale_factor
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((2, 4, h, h), np.float32),
        "timestep": np.full((2,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, info.max_length, info.text_hidden_size), np.float32),
        "text_embeds": rng.standard_normal((2, info.projection_dim), np.float32),
        "time_ids": np.tile(np.asarray([[size, size, 0, 0, size, size]], np.float32), (2, 1)),
    }


def run_diffusers(src: Path, feeds: dict, size: int, steps: int, repeats: int, image: Path) -> dict:
    import time

    import diffusers
    import torch

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
    with torch.no_grad():
        unet_ms = timeit(lambda: pipe.unet(t["sample"], t["timestep"], t["encoder_hidden_states"],
                                           added_cond_kwargs=added), repeats)["median_ms"]
        start = time.perf_counter()
        out = pipe(PROMPT, num_inference_steps=steps, height=size, width=size,
                   generator=torch.Generator().manual_seed(1)).images[0]
    out.save(image)
    return {"unet_ms": unet_ms, "end_to_end_s": time.perf_counter() - start}


def run_runtime(artifact: Path, feeds: dict, size: int, steps: int, repeats: int, image: Path) -> dict:
    from runtime import Pipeline

    pipe = Pipeline.from_dir(artifact)
    session = pipe.session("unet")
    unet_ms = timeit(lambda: session.run(feeds), repeats)["median_ms"]
    result = pipe.generate(PROMPT, steps=steps, height=size, width=size, seed=1, rng="torch")
    result.image.save(image)
    return {"unet_ms": unet_ms, "end_to_end_s": result.timings["total"]}


def engine_child(argv: list[str], rss) -> None:
    """In a fresh process: one engine's U-Net call and end-to-end time, its image and its peak RSS."""
    engine, model, info_from, size, steps, repeats, image = argv
    from runtime.manifest import Manifest

    feeds = unet_feeds(Manifest.load(Path(info_from)).model, int(size))
    run = run_diffusers if engine == DIFFUSERS else run_runtime
    stats = run(Path(model), feeds, int(size), int(steps), int(repeats), Path(image))
    print(json.dumps({**stats, "peak_rss_gib": rss("VmHWM:") / 2**30}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "full"), default="full")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512 full, 64 tiny)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--fresh", action="store_true", help="measure every engine again (runs are cached per engine)")
    args = ap.parse_args()
    size = args.size or (512 if args.model == "full" else 64)
    # The full U-Net is too large to hold twice (torch + the backend) for export-time validation on this
    # machine; the end-to-end image PSNR against diffusers below is the parity check.
    validate = ("--no-validate",) if args.model == "full" else ()

    from PIL import Image

    from runtime.manifest import Manifest
    from runtime.metrics import psnr

    src = prepare(args.model, args.work)
    exports = {label: args.work / f"sdxl-{args.model}-{suffix}" for label, (suffix, _, _) in ENGINES.items()}
    exported = {label: export_stats(src, exports[label], target, *extra, *validate)
                for label, (_, target, extra) in ENGINES.items()}
    first = exports[next(iter(ENGINES))]
    runs, images = {}, {}
    for label, model in [(DIFFUSERS, src), *exports.items()]:
        stem = args.work / f"sdxl-{args.model}-{size}-{args.steps}-{label.replace(' ', '_')}"
        images[label], record = stem.with_suffix(".png"), stem.with_suffix(".run.json")
        if record.exists() and images[label].exists() and not args.fresh:
            runs[label] = json.loads(record.read_text())
            continue
        print(f"measuring {label}", file=sys.stderr)
        load = os.getloadavg()[0]  # other work on the machine shows in the times: recorded with them
        runs[label] = run_child(ENGINE_CHILD, label, model, first, size, args.steps, args.repeats, images[label])
        runs[label]["load_average_before"] = round(load, 2)
        record.write_text(json.dumps(runs[label]))
    reference = np.asarray(Image.open(images[DIFFUSERS]).convert("RGB"), np.float64)
    for label in exports:
        image = np.asarray(Image.open(images[label]).convert("RGB"), np.float64)
        runs[label]["image_psnr_db"] = psnr(reference, image, peak=255.0)
        runs[label]["artifact_bytes"] = sum(c.size_bytes for c in Manifest.load(exports[label]).components.values())
    write(args, size, runs, exported, memory_facts(first))
    pictures(args, size, runs, images)


def pictures(args, size: int, runs: dict, images: dict[str, Path]) -> None:
    """The U-Net latencies as a bar chart, and the engines' images side by side with their PSNR."""
    from PIL import Image, ImageDraw

    name = f"sdxl-{args.model}-cpu"
    bar_chart(args.out / f"{name}.png", f"SDXL {args.model} U-Net call, batch 2, {size}x{size}, CPU",
              list(runs), [r["unet_ms"] for r in runs.values()])
    tile, header = 256, 18
    canvas = Image.new("RGB", (tile * len(images), tile + header), "white")
    draw = ImageDraw.Draw(canvas)
    for col, (label, path) in enumerate(images.items()):
        canvas.paste(Image.open(path).convert("RGB").resize((tile, tile)), (col * tile, header))
        db = runs[label].get("image_psnr_db")
        caption = label if db is None else f"{label}: {'identical' if db == float('inf') else f'{db:.1f} dB'}"
        draw.text((col * tile + 3, 3), caption, fill="black")
    canvas.save(args.out / f"{name}-images.png")


def memory_facts(onnx_export: Path) -> dict:
    """The machine's memory and the ONNX U-Net's external data file: what "fits" is measured against."""
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    data = onnx_export / "unet" / "model.onnx_data"
    return {"machine_memory_gib": total / 2**30, "unet_external_data_gb": data.stat().st_size / 1e9 if data.exists() else None}


def write(args, size: int, runs: dict, exported: dict, memory: dict) -> None:
    base = runs[DIFFUSERS]
    rows = []
    for label, r in runs.items():
        psnr_db = r.get("image_psnr_db")
        rows.append([label, r["unet_ms"], f"{base['unet_ms'] / r['unet_ms']:.2f}x", r["end_to_end_s"],
                     "-" if psnr_db is None else ("identical" if psnr_db == float("inf") else f"{psnr_db:.1f}"),
                     f"{r['artifact_bytes'] / 1e9:.2f} GB" if "artifact_bytes" in r else "-",
                     f"{r['peak_rss_gib']:.1f} GiB", r.get("load_average_before", "-"),
                     f"{exported[label]['seconds']:.0f} s, {exported[label]['peak_rss_gib']:.1f} GiB" if label in exported else "-"])
    markdown = "\n".join([
        f"# SDXL {args.model} architecture, {size}x{size}, {args.steps} steps (Euler), CPU",
        "", f"`python benchmarks/bench_sdxl_cpu.py --model {args.model} --steps {args.steps}`", "",
        ("Random weights at the SDXL base 1.0 architecture" if args.model == "full" else "The tiny SDXL of the tests")
        + "; text_embeds and time_ids fed as SDXL does; each engine and each export measured in its own fresh "
        "process, one after the other, with nothing else running. Peak RSS is VmHWM, which counts the weight "
        "files the engines and torch memory-map; \"load before\" is the 1-minute load average as the engine "
        "started (about 2 after the previous engine's own 2-thread run, decaying). Images: "
        f"`sdxl-{args.model}-cpu-images.png`; U-Net latencies: `sdxl-{args.model}-cpu.png`.", "",
        markdown_table(["engine", "U-Net call, batch 2 (ms)", "vs diffusers", "end to end (s)",
                        "image PSNR vs diffusers (dB)", "artifact", "run peak RSS", "load before",
                        "export: time, peak RSS"], rows),
        "", f"Machine memory {memory['machine_memory_gib']:.1f} GiB; the ONNX U-Net's external data file "
        f"(model.onnx_data) {memory['unet_external_data_gb'] or 0:.2f} GB.",
        "", f"machine: {json.dumps(machine_info())}",
    ])
    data = {"model": args.model, "size": size, "steps": args.steps, "runs": runs, "exports": exported,
            "memory": memory, "machine": machine_info()}
    write_results(f"sdxl-{args.model}-cpu", data, markdown, args.out)
    print(markdown)


if __name__ == "__main__":
    main()
