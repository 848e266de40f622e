"""Tiny SDXL pipelines (base and refiner) built in-process for the sources tests, and a source over
their in-memory modules (what ``write_single_file`` reads to write the original single-file layout).

Toy widths with SDXL's structure: two text encoders (CLIP, 32 wide, and a gelu CLIP-with-projection
standing in for OpenCLIP bigG, 48 wide with a 32-wide projection: widths that differ, as 768 and 1280
do, so diffusers' own single-file loader tells the two apart, and a projection that is not square, so
a missing transpose shows), a U-Net with added text/time conditioning (``text_time``; the base's
six time ids, the refiner's five), several transformer layers in a block, linear projections.
"""

from __future__ import annotations

from pathlib import Path

from sdexport.demo.tiny_sdxl import tiny_sdxl_vae

TEXT_HIDDEN, TEXT2_HIDDEN, PROJECTION, TIME_DIM = 32, 48, 32, 8


def _text_config(hidden_act: str, hidden: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
                          projection_dim=PROJECTION, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _unet(refiner: bool):
    from diffusers import UNet2DConditionModel

    # The refiner sees only bigG (cross-attention width = its hidden size) and five time ids
    # (sizes, crop, aesthetic score); the base sees both encoders and six.
    cross = TEXT2_HIDDEN if refiner else TEXT_HIDDEN + TEXT2_HIDDEN
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=cross,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + (5 if refiner else 6) * TIME_DIM, norm_num_groups=32,
    ).eval()


def build_tiny_sdxl(refiner: bool = False, seed: int = 0):
    """A StableDiffusionXLPipeline (refiner: StableDiffusionXLImg2ImgPipeline without text_encoder)."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet, vae = _unet(refiner), tiny_sdxl_vae()
    text_encoder = None if refiner else CLIPTextModel(_text_config("quick_gelu", TEXT_HIDDEN)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config("gelu", TEXT2_HIDDEN)).eval()
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    if refiner:
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=None, unet=unet,
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=scheduler)


def save_tiny_sdxl(out: Path, refiner: bool = False, seed: int = 0) -> Path:
    build_tiny_sdxl(refiner, seed).save_pretrained(str(out), safe_serialization=True)
    return out


class PipelineSource:
    """A diffusers pipeline's modules with a source's interface (configs and loaders), to write files from."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet_config, self.vae_config = dict(pipe.unet.config), dict(pipe.vae.config)
        self.text_encoder_config = pipe.text_encoder.config.to_dict() if pipe.text_encoder is not None else None
        self.text_encoder_2_config = pipe.text_encoder_2.config.to_dict()

    def load_unet(self):
        return self.pipe.unet

    def load_vae(self):
        return self.pipe.vae

    def load_text_encoder(self):
        return self.pipe.text_encoder

    def load_text_encoder_2(self):
        return self.pipe.text_encoder_2
