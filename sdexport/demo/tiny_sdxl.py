"""Small SDXL pipelines (base, refiner) built from configs with random weights.

The real SDXL architecture at toy width: two CLIP text encoders on the real vocabulary (the second
with a projection and a tokenizer that pads with "!"), a U-Net with ``addition_embed_type
"text_time"`` whose cross-attention width is the two encoders' widths added, and a VAE with SDXL's
scaling factor and ``force_upcast``. The SDXL config's numbers, shrunk: 32 + 32 = 64 wide text,
projection 32, time ids embedded 8 wide each.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdexport.demo.tiny import clip_tokenizer

TEXT_WIDTH = 32
PROJECTION = 32
TIME_EMBED = 8


def _text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=1, **extra)


def _unet(cross_attention_dim: int, n_time_ids: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=cross_attention_dim, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=PROJECTION + n_time_ids * TIME_EMBED, norm_num_groups=32,
    ).eval()


def tiny_sdxl_vae():
    """SDXL's VAE at toy width: its scaling factor and force_upcast."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=128,
                         scaling_factor=0.13025, force_upcast=True).eval()


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # The SDXL 1.0 scheduler_config.json values.
    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                  interpolation_type="linear", use_karras_sigmas=False, prediction_type="epsilon")


def build_tiny_sdxl(refiner: bool = False, seed: int = 0, inpainting: bool = False):
    """A diffusers StableDiffusionXLPipeline (or, for the refiner, a StableDiffusionXLImg2ImgPipeline
    with only text_encoder_2, aesthetic-score time ids and force_zeros_for_empty_prompt off, as SDXL's;
    with ``inpainting``, a StableDiffusionXLInpaintPipeline with a 9-channel U-Net)."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = _unet(TEXT_WIDTH if refiner else 2 * TEXT_WIDTH, 5 if refiner else 6, 9 if inpainting else 4)
    torch.manual_seed(seed + 1)
    vae = tiny_sdxl_vae()
    torch.manual_seed(seed + 2)
    text_encoder = None if refiner else CLIPTextModel(_text_config()).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=PROJECTION)).eval()
    tokenizer = None if refiner else clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")
    parts = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                 tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler())
    if refiner:
        return diffusers.StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=False, add_watermarker=False)
    if inpainting:
        return diffusers.StableDiffusionXLInpaintPipeline(**parts, add_watermarker=False)
    return diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False)


def save_tiny_sdxl(out_dir: str | Path, refiner: bool = False, seed: int = 0, inpainting: bool = False) -> Path:
    out_dir = Path(out_dir)
    build_tiny_sdxl(refiner, seed, inpainting).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


# Full-size SDXL 1.0 base architecture (random weights): for benchmarks, where latency does not depend
# on the weight values. The numbers are those of the SDXL base 1.0 config files.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
)
SDXL_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=1)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def save_sdxl_random(out_dir: str | Path, seed: int = 0) -> Path:
    """An SDXL-base-sized pipeline with random weights, saved as a diffusers folder (benchmarks only).

    About 14 GB of fp32 weights (U-Net 10.3 GB, text_encoder_2 2.8 GB). Each component is built, saved in
    2 GB shards and freed before the next: safetensors copies a shard into one buffer while writing it,
    so a whole pipeline saved at once would need about twice the U-Net in memory.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    builders = {
        "unet": lambda: UNet2DConditionModel(**SDXL_UNET),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)),
        "vae": lambda: AutoencoderKL(**SDXL_VAE),
    }
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed + i)
        model = build().eval()
        model.save_pretrained(str(out_dir / name), safe_serialization=True, max_shard_size="2GB")
        del model
    clip_tokenizer().save_pretrained(str(out_dir / "tokenizer"))
    clip_tokenizer(pad_token="!").save_pretrained(str(out_dir / "tokenizer_2"))
    _scheduler().save_pretrained(str(out_dir / "scheduler"))
    libraries = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                 "text_encoder": ("transformers", "CLIPTextModel"),
                 "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
                 "tokenizer": ("transformers", "CLIPTokenizer"), "tokenizer_2": ("transformers", "CLIPTokenizer"),
                 "scheduler": ("diffusers", "EulerDiscreteScheduler")}
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
             "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None],
             **{k: list(v) for k, v in libraries.items()}}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir