"""Small Stable Diffusion pipelines built from configs with random weights.

They have the real architectures (CLIP text encoder with the real 49,408-token vocabulary,
UNet2DConditionModel with cross-attention, AutoencoderKL with the SD down-sampling factor of 8)
at toy width, so tests and the demo exercise every code path of a real model in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdexport.sources.clip_vocab import write_clip_vocab


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """What distinguishes the SD families at toy scale."""

    name: str
    prediction_type: str = "epsilon"  # "v_prediction" for SD 2.x 768-v models
    unet_in_channels: int = 4  # 9 for inpainting U-Nets (latents + mask + masked-image latents)
    pad_token: str = "<|endoftext|>"  # SD 2.x (OpenCLIP) tokenizers pad with "!"
    use_linear_projection: bool = False  # SD 2.x transformer blocks use linear in/out projections
    attention_head_dim: int | tuple[int, ...] = 8
    hidden_act: str = "quick_gelu"  # OpenCLIP-H uses gelu
    text_hidden: int = 32
    scheduler: str = "PNDMScheduler"


TINY_SPECS = {
    "sd1": TinySpec("sd1"),
    "sd2-v": TinySpec(
        "sd2-v",
        prediction_type="v_prediction",
        pad_token="!",
        use_linear_projection=True,
        attention_head_dim=(2, 4),
        hidden_act="gelu",
        scheduler="DDIMScheduler",
    ),
    "inpaint": TinySpec("inpaint", unet_in_channels=9),
    # SD 2.x at its real text width: a 1024-wide gelu text encoder like OpenCLIP-H's (the token embedding
    # makes it ~50M parameters, 200 MB; still quick on a CPU).
    "sd2-v-1024": TinySpec(
        "sd2-v-1024",
        prediction_type="v_prediction",
        pad_token="!",
        use_linear_projection=True,
        attention_head_dim=(2, 4),
        hidden_act="gelu",
        text_hidden=1024,
        scheduler="DDIMScheduler",
    ),
}


def _scheduler(spec: TinySpec):
    import diffusers

    # The SD 1.5 / 2.1 scheduler_config.json values.
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type=spec.prediction_type,
        trained_betas=None,
    )
    if spec.scheduler == "PNDMScheduler":
        return diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **config)
    return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **config)


def clip_tokenizer(directory: Path | None = None, **kwargs):
    """transformers' CLIPTokenizer on the real vocabulary, written to ``directory`` (kept) or to a
    temporary one: the tokenizer holds its vocabulary in memory once loaded."""
    import tempfile

    from transformers import CLIPTokenizer

    if directory is not None:
        write_clip_vocab(directory)
        return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77, **kwargs)
    with tempfile.TemporaryDirectory(prefix="sdexport-vocab-") as scratch:
        return clip_tokenizer(Path(scratch), **kwargs)


def build_tiny_components(spec: TinySpec | str = "sd1", seed: int = 0, tokenizer_dir: Path | None = None):
    """The five components of a tiny pipeline, deterministic for a seed."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = TINY_SPECS[spec] if isinstance(spec, str) else spec
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=spec.unet_in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.attention_head_dim,
        use_linear_projection=spec.use_linear_projection,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=128,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=spec.text_hidden,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=spec.hidden_act,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
    )
    tokenizer = clip_tokenizer(tokenizer_dir, pad_token=spec.pad_token)
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=_scheduler(spec),
    )


# Full-size Stable Diffusion 1.5 architecture (random weights): for benchmarks, where latency does
# not depend on the weight values. The numbers are those of the SD 1.5 config files.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
)


def save_sd15_random(out_dir: str | Path, seed: int = 0) -> Path:
    """An SD 1.5-sized pipeline with random weights, saved as a diffusers folder (benchmarks only)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    pipe = diffusers.StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET).eval(),
        vae=AutoencoderKL(**SD15_VAE).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval(),
        tokenizer=tokenizer,
        scheduler=_scheduler(TinySpec("sd15")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def build_tiny_pipeline(spec: TinySpec | str = "sd1", seed: int = 0):
    """A diffusers pipeline object (inpainting pipeline for 9-channel U-Nets)."""
    import diffusers

    spec = TINY_SPECS[spec] if isinstance(spec, str) else spec
    parts = build_tiny_components(spec, seed)
    cls = (
        diffusers.StableDiffusionInpaintPipeline
        if spec.unet_in_channels == 9
        else diffusers.StableDiffusionPipeline
    )
    return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_pipeline(out_dir: str | Path, spec: TinySpec | str = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers model folder and return its path."""
    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(spec, seed)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def save_tiny_depth_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """A StableDiffusionDepth2ImgPipeline at toy width: SD 2 tiny parts with a 5-channel U-Net and a
    4-layer ViT DPT (hidden 32, patch 8, 32x32 input). The DPT's weights are drawn wider than its
    init so that the depth map has structure (its init gives values near 1e-8)."""
    import diffusers
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    parts = build_tiny_components(dataclasses.replace(TINY_SPECS["sd2-v"], name="depth", unet_in_channels=5), seed)
    torch.manual_seed(seed + 5)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
                       patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
                       fusion_hidden_size=16, is_hybrid=False)
    dpt = DPTForDepthEstimation(config).eval()
    with torch.no_grad():
        for p in dpt.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.9 / p[0].numel() ** 0.5)
    processor = DPTImageProcessor(size={"height": 32, "width": 32})
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(**parts, depth_estimator=dpt, feature_extractor=processor)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
