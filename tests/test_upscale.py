"""The x4 upscaler (diffusers' StableDiffusionUpscalePipeline) exported and run without torch.

- a tiny upscaler (7-channel U-Net with 1000 class embeddings, 3-block VAE with scaling 0.08333, DDPM
  low_res_scheduler) is detected as such and exported with its noise-level input and DDPM config;
- ``sdexport generate ART --image LOW.png --noise-level N --rng torch`` gives diffusers' image for the
  same seed, PSNR >= 45 dB on the 8-bit PNG, at two noise levels, on ONNX Runtime and OpenVINO;
- tiling: an input equal to one tile gives exactly the untiled image; a 2x2-tile run stays close to
  the untiled one (the measured dB is printed and in the README: no parity is claimed for tiles);
- a non-RGB input and a noise level outside [0, max_noise_level]: one clear line, nothing written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.metrics import psnr
from sdexport.cli import main
from tests.reference import sample_image
from tests.test_cli_errors import assert_one_line_error, run_cli

MIN_PSNR = 45.0
LOW = 32  # low-resolution input; the output is 128x128
STEPS = 3
SEED = 3
PROMPT = "a small red house"
NOISE_LEVELS = (20, 150)
TILED_FLOOR = 25.0  # measured 29.5 dB for 4 tiles of 24 with overlap 8 (the test prints it)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory) -> Path:
    from sdexport.demo.tiny_upscaler import save_tiny_upscaler

    return save_tiny_upscaler(tmp_path_factory.mktemp("tiny-upscaler") / "model")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, upscaler) -> dict[str, Path]:
    out = {}
    for target in ("onnx", "openvino"):
        path = tmp_path_factory.mktemp(f"upscaler-{target}") / "out"
        assert main(["export", str(upscaler), "--target", target, "--out", str(path), "--quiet"]) == 0
        out[target] = path
    return out


@pytest.fixture(scope="module")
def low_res(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("low-res") / "low.png"
    sample_image(LOW).save(path)
    return path


@pytest.fixture(scope="module")
def references(upscaler, low_res) -> dict[int, np.ndarray]:
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(str(upscaler))
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(low_res)
    out = {}
    with torch.no_grad():
        for level in NOISE_LEVELS:
            result = pipe(prompt=PROMPT, image=image, num_inference_steps=STEPS, noise_level=level,
                          generator=torch.Generator().manual_seed(SEED))
            out[level] = np.asarray(result.images[0], np.float64)
    return out


def _generate(artifact: Path, image: Path, out: Path, *extra) -> np.ndarray:
    args = ["generate", artifact, "--prompt", PROMPT, "--image", image, "--steps", STEPS, "--seed", SEED,
            "--rng", "torch", "--output", out, "--quiet", "--overwrite", *extra]
    assert main([str(a) for a in args]) == 0
    return np.asarray(Image.open(out).convert("RGB"), np.float64)


def test_detected_and_exported_as_upscaler(upscaler, exports):
    from runtime.manifest import Manifest
    from sdexport.export.components import model_info
    from sdexport.sources.open import open_source

    info = model_info(open_source(upscaler))
    assert (info.family, info.unet_in_channels, info.vae_scale_factor) == ("upscaler", 7, 4)
    assert info.vae_scaling_factor == 0.08333 and info.max_noise_level == 350
    manifest = Manifest.load(exports["onnx"])
    assert manifest.model.family == "upscaler"
    assert [s.name for s in manifest.component("unet").inputs][-1] == "class_labels"
    assert manifest.component("unet").input("class_labels").dtype == "int64"
    assert "vae_encoder" not in manifest.components  # the upscaler never encodes
    written = (exports["onnx"] / "low_res_scheduler" / "scheduler_config.json").read_text()
    assert '"DDPMScheduler"' in written


@pytest.mark.parametrize("level", NOISE_LEVELS)
@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_upscale_equals_diffusers(exports, references, low_res, tmp_path, target, level):
    ours = _generate(exports[target], low_res, tmp_path / "up.png", "--noise-level", level)
    assert ours.shape == (4 * LOW, 4 * LOW, 3)
    value = psnr(references[level], ours, peak=255.0)
    print(f"upscaler {target} noise level {level}: {value:.1f} dB against diffusers")
    assert value >= MIN_PSNR, f"PSNR {value:.1f} dB < {MIN_PSNR} dB"


def test_tiling(exports, low_res):
    from runtime.pipeline import Pipeline
    from runtime.upscale import Tiling

    pipe = Pipeline.from_dir(exports["onnx"])

    def run(tiling):
        result = pipe.generate(PROMPT, image=low_res, steps=STEPS, seed=SEED, rng="torch", tiling=tiling)
        return np.asarray(result.image, np.float64), result.settings["tiles"]

    whole, tiles = run(None)
    assert tiles is None  # 32x32 fits the default 256 tile: not tiled
    one, tiles = run(Tiling(LOW, 8, always=True))  # the tiled code path over a single tile
    assert tiles == 1 and np.array_equal(one, whole)
    four, tiles = run(Tiling(24, 8))
    value = psnr(whole, four, peak=255.0)
    print(f"upscaler tiled (4 tiles of 24, overlap 8) vs untiled: {value:.1f} dB")
    assert tiles == 4 and TILED_FLOOR <= value < float("inf")


def test_tile_grid():
    from runtime.upscale import Tiling, feather, tile_starts

    assert tile_starts(32, 24, 8) == [0, 8]
    assert tile_starts(100, 40, 10) == [0, 30, 60]
    assert tile_starts(20, 24, 8) == [0]
    assert Tiling(24, 8).grid(20, 20) is None and len(Tiling(24, 8).grid(20, 40)) == 2
    w = feather(40, 10, 30, 4)
    assert w[0] == np.float32(0.2) and w[-1] == np.float32(0.2) and w[10] == 1.0
    assert feather(40, 0, 20, 4)[0] == 1.0  # the image border is not feathered


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_non_rgb_input_is_one_line(exports, tmp_path, capsys, mode):
    path = tmp_path / f"{mode}.png"
    sample_image(LOW).convert(mode).save(path)
    out = tmp_path / "up.png"
    code, err = run_cli(capsys, "generate", exports["onnx"], "--prompt", PROMPT, "--image", path, "--steps", 1,
                        "--output", out, "--quiet")
    assert_one_line_error(code, err, mode, "3-channel RGB")
    assert not out.exists()


@pytest.mark.parametrize("level", ["-1", "351"])
def test_noise_level_out_of_range_is_one_line(exports, low_res, tmp_path, capsys, level):
    out = tmp_path / "up.png"
    code, err = run_cli(capsys, "generate", exports["onnx"], "--prompt", PROMPT, "--image", low_res, "--steps", 1,
                        "--noise-level", level, "--output", out, "--quiet")
    assert_one_line_error(code, err, f"noise level {level}", "[0, 350]")
    assert not out.exists()


@pytest.mark.slow
def test_bench_shows_the_upscale_step(exports, upscaler, tmp_path):
    import json

    assert main(["bench", str(exports["onnx"]), "--reference", str(upscaler), "--height", str(4 * LOW), "--width",
                 str(4 * LOW), "--steps", "2", "--repeats", "1", "--seeds", "1", "--prompt", PROMPT, "--no-cold-start",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    (run,) = data["runs"]
    assert run["task"] == "x4 upscale 32x32 -> 128x128, noise level 20"
    assert run["runtime_step_ms"] > 0 and run["pytorch_step_ms"] > 0 and len(run["latent_psnr_per_step_db"]) == 2
    assert run["image_psnr_db"] is None or run["image_psnr_db"] >= MIN_PSNR
    assert "unet" in data["components"] and "Upscale step (x4 upscale 32x32 -> 128x128" in (tmp_path / "b" / "bench.md").read_text()


def test_sizes_do_not_apply_to_the_upscaler(exports, low_res, tmp_path, capsys):
    out = tmp_path / "up.png"
    code, err = run_cli(capsys, "generate", exports["onnx"], "--prompt", PROMPT, "--image", low_res, "--steps", 1,
                        "--height", 256, "--width", 256, "--output", out, "--quiet")
    assert_one_line_error(code, err, "--height")
    assert not out.exists()
