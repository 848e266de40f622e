"""VAE swaps: ``export --vae`` and ``export-vae VAE --into ART``, against diffusers with ``pipe.vae = other``.

- a diffusers AutoencoderKL folder, a single .safetensors in diffusers names and one in the original
  LDM names (the ft-MSE VAE's layout) load to the same weights, bit for bit;
- ``export MODEL --vae FOLDER`` records the VAE (path, layout, sha256) and, with ``--rng torch``, gives
  diffusers' txt2img and img2img images with the same swapped VAE (PSNR >= 45 dB, ONNX Runtime);
- ``export-vae FILE.safetensors --into ART`` replaces only the VAE: the other components are untouched,
  every sha256 in the manifest matches its file, the old VAE folders are gone, and the images again
  match diffusers with that VAE;
- a VAE whose latent channels do not fit the U-Net is one line with nothing written, and a swap that
  fails part-way leaves the artifact exactly as it was.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.manifest import Manifest
from runtime.metrics import psnr
from sdexport.cli import main
from tests.reference import load_pipeline, sample_image
from tests.test_cli_errors import assert_one_line_error, run_cli

MIN_PSNR = 45.0
SIZE = 64
STEPS = 3
SEED = 5
PROMPT = "a blue square on a yellow field"


@pytest.fixture(scope="module")
def vaes(tmp_path_factory, tiny_sd1) -> dict[str, Path]:
    """Other VAEs for the tiny SD1 model: a folder, LDM and diffusers single files, a 16-channel one."""
    import torch
    from diffusers import AutoencoderKL

    from sdexport.sources.checkpoint import save_safetensors
    from sdexport.sources.convert import to_original

    root = tmp_path_factory.mktemp("vaes")
    config = AutoencoderKL.load_config(str(tiny_sd1 / "vae"))
    out = {}
    for seed, name in ((7, "other"), (8, "third")):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(config).eval()
        vae.save_pretrained(str(root / name))
        state = {k: v.contiguous() for k, v in vae.state_dict().items()}
        ldm = {k.removeprefix("first_stage_model."): v for k, v in to_original("vae", state, config).items()}
        out[name] = root / name
        out[f"{name}-ldm"] = save_safetensors(root / f"{name}-ldm.safetensors", ldm)  # as vae-ft-mse-840000 is laid out
        out[f"{name}-diffusers"] = save_safetensors(root / f"{name}-diffusers.safetensors", state)
    torch.manual_seed(9)
    AutoencoderKL.from_config({**config, "latent_channels": 16}).save_pretrained(str(root / "sixteen"))
    out["sixteen"] = root / "sixteen"
    return out


@pytest.fixture(scope="module")
def swapped(tmp_path_factory, tiny_sd1, vaes) -> Path:
    out = tmp_path_factory.mktemp("vae-swap") / "out"
    assert main(["export", str(tiny_sd1), "--target", "onnx", "--out", str(out), "--vae", str(vaes["other"]),
                 "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae-input") / "image.png"
    sample_image(SIZE).save(path)
    return path


@pytest.fixture(scope="module")
def reference_pipes(tiny_sd1):
    """diffusers' txt2img and img2img pipelines on the tiny model, loaded once (sharing their modules)."""
    import diffusers

    txt2img = load_pipeline(tiny_sd1, "txt2img", None)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**txt2img.components)
    img2img.set_progress_bar_config(disable=True)
    return {"txt2img": txt2img, "img2img": img2img}


def _diffusers(pipes, vae_dir: Path, kind: str, image: Path | None) -> np.ndarray:
    import torch
    from diffusers import AutoencoderKL

    pipe = pipes[kind]
    pipe.vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()  # the swap as a diffusers user does it
    extra = {"image": Image.open(image), "strength": 0.6} if image else {"height": SIZE, "width": SIZE}
    with torch.no_grad():
        result = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), **extra)
    return np.asarray(result.images[0], np.float64)


def _ours(artifact: Path, out: Path, image: Path | None) -> np.ndarray:
    extra = ["--image", str(image), "--strength", "0.6"] if image else ["--height", str(SIZE), "--width", str(SIZE)]
    args = ["generate", str(artifact), "--prompt", PROMPT, "--steps", str(STEPS), "--seed", str(SEED), "--rng", "torch",
            "--output", str(out), "--quiet", "--overwrite", *extra]
    assert main(args) == 0
    return np.asarray(Image.open(out).convert("RGB"), np.float64)


