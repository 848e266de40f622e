"""SDXL on the diffusers side of ``sdexport bench`` and ``sdexport quality``.

An SDXL export is measured against diffusers' own SDXL pipelines, loaded from the folder it was
exported from: ``StableDiffusionXLPipeline`` for a base, ``StableDiffusionXLImg2ImgPipeline`` for a
refiner (which only refines an image), ``StableDiffusionXLInpaintPipeline`` for a 9-channel inpainting
U-Net. What differs from SD 1.x/2.x is gathered here: the U-Net's added conditioning
(``text_embeds`` and ``time_ids``), the second text encoder, the torch call of each component, and
the component specs the quality report compares against.
"""

from __future__ import annotations

import numpy as np

from runtime.manifest import ModelInfo
from runtime.metrics import psnr

BASE, REFINER, INPAINT = "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"


def pipeline_class(info: ModelInfo) -> str:
    """The diffusers pipeline an SDXL export is the counterpart of."""
    if info.is_inpainting:
        return INPAINT
    return REFINER if info.requires_aesthetics_score else BASE


def load_pipeline(source, info: ModelInfo):
    """diffusers' SDXL pipeline from the source folder, fp32 on the CPU, without the invisible watermark
    (the runtime adds none; with the package installed diffusers would change the pixels)."""
    import diffusers

    return getattr(diffusers, pipeline_class(info)).from_pretrained(str(source.path), add_watermarker=False)


def call_size(ref, height: int, width: int) -> dict:
    """The size arguments of a reference call: a refiner takes its size from the image it refines."""
    return {} if type(ref).__name__ == REFINER else {"height": height, "width": width}


def text_psnr(pipe, ref, prompt: str) -> float:
    """The runtime's SDXL text conditioning against diffusers' ``encode_prompt`` (both encoders'
    penultimate states concatenated, and the pooled ``text_embeds``): the worse of the two, in dB."""
    import torch

    ours, ours_pooled = pipe.sdxl.encode([prompt])
    with torch.no_grad():
        embeds, _, pooled, _ = ref.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    return min(psnr(embeds.numpy(), ours), psnr(pooled.numpy(), ours_pooled))


def component_feeds(pipe, info: ModelInfo, prompt: str, height: int, width: int) -> dict[str, dict[str, np.ndarray]]:
    """One call's inputs per SDXL component, seeded; the encoders and U-Net at the CFG batch of 2, the
    U-Net with the time ids a generation at this size sends."""
    rng = np.random.default_rng(0)
    f, n = info.vae_scale_factor, 2
    conditioner = pipe.sdxl
    feeds: dict[str, dict[str, np.ndarray]] = {}
    if conditioner.first:
        feeds["text_encoder"] = {"input_ids": np.repeat(conditioner.tokenizer([prompt]), n, axis=0)}
    feeds["text_encoder_2"] = {"input_ids": np.repeat(conditioner.tokenizer_2([prompt]), n, axis=0)}
    feeds["unet"] = {
        "sample": rng.standard_normal((n, info.unet_in_channels, height // f, width // f), np.float32),
        "timestep": np.full((n,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((n, info.max_length, info.text_hidden_size), np.float32),
        "text_embeds": rng.standard_normal((n, info.projection_dim), np.float32),
        "time_ids": np.repeat(conditioner.time_ids(height, width, 6.0), n, axis=0),
    }
    feeds["vae_decoder"] = {"latent_sample": rng.standard_normal((1, info.latent_channels, height // f, width // f), np.float32)}
    feeds["vae_encoder"] = {"sample": rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)}
    return feeds


def torch_calls(ref) -> dict:
    """The torch call of each SDXL component on those feeds (bench's latency comparison)."""
    import torch

    t = torch.from_numpy
    calls = {
        "text_encoder_2": lambda x: ref.text_encoder_2(t(x["input_ids"]), output_hidden_states=True),
        "unet": lambda x: ref.unet(t(x["sample"]), t(x["timestep"]), t(x["encoder_hidden_states"]),
                                   added_cond_kwargs={"text_embeds": t(x["text_embeds"]), "time_ids": t(x["time_ids"])}),
    }
    if ref.text_encoder is not None:  # a refiner has only the second encoder
        calls["text_encoder"] = lambda x: ref.text_encoder(t(x["input_ids"]), output_hidden_states=True)
    return calls


def specs(source, info: ModelInfo, controlnets: dict) -> dict:
    """Every SDXL component spec the reference can build, by name (quality's per-component torch side)."""
    from sdexport.export import sdxl
    from sdexport.export.components import vae_decoder_spec, vae_encoder_spec

    found = [*sdxl.text_encoder_specs(source, info), sdxl.unet_spec(source, info),
             sdxl.unet_spec(source, info, control=True), vae_encoder_spec(source, info), vae_decoder_spec(source, info)]
    found += [sdxl.controlnet_spec(cn, info) for cn in controlnets.values()]
    return {s.name: s for s in found}
