"""Run-time LoRAs on SDXL: a tiny SDXL base exported to ONNX without any LoRA, then LoRAs on the U-Net
and BOTH text encoders patched into the sessions (``Pipeline(..., loras=...)`` / ``set_loras``),
against diffusers' StableDiffusionXLPipeline with ``load_lora_weights`` + ``set_adapters`` (not fused).

The LoRAs are tests/test_sdxl_lora.py's: PEFT-made on the tiny SDXL modules (attention to_q/to_k/to_v/
to_out, proj_in/proj_out, feed-forward, resnet convolutions; q/k/v/out_proj and fc1/fc2 of
``text_encoder.`` and ``text_encoder_2.``), random non-zero up matrices, saved with diffusers'
``save_lora_weights``, and the same file renamed as kohya writes SDXL LoRAs (``lora_te1_``,
``lora_te2_``, ``lora_unet_`` with the original SGM block names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime import Pipeline
from runtime.metrics import psnr
from tests.test_sdxl_lora import make_sdxl_lora, to_kohya_sdxl

MIN_PSNR = 45.0  # the project's image parity floor against diffusers
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
STEPS = 3
SCALE = 0.8
PARTS = {"unet", "text_encoder", "text_encoder_2"}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> dict:
    """The tiny SDXL base (diffusers folder), its ONNX export (no LoRA) and a PEFT + kohya LoRA."""
    from sdexport.demo.tiny_sdxl import build_tiny_sdxl
    from sdexport.export.run import export
    from sdexport.export.targets.base import ExportOptions

    root = tmp_path_factory.mktemp("sdxl-runtime-lora")
    pipe = build_tiny_sdxl()
    pipe.save_pretrained(str(root / "model"), safe_serialization=True)
    lora = make_sdxl_lora(pipe, root / "a.safetensors", seed=1, rank=4, alpha=8.0)
    kohya = to_kohya_sdxl(lora, root / "a-kohya.safetensors", 8.0, dict(pipe.unet.config))
    export(root / "model", root / "onnx", ExportOptions(target="onnx", validate=False), progress=False)
    return {"model": root / "model", "onnx": root / "onnx", "lora": lora, "kohya": kohya}


def _renamed(lora: Path, old: str, new: str) -> Path:
    """The LoRA with its text_encoder modules named ``old`` renamed ``new`` (a layer no export has)."""
    from safetensors.torch import load_file, save_file

    out = lora.with_name(f"renamed-{lora.name}")
    tensors = load_file(str(lora))
    save_file({(k.replace(old, new) if k.startswith("text_encoder.") else k): v for k, v in tensors.items()}, str(out))
    return out


def image(pipe: Pipeline) -> np.ndarray:
    result = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, height=64, width=64, seed=3, rng="torch")
    return np.asarray(result.images[0].convert("RGB"), np.float64)


def diffusers_image(model: Path, lora: Path, scale: float) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="a")
    pipe.set_adapters(["a"], [scale])
    assert {n for n in PARTS if getattr(getattr(pipe, n), "peft_config", None)} == PARTS, "diffusers loaded it everywhere"
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, height=64, width=64,
                   generator=torch.Generator().manual_seed(3))
    return np.asarray(out.images[0].convert("RGB"), np.float64)


@pytest.mark.slow  # 23-36 s serial on the shared 2-core machine under load (export, diffusers with the LoRA, 4 runtime images)
def test_sdxl_runtime_lora_matches_diffusers(sdxl):
    """PEFT file then its kohya twin on one pipeline, both against diffusers' adapters; set_loras([])
    gives back the base image bit for bit; each file touches the U-Net and both text encoders.

    The first text encoder's last layer is not in the export (SDXL takes its penultimate hidden state):
    the LoRA's modules on it are passed over, and the image still equals diffusers', whose output does
    not depend on that layer either; a layer the export does hold but cannot find is still refused."""
    from safetensors.torch import load_file

    from runtime.lora.read import LoraError
    from runtime.lora.resolve import plan_patches
    from runtime.manifest import Manifest

    manifest = Manifest.load(sdxl["onnx"])
    for name in ("lora", "kohya"):
        plan = plan_patches(manifest, [(sdxl[name], SCALE)])
        assert set(plan) == PARTS, (name, set(plan))
        assert len(plan["unet"].weights) >= 60 and all(len(plan[t].weights) >= 12 for t in PARTS - {"unet"}), name
    last = max(int(k.split("layers.")[1].split(".")[0]) for k in manifest.component("text_encoder_2").weights if "layers." in k)
    assert not any(f"layers.{last}." in k for k in manifest.component("text_encoder").weights)
    assert any(k.startswith(f"text_encoder.encoder.layers.{last}.") for k in load_file(str(sdxl["lora"])))
    with pytest.raises(LoraError, match=r"adapts encoder.layers.0.mlp.fc3, which the text_encoder"):
        plan_patches(manifest, [_renamed(sdxl["lora"], "layers.0.mlp.fc1", "layers.0.mlp.fc3")])
    pipe = Pipeline.from_dir(sdxl["onnx"])
    base = image(pipe)
    theirs = diffusers_image(sdxl["model"], sdxl["lora"], SCALE)
    assert pipe.set_loras([(sdxl["lora"], SCALE)]) == PARTS
    peft = image(pipe)
    value = psnr(theirs, peft, peak=255.0)
    print(f"SDXL onnx PEFT LoRA at {SCALE}: PSNR {value:.1f} dB vs diffusers set_adapters")
    assert value >= MIN_PSNR, f"PSNR {value:.1f} dB"
    assert psnr(base, peft, peak=255.0) < 35.0, "the LoRA should change the image"
    assert pipe.set_loras([(sdxl["kohya"], SCALE)]) == PARTS  # another file: every adapted session is re-created
    kohya = image(pipe)
    value = psnr(theirs, kohya, peak=255.0)
    print(f"SDXL onnx kohya LoRA at {SCALE}: PSNR {value:.1f} dB vs diffusers set_adapters (PEFT file)")
    assert value >= MIN_PSNR, f"kohya: PSNR {value:.1f} dB"
    vae = pipe._sessions["vae_decoder"]
    assert pipe.set_loras([]) == PARTS
    assert pipe._sessions["vae_decoder"] is vae
    assert np.array_equal(image(pipe), base), "no LoRA after a LoRA gives back the base image exactly"
