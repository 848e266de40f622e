"""Issue 20 items 2 and 3 measured on small models built in-process (CPU): the x4 upscaler's parity
with diffusers at two noise levels on ONNX Runtime and OpenVINO, what tiling costs (image PSNR of a
tiled run against the untiled one, for several tile sizes and overlaps), and VAE swaps (export --vae,
export-vae --into) against diffusers with ``pipe.vae = other`` on txt2img and img2img.

    python benchmarks/bench_upscale_vae.py [--work DIR] [--out benchmarks/results]

Writes upscale-vae-cpu.json and upscale-vae-cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_results  # noqa: E402
from runtime.metrics import psnr  # noqa: E402
from sdexport.cli import main  # noqa: E402

PROMPT = "a small red house"
STEPS = 3
SEED = 3
TILINGS = ((32, 32, 8), (32, 24, 8), (32, 16, 4), (64, 32, 8), (64, 32, 16), (64, 40, 16))  # (input, tile, overlap)


def _db(a, b) -> float | None:
    value = psnr(np.asarray(a, np.float64), np.asarray(b, np.float64), peak=255.0)
    return None if value == float("inf") else round(float(value), 1)


def upscaler(work: Path) -> dict:
    import diffusers
    import torch

    from runtime.pipeline import Pipeline
    from runtime.upscale import Tiling
    from sdexport.demo.tiny_upscaler import save_tiny_upscaler
    from tests.reference import sample_image

    model = save_tiny_upscaler(work / "upscaler")
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(str(model))
    ref.set_progress_bar_config(disable=True)
    out = {"parity": [], "tiling": []}
    low = sample_image(32)
    for target in ("onnx", "openvino"):
        art = work / f"upscaler-{target}"
        assert main(["export", str(model), "--target", target, "--out", str(art), "--quiet", "--overwrite"]) == 0
        pipe = Pipeline.from_dir(art)
        for level in (20, 150):
            with torch.no_grad():
                theirs = ref(PROMPT, image=low, num_inference_steps=STEPS, noise_level=level,
                             generator=torch.Generator().manual_seed(SEED)).images[0]
            ours = pipe.generate(PROMPT, image=low, steps=STEPS, noise_level=level, seed=SEED, rng="torch").image
            out["parity"].append({"target": target, "noise_level": level, "psnr_db": _db(theirs, ours)})
    pipe = Pipeline.from_dir(work / "upscaler-onnx")
    for size, tile, overlap in TILINGS:
        image = sample_image(size, seed=1)
        start = time.perf_counter()
        whole = pipe.generate(PROMPT, image=image, steps=STEPS, seed=SEED, rng="torch").image
        t_whole = time.perf_counter() - start
        start = time.perf_counter()
        tiled = pipe.generate(PROMPT, image=image, steps=STEPS, seed=SEED, rng="torch",
                              tiling=Tiling(tile, overlap, always=True))
        t_tiled = time.perf_counter() - start
        out["tiling"].append({"input": size, "tile": tile, "overlap": overlap, "tiles": tiled.settings["tiles"],
                              "psnr_db_vs_untiled": _db(whole, tiled.image), "untiled_s": round(t_whole, 2),
                              "tiled_s": round(t_tiled, 2)})
    return out


def vae_swaps(work: Path) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from sdexport.demo.tiny import save_tiny_pipeline
    from sdexport.sources.checkpoint import save_safetensors
    from sdexport.sources.convert import to_original
    from tests.reference import load_pipeline, sample_image

    model = save_tiny_pipeline(work / "sd1", "sd1")
    config = AutoencoderKL.load_config(str(model / "vae"))
    for seed, name in ((7, "other"), (8, "third")):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(config).eval()
        vae.save_pretrained(str(work / name))
        state = {k: v.contiguous() for k, v in vae.state_dict().items()}
        save_safetensors(work / f"{name}-ldm.safetensors",
                         {k.removeprefix("first_stage_model."): v for k, v in to_original("vae", state, config).items()})
    sample_image(64).save(work / "image.png")
    rows = []
    for target in ("onnx", "openvino"):
        art = work / f"sd1-vae-{target}"
        assert main(["export", str(model), "--target", target, "--out", str(art), "--vae", str(work / "other"),
                     "--quiet", "--overwrite"]) == 0
        rows += _swap_rows(f"{target}: export --vae other/ (diffusers folder)", art, model, work / "other", work)
        art2 = work / f"sd1-swapped-{target}"
        shutil.rmtree(art2, ignore_errors=True)
        shutil.copytree(art, art2)
        start = time.perf_counter()
        assert main(["export-vae", str(work / "third-ldm.safetensors"), "--into", str(art2), "--quiet"]) == 0
        seconds = round(time.perf_counter() - start, 1)
        rows += _swap_rows(f"{target}: export-vae third-ldm.safetensors (LDM names) --into, {seconds} s", art2, model,
                           work / "third", work)
    return rows


def _swap_rows(label: str, art: Path, model: Path, vae_dir: Path, work: Path) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from runtime.pipeline import Pipeline
    from tests.reference import load_pipeline

    pipe = Pipeline.from_dir(art)
    rows = []
    for kind in ("txt2img", "img2img"):
        ref = load_pipeline(model, kind, None)
        ref.vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
        extra = {"image": Image.open(work / "image.png"), "strength": 0.6} if kind == "img2img" else {"height": 64, "width": 64}
        with torch.no_grad():
            theirs = ref(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), **extra).images[0]
        ours = pipe.generate(PROMPT, steps=STEPS, seed=SEED, rng="torch", **extra).image
        rows.append({"swap": label, "task": kind, "psnr_db": _db(theirs, ours)})
    return rows


def markdown(data: dict) -> str:
    m = data["machine"]
    fmt = lambda v: "identical" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"# x4 upscaler and VAE swaps on small models ({m['cpu']}, {m['cores']} cores)", "",
             f"`{data['command']}`; {data['created']}; tiny models built in-process (random weights), {STEPS} steps, "
             f"seed {SEED}, --rng torch.", "", "## Upscaler vs diffusers StableDiffusionUpscalePipeline (32x32 -> 128x128)", "",
             "| target | noise level | image PSNR dB |", "|---|---|---|"]
    lines += [f"| {r['target']} | {r['noise_level']} | {fmt(r['psnr_db'])} |" for r in data["upscaler"]["parity"]]
    lines += ["", "## Tiled vs untiled (ONNX Runtime; tiles overlap, linear feathering)", "",
              "| input | tile | overlap | tiles | image PSNR dB vs untiled | untiled s | tiled s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['input']}x{r['input']} | {r['tile']} | {r['overlap']} | {r['tiles']} | {fmt(r['psnr_db_vs_untiled'])} | "
              f"{r['untiled_s']} | {r['tiled_s']} |" for r in data["upscaler"]["tiling"]]
    lines += ["", "## VAE swaps vs diffusers with pipe.vae = the same VAE (64x64)", "",
              "| swap | task | image PSNR dB |", "|---|---|---|"]
    lines += [f"| {r['swap']} | {r['task']} | {fmt(r['psnr_db'])} |" for r in data["vae_swaps"]]
    return "\n".join(lines)


def run(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-upscale-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        data = {"command": "python benchmarks/bench_upscale_vae.py", "machine": machine_info(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "upscaler": upscaler(work), "vae_swaps": vae_swaps(work)}
    text = markdown(data)
    write_results("upscale-vae-cpu", data, text, args.out)
    print(text)


if __name__ == "__main__":
    run()
