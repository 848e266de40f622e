"""SDXL architecture on this CPU: diffusers (PyTorch fp32) vs ONNX Runtime fp32 vs OpenVINO fp32.

Per U-Net call (batch 2 = classifier-free guidance, with text_embeds and time_ids), end-to-end txt2img
time, image PSNR against diffusers (same seed, torch-compatible RNG), artifact sizes, and the export's
peak resident memory (each export runs in a child process; its ru_maxrss is read back).

    python benchmarks/bench_sdxl_cpu.py                 # SDXL base 1.0 architecture, random weights, 512x512
    python benchmarks/bench_sdxl_cpu.py --model tiny    # the tiny SDXL of tests/test_sdxl.py: checks the script

The full-size model is about 7 GB of fp32 weights: building it and exporting it each need well over
that in memory; run it alone on the machine. Exports are cached under .cache/bench/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, markdown_table, timeit, write_results  # noqa: E402
from runtime.metrics import psnr  # noqa: E402
from sdexport.measure.child import export_cost  # noqa: E402

PROMPT = "a photo of a red circle in the top left on a blue background"
TARGETS = {"ONNX Runtime fp32": "onnx", "OpenVINO fp32": "openvino"}


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


def torch_unet_ms(src: Path, feeds: dict, repeats: int) -> float:
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(src), subfolder="unet").eval()
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
    with torch.no_grad():
        return timeit(lambda: unet(t["sample"], t["timestep"], t["encoder_hidden_states"],
                                        added_cond_kwargs=added), repeats)["median_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "full"), default="full")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512 full, 64 tiny)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    size = args.size or (512 if args.model == "full" else 64)

    import torch

    from runtime import Pipeline
    from runtime.manifest import Manifest

    src = prepare(args.model, args.work)
    exports = {label: args.work / f"sdxl-{args.model}-{target}" for label, target in TARGETS.items()}
    export_stats = {label: export_stats(src, out, TARGETS[label]) for label, out in exports.items()}
    info = Manifest.load(exports["ONNX Runtime fp32"]).model
    feeds = unet_feeds(info, size)
    unet_ms = {"diffusers fp32": torch_unet_ms(src, feeds, args.repeats)}
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(src))
    ref.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    with torch.no_grad():
        reference = ref(PROMPT, num_inference_steps=args.steps, height=size, width=size,
                        generator=torch.Generator().manual_seed(1)).images[0]
    e2e = {"diffusers fp32": time.perf_counter() - start}
    del ref
    image_psnr, sizes = {}, {}
    for label, artifact in exports.items():
        pipe = Pipeline.from_dir(artifact)
        session = pipe.session("unet")
        unet_ms[label] = timeit(lambda: session.run(feeds), args.repeats)["median_ms"]
        result = pipe.generate(PROMPT, steps=args.steps, height=size, width=size, seed=1, rng="torch")
        e2e[label] = result.timings["total"]
        image_psnr[label] = psnr(np.asarray(reference, np.float64), np.asarray(result.image, np.float64), peak=255.0)
        sizes[label] = sum(c.size_bytes for c in Manifest.load(artifact).components.values())
    rows = [[label, unet_ms[label], e2e[label], image_psnr.get(label, "-"),
             f"{sizes[label] / 1e9:.2f} GB" if label in sizes else "-",
             f"{export_stats[label].get('peak_rss_gib', 0):.1f} GiB" if label in export_stats else "-"]
            for label in unet_ms]
    markdown = "\n".join([
        f"# SDXL {args.model} architecture, {size}x{size}, {args.steps} steps (Euler), CPU",
        "", f"`python benchmarks/bench_sdxl_cpu.py --model {args.model}`", "",
        markdown_table(["setting", "U-Net call, batch 2 (ms)", "end to end (s)", "image PSNR vs diffusers (dB)",
                        "artifact", "export peak RSS"], rows),
        "", f"machine: {json.dumps(machine_info())}",
    ])
    data = {"model": args.model, "size": size, "steps": args.steps, "unet_ms": unet_ms, "end_to_end_s": e2e,
            "image_psnr_db": image_psnr, "artifact_bytes": sizes, "export": export_stats, "machine": machine_info()}
    write_results(f"sdxl-{args.model}-cpu", data, markdown, args.out)
    print(markdown)


if __name__ == "__main__":
    main()
