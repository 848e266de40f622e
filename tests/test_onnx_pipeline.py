"""End to end on ONNX Runtime: export tiny pipelines, generate with the CLI, compare with diffusers.

The runtime with ``--rng torch`` must give diffusers' image for the same seed: PSNR >= 45 dB on the
8-bit PNG (fp32 export), for txt2img, img2img and inpainting, SD1-like, SD2-like (v-prediction)
and 9-channel inpainting models, with the ddim, euler-a, dpmpp-2m and unipc schedulers.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.metrics import psnr
from sdexport.cli import main
from tests.reference import diffusers_image, sample_image, sample_mask

MIN_PSNR = 45.0
SIZE = 64
STEPS = 8
SCHEDULERS = ["ddim", "euler-a", "dpmpp-2m", "unipc"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_sd1, tiny_sd2v, tiny_inpaint):
    out = {}
    for name, src in (("sd1", tiny_sd1), ("sd2-v", tiny_sd2v), ("inpaint", tiny_inpaint)):
        target = tmp_path_factory.mktemp(f"onnx-{name}") / "out"
        assert main(["export", str(src), "--target", "onnx", "--out", str(target), "--quiet"]) == 0
        out[name] = (src, target)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    sample_image(SIZE).save(d / "image.png")
    sample_mask(SIZE).save(d / "mask.png")
    return d


def _generate(tmp_path, artifact, *extra) -> Image.Image:
    out = tmp_path / "out.png"
    args = ["generate", str(artifact), "--seed", "3", "--rng", "torch", "--steps", str(STEPS),
            "--height", str(SIZE), "--width", str(SIZE), "--output", str(out), "--quiet", "--overwrite", *extra]
    assert main(args) == 0
    return Image.open(out).convert("RGB")


def _check(ours: Image.Image, theirs: Image.Image) -> float:
    value = psnr(np.asarray(theirs, np.float64), np.asarray(ours, np.float64), peak=255.0)
    assert value >= MIN_PSNR, f"PSNR {value:.1f} dB < {MIN_PSNR} dB"
    return value


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("model", ["sd1", "sd2-v"])
def test_txt2img_equals_diffusers(exports, tmp_path, model, scheduler, negative):
    src, artifact = exports[model]
    prompt = "a red circle in the top left on a blue background"
    extra = ["--prompt", prompt, "--scheduler", scheduler] + (["--negative-prompt", negative] if negative else [])
    ours = _generate(tmp_path, artifact, *extra)
    theirs = diffusers_image(src, "txt2img", scheduler, 3, prompt=prompt, negative_prompt=negative,
                             num_inference_steps=STEPS, height=SIZE, width=SIZE)
    _check(ours, theirs)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("model", ["sd1", "sd2-v"])
def test_img2img_equals_diffusers(exports, inputs, tmp_path, model, scheduler):
    src, artifact = exports[model]
    prompt = "a watercolor of shapes"
    ours = _generate(tmp_path, artifact, "--prompt", prompt, "--scheduler", scheduler,
                     "--image", str(inputs / "image.png"), "--strength", "0.6", "--negative-prompt", "dark")
    theirs = diffusers_image(src, "img2img", scheduler, 3, prompt=prompt, negative_prompt="dark",
                             image=Image.open(inputs / "image.png"), strength=0.6, num_inference_steps=STEPS)
    _check(ours, theirs)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("model, strength", [("inpaint", "1.0"), ("inpaint", "0.75"), ("sd1", "1.0"), ("sd1", "0.7")])
def test_inpaint_equals_diffusers(exports, inputs, tmp_path, model, strength, scheduler):
    src, artifact = exports[model]
    prompt = "a yellow star"
    ours = _generate(tmp_path, artifact, "--prompt", prompt, "--scheduler", scheduler, "--image",
                     str(inputs / "image.png"), "--mask", str(inputs / "mask.png"), "--strength", strength)
    theirs = diffusers_image(src, "inpaint", scheduler, 3, prompt=prompt, image=Image.open(inputs / "image.png"),
                             mask_image=Image.open(inputs / "mask.png"), strength=float(strength),
                             num_inference_steps=STEPS, height=SIZE, width=SIZE)
    _check(ours, theirs)


def test_default_scheduler_and_no_guidance(exports, tmp_path):
    src, artifact = exports["sd1"]
    prompt = "a green square"
    ours = _generate(tmp_path, artifact, "--prompt", prompt, "--guidance-scale", "1.0")
    theirs = diffusers_image(src, "txt2img", None, 3, prompt=prompt, guidance_scale=1.0,
                             num_inference_steps=STEPS, height=SIZE, width=SIZE)
    _check(ours, theirs)


def test_sequential_cfg_matches_batched(exports, tmp_path):
    _, artifact = exports["sd1"]
    a = np.asarray(_generate(tmp_path, artifact, "--prompt", "x", "--cfg", "batched"), np.float64)
    b = np.asarray(_generate(tmp_path, artifact, "--prompt", "x", "--cfg", "sequential"), np.float64)
    assert psnr(a, b, peak=255.0) >= MIN_PSNR


def test_png_metadata(exports, tmp_path):
    _, artifact = exports["sd1"]
    image = _generate(tmp_path, artifact, "--prompt", "meta test", "--scheduler", "ddim")
    text = Image.open(tmp_path / "out.png").text
    assert text["prompt"] == "meta test" and text["seed"] == "3" and text["scheduler"] == "ddim"
    assert text["steps"] == str(STEPS) and text["guidance_scale"] == "7.5"
    from runtime.manifest import Manifest

    assert text["model_hash"] == Manifest.load(artifact).exporter["artifact_hash"]
    assert "Steps: 8, Sampler: ddim" in text["parameters"]
    assert image.size == (SIZE, SIZE)
