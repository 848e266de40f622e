"""`sdexport bench` and `sdexport quality` on SDXL exports, and the device-resident loop for SDXL.

Tiny SDXL base and refiner (built in-process, random weights) exported to ONNX fp32. bench and quality
must measure them against diffusers' SDXL pipelines (``StableDiffusionXLPipeline``, the refiner's
``StableDiffusionXLImg2ImgPipeline``), name that class in their reports, and find the images at least
45 dB apart from diffusers' (the project's SDXL floor, ``--rng torch``). The device loop (ONNX
Runtime I/O binding, here on the CPU provider) must bind SDXL's ``text_embeds`` and ``time_ids`` once
per generation and give the numpy loop's latents to float32 rounding, under batched and sequential CFG.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdexport.cli import main
from tests.test_cli_errors import assert_one_line_error, run_cli

MIN_PSNR = 45.0
REL = 1e-5  # of the numpy loop's largest latent magnitude (as tests/test_device_loop.py)
PROMPT = "a red circle on a blue background"
SIZE = ["--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """{"base", "refiner"}: (diffusers folder, ONNX export), each built and exported once."""
    from sdexport.demo.tiny_sdxl import save_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl-measure")
    models = {}
    for kind in ("base", "refiner"):
        folder = save_tiny_sdxl(root / kind, refiner=kind == "refiner")
        out = root / f"{kind}-onnx"
        assert main(["export", str(folder), "--target", "onnx", "--out", str(out), "--quiet", "--no-validate"]) == 0
        models[kind] = (folder, out)
    return models


def _bench(sdxl, kind: str, out, steps: int) -> dict:
    folder, artifact = sdxl[kind]
    assert main(["bench", str(artifact), "--reference", str(folder), "--out", str(out), "--steps", str(steps), *SIZE,
                 "--seeds", "1", "--prompt", PROMPT, "--repeats", "1", "--no-cold-start", "--quiet"]) == 0
    return json.loads((out / "bench.json").read_text())


def _check_runs(runs: list[dict], key: str = "image_psnr_db") -> None:
    assert runs
    for run in runs:  # None: identical images
        assert run[key] is None or run[key] >= MIN_PSNR, run[key]


@pytest.mark.slow
def test_bench_sdxl_base_against_diffusers_sdxl_pipeline(sdxl, tmp_path):
    data = _bench(sdxl, "base", tmp_path / "b", steps=2)
    assert data["reference_pipeline"] == "StableDiffusionXLPipeline"
    assert "vs diffusers StableDiffusionXLPipeline" in (tmp_path / "b" / "bench.md").read_text()
    assert data["text_encoder_psnr_db"] is None or data["text_encoder_psnr_db"] > 60
    # both encoders and the U-Net (fed text_embeds and time_ids) timed against their torch modules
    assert {"text_encoder", "text_encoder_2", "unet", "vae_decoder"} <= set(data["components"])
    _check_runs(data["runs"])
    assert len(data["runs"][0]["latent_psnr_per_step_db"]) == 2


@pytest.mark.slow
def test_bench_sdxl_refiner_against_diffusers_img2img(sdxl, tmp_path):
    # strength 0.3 (SDXL img2img's default, both sides) of 4 steps: one denoising step
    data = _bench(sdxl, "refiner", tmp_path / "b", steps=4)
    assert data["reference_pipeline"] == "StableDiffusionXLImg2ImgPipeline"
    assert "text_encoder" not in data["components"] and "text_encoder_2" in data["components"]
    assert data["cold_start"] == {}  # a refiner needs an image: no text-to-image cold start
    _check_runs(data["runs"])


@pytest.mark.slow
def test_quality_sdxl_base(sdxl, tmp_path):
    folder, artifact = sdxl["base"]
    out = tmp_path / "q"
    assert main(["quality", str(artifact), "--reference", str(folder), "--out", str(out), "--steps", "2", *SIZE,
                 "--prompt", PROMPT, "--samples", "1", "--quiet"]) == 0
    data = json.loads((out / "quality.json").read_text())
    assert data["reference_pipeline"] == "StableDiffusionXLPipeline"
    assert "diffusers StableDiffusionXLPipeline" in (out / "quality.md").read_text()
    components = data["components"]
    assert set(components) == {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    for name, c in components.items():  # fp32 ONNX against the torch modules
        # calibration records SDXL pipeline runs (text_embeds and time_ids included); text_encoder_2 it does not record
        recorded = name != "text_encoder_2"
        assert c["inputs"].startswith("recorded from 1 pipeline runs" if recorded else "random example inputs"), (name, c["inputs"])
        assert c["psnr_db"] is None or c["psnr_db"] > 80, (name, c["psnr_db"])
    _check_runs(data["end_to_end"]["runs"], "psnr_db")
    assert (out / "grid.png").stat().st_size > 500


def test_reference_of_the_other_sdxl_kind_is_refused(capsys, sdxl, tmp_path):
    code, err = run_cli(capsys, "bench", sdxl["base"][1], "--reference", sdxl["refiner"][0], "--out", tmp_path / "b")
    assert_one_line_error(code, err, "model family sdxl-refiner", "of sdxl:")
    assert code == 2 and not (tmp_path / "b").exists()
    code, err = run_cli(capsys, "quality", sdxl["refiner"][1], "--reference", sdxl["base"][0], "--out", tmp_path / "q")
    assert_one_line_error(code, err, "model family sdxl,", "of sdxl-refiner:")
    assert code == 2 and not (tmp_path / "q").exists()


# --- the device-resident loop ---------------------------------------------------------------------


@pytest.mark.parametrize("kind, cfg, scheduler, guidance", [
    ("base", "batched", "euler-a", 5.0), ("base", "sequential", "dpmpp-2m", 5.0), ("base", "batched", "dpmpp-2m", 1.0),
    ("refiner", "sequential", "euler-a", 5.0),
])
def test_device_loop_equals_numpy_loop(sdxl, kind, cfg, scheduler, guidance):
    from runtime import Pipeline
    from tests.reference import sample_image

    artifact = sdxl[kind][1]
    extra = {"image": sample_image(64), "steps": 7} if kind == "refiner" else {"steps": 3}
    kwargs = dict(scheduler=scheduler, seed=3, rng="torch", height=64, width=64, guidance_scale=guidance,
                  return_latents=True, **extra)
    numpy_pipe = Pipeline.from_dir(artifact, options={"device": "cpu", "device_loop": "off"}, cfg=cfg)
    device_pipe = Pipeline.from_dir(artifact, options={"device": "cpu", "device_loop": "on"}, cfg=cfg)
    ref = numpy_pipe.generate(PROMPT, **kwargs)
    got = device_pipe.generate(PROMPT, **kwargs)
    assert ref.settings["loop"] == "numpy" and got.settings["loop"] == "device", got.loop_reason
    scale = float(np.max(np.abs(ref.latents)))
    assert float(np.max(np.abs(got.latents.astype(np.float64) - ref.latents))) <= REL * scale
    assert int(np.max(np.abs(np.asarray(got.image, np.int16) - np.asarray(ref.image, np.int16)))) <= 1
    # the added conditioning goes up once per generation (per CFG half when sequential), never per step
    uploads = device_pipe.device_loop().transfers.uploads
    halves = 2 if cfg == "sequential" and guidance > 1 else 1
    assert uploads["text_embeds"] == uploads["time_ids"] == uploads["embeddings"] == halves
    assert got.calls["unet"] == ref.calls["unet"]