def _check_both(artifact: Path, pipes, vae_dir: Path, image: Path, tmp_path: Path, label: str) -> None:
    for kind, given in (("txt2img", None), ("img2img", image)):
        value = psnr(_diffusers(pipes, vae_dir, kind, given), _ours(artifact, tmp_path / f"{kind}.png", given), peak=255.0)
        print(f"{label} {kind}: {value:.1f} dB against diffusers with the same VAE")
        assert value >= MIN_PSNR, f"{label} {kind}: PSNR {value:.1f} dB < {MIN_PSNR} dB"


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_single_files_load_the_folders_weights(vaes, tiny_sd1):
    import torch

    from sdexport.sources.open import open_source
    from sdexport.sources.vae import VaeWeights

    model_vae = open_source(tiny_sd1).vae_config
    reference = VaeWeights.open(vaes["other"], None).load().state_dict()
    for name, layout in (("other-ldm", "ldm"), ("other-diffusers", "diffusers")):
        vae = VaeWeights.open(vaes[name], model_vae)
        assert vae.layout == layout
        state = vae.load().state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), name


def test_export_with_vae_equals_diffusers(swapped, reference_pipes, vaes, image_file, tmp_path):
    manifest = Manifest.load(swapped)
    recorded = manifest.exporter["source_details"]["vae"]
    weights = vaes["other"] / "diffusion_pytorch_model.safetensors"
    assert recorded["layout"] == "diffusers-folder"
    assert recorded["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    _check_both(swapped, reference_pipes, vaes["other"], image_file, tmp_path, "export --vae")


def test_export_vae_into_replaces_only_the_vae(swapped, reference_pipes, vaes, image_file, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(swapped, art)
    before = Manifest.load(art)
    assert main(["export-vae", str(vaes["third-ldm"]), "--into", str(art), "--quiet"]) == 0
    after = Manifest.load(art)
    after.check_files(verify_hashes=True)  # every recorded sha256 matches its file
    for name in ("text_encoder", "unet"):
        assert after.component(name).files == before.component(name).files
    assert not (art / "vae_decoder").exists() and not (art / "vae_encoder").exists()  # the old VAE is gone
    assert after.component("vae_decoder").main_file.path.startswith("vae_decoder.")
    assert after.exporter["artifact_hash"] != before.exporter["artifact_hash"]
    assert after.exporter["vae_swap"]["vae"]["layout"] == "ldm"
    assert not [p for p in art.iterdir() if p.name.startswith(".")]  # no stage left behind
    _check_both(art, reference_pipes, vaes["third"], image_file, tmp_path, "export-vae --into")


def test_latent_channel_mismatch_is_one_line(swapped, tiny_sd1, vaes, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "export", tiny_sd1, "--target", "onnx", "--out", out, "--vae", vaes["sixteen"], "--quiet")
    assert_one_line_error(code, err, "16 channels", "takes 4")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    before = _snapshot(swapped)
    code, err = run_cli(capsys, "export-vae", vaes["sixteen"], "--into", swapped, "--quiet")
    assert_one_line_error(code, err, "16 channels")
    code, err = run_cli(capsys, "export-vae", tmp_path / "vae.ckpt", "--into", swapped, "--quiet")
    assert_one_line_error(code, err, "no such file")
    assert _snapshot(swapped) == before


def test_failed_swap_leaves_the_artifact_unchanged(swapped, vaes, tmp_path, capsys, monkeypatch):
    """The decoder's conversion fails after the encoder was converted: nothing of ART changes."""
    import sdexport.export.run as run
    from sdexport.errors import ExportError

    art = tmp_path / "art"
    shutil.copytree(swapped, art)
    before = _snapshot(art)
    real = run.export_component

    def failing(spec, *args, **kwargs):
        if spec.name == "vae_decoder":
            raise ExportError("vae_decoder: simulated failure after the encoder was written")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(run, "export_component", failing)
    code, err = run_cli(capsys, "export-vae", vaes["third"], "--into", art, "--quiet")
    assert_one_line_error(code, err, "simulated failure")
    assert _snapshot(art) == before
