"""The SDXL family's model description (base, refiner, Turbo) from its diffusers configs.

A U-Net with ``addition_embed_type == "text_time"`` and a ``text_encoder_2`` make an SDXL model; the
refiner is told apart by its time ids (5, ending in an aesthetic score, instead of 6), which the
U-Net's ``projection_class_embeddings_input_dim`` fixes. (``components.model_info`` adds the
ControlNet residual layout, which is the same function of the U-Net config as for SD.)
"""

from __future__ import annotations


from runtime.manifest import ModelInfo
from sdexport.errors import SourceError
from sdexport.sources.base import model_index


def is_sdxl(unet_config: dict) -> bool:
    return unet_config.get("addition_embed_type") == "text_time"


def has_text_encoder(source) -> bool:
    """Whether the source has the first (CLIP ViT-L) text encoder: an SDXL refiner has only the second.
    Diffusers folders say so (``has_text_encoder``); single files give no ``text_encoder_config``."""
    flag = getattr(source, "has_text_encoder", None)
    if flag is not None:
        return bool(flag)
    try:
        return source.text_encoder_config is not None
    except SourceError:  # a wrapped folder without text_encoder/
        return False


def pipeline_flags(source) -> dict:
    """``requires_aesthetics_score`` and ``force_zeros_for_empty_prompt`` from model_index.json, with
    the defaults diffusers' SDXL pipelines register (False, True) where the index does not say."""
    index = model_index(source)
    return {"requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}


def sdxl_model_info(source) -> ModelInfo:
    unet, vae, sched = source.unet_config, source.vae_config, source.scheduler_config
    text_2 = getattr(source, "text_encoder_2_config", None)
    if text_2 is None:
        raise SourceError(f"{source.path}: an SDXL U-Net (addition_embed_type text_time) needs text_encoder_2 "
                          f"and tokenizer_2; this model has none")
    projection = int(text_2.get("projection_dim", text_2["hidden_size"]))
    time_dim = int(unet["addition_time_embed_dim"])
    flags = pipeline_flags(source)
    n_ids = (int(unet["projection_class_embeddings_input_dim"]) - projection) // time_dim
    if n_ids not in (5, 6):
        raise SourceError(f"{source.path}: the U-Net's projection_class_embeddings_input_dim does not fit "
                          f"text_encoder_2's projection_dim {projection} plus 5 or 6 time ids of {time_dim}")
    flags["requires_aesthetics_score"] = n_ids == 5  # what the U-Net was trained with decides
    cross = int(unet["cross_attention_dim"])
    hidden_1 = int(source.text_encoder_config["hidden_size"]) if has_text_encoder(source) else 0
    if hidden_1 + int(text_2["hidden_size"]) != cross:
        raise SourceError(f"{source.path}: the text encoders' widths ({hidden_1} + {text_2['hidden_size']}) do not "
                          f"add up to the U-Net's cross_attention_dim {cross}")
    vae_scale = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1)
    size = int(unet.get("sample_size", 128)) * vae_scale
    shift = vae.get("shift_factor")
    return ModelInfo(
        family="sdxl-refiner" if flags["requires_aesthetics_score"] else "sdxl",
        prediction_type=sched.get("prediction_type", "epsilon"),
        latent_channels=int(vae.get("latent_channels", 4)),
        unet_in_channels=int(unet.get("in_channels", 4)),
        vae_scale_factor=vae_scale,
        vae_scaling_factor=float(vae.get("scaling_factor", 0.13025)),
        vae_shift_factor=float(shift) if shift is not None else None,
        text_hidden_size=cross,
        max_length=int(text_2.get("max_position_embeddings", 77)),
        default_height=size,
        default_width=size,
        time_cond_proj_dim=unet.get("time_cond_proj_dim"),
        text_encoder_2_hidden_size=int(text_2["hidden_size"]),
        projection_dim=projection,
        addition_time_embed_dim=time_dim,
        vae_force_upcast=bool(vae.get("force_upcast", True)),
        **flags,
    )


