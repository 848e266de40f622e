"""A small x4 upscaler (``StableDiffusionUpscalePipeline``) built from configs with random weights.

The real architecture's distinguishing parts at toy width: a U-Net with 7 input channels (latents +
the low-resolution image) and ``num_class_embeds=1000`` (the noise level as class labels), a VAE of
three blocks (it upsamples by 4) with scaling factor 0.08333, the DDIM v-prediction scheduler and the
DDPM ``low_res_scheduler`` of stabilityai/stable-diffusion-x4-upscaler's config files.
"""

from __future__ import annotations

from pathlib import Path

from sdexport.demo.tiny import TINY_SPECS, build_tiny_components

MAX_NOISE_LEVEL = 350


def build_tiny_upscaler(seed: int = 0, max_noise_level: int = MAX_NOISE_LEVEL):
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    parts = build_tiny_components(TINY_SPECS["sd2-v"], seed)  # text encoder, tokenizer, DDIM v-prediction
    torch.manual_seed(seed + 10)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, num_class_embeds=1000,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True, norm_num_groups=32,
    )
    torch.manual_seed(seed + 11)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=64, scaling_factor=0.08333,
    )
    low_res = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                      beta_schedule="scaled_linear", clip_sample=False, variance_type="fixed_small")
    return diffusers.StableDiffusionUpscalePipeline(
        vae=vae.eval(), text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=unet.eval(),
        low_res_scheduler=low_res, scheduler=parts["scheduler"], max_noise_level=max_noise_level,
    )


def save_tiny_upscaler(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    build_tiny_upscaler(seed).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
