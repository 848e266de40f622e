"""Train sdexport's bundled small latent diffusion model on the synthetic shapes set.

    python -m sdexport.demo.train --run runs/small --seed 0            # all stages, resumable
    python -m sdexport.demo.train --run runs/small --device cuda       # the same on a GPU

Four stages, each resumable from its latest checkpoint (data batches and noise are functions of
(seed, stage, step), so an interrupted and resumed run gives the same weights as one that never stopped):

1. ``vae``: an AutoencoderKL, 64x64 RGB -> 8x16x16 latents (downsampling 4: a small shape of ~22 px
   spans ~5 latent pixels, which a factor of 8 would cut to 3), L1 + MSE + a small KL term, the
   decoder fed posterior samples; then more steps with the decoder fed the posterior mean, which is
   what the diffusion stages train on (the latent means of the image pool are encoded once, and the
   scaling factor set to 1/std). Sharper edges than decoding noisy samples.
2. ``unet``: a UNet2DConditionModel with cross-attention and a CLIP text encoder (real tokenizer and
   49,408-token vocabulary; the embedding table is trained only for the tokens the captions use,
   and remembers the mapping), trained together from scratch on the epsilon objective with min-SNR
   weighting, captions dropped 10% of the time for classifier-free guidance, and an EMA of the weights.
3. ``controlnet``: a ControlNet copied from the trained U-Net's encoder, conditioned on Canny edge
   maps of the scenes (``runtime.preprocess.canny``), trained with the U-Net and text encoder frozen.
4. ``pack``: the EMA weights as a standard diffusers pipeline folder + ControlNet folder under the run
   directory, and the compact fp16 assets (``sdexport/demo/assets/small``) with a provenance record.

The semantic check (:mod:`sdexport.demo.semantic`) scores samples on held-out captions during training.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdexport.demo import data

STAGES = ("vae", "unet", "controlnet", "pack")

# --- architectures ------------------------------------------------------------------------------

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=8,  # 16x16x8: a third of the 64x64x3 pixels; 4 channels trained to blurrier images
    norm_num_groups=8,
    sample_size=data.RESOLUTION,
    mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=data.RESOLUTION // 4,
    in_channels=VAE_CONFIG["latent_channels"],
    out_channels=VAE_CONFIG["latent_channels"],
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    # attention at 8x8 and 4x4 (and the mid block): at 16x16 it would triple the training cost
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# Two stride-2 convolutions: 64x64 edge maps -> the 16x16 latent grid (SD's four-level embedding is x8).
CONTROLNET_EMBEDDING = (16, 32, 64)
# Stable Diffusion 1.5's noise schedule.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, prediction_type="epsilon", trained_betas=None)


@dataclasses.dataclass(frozen=True)
class Settings:
    run: Path
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    n_images: int = 24_000  # pool of rendered training scenes (~10 per training combination)
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 8e-4
    vae_kl: float = 1e-6  # weight of the KL sum per image
    vae_grad: float = 0.0  # weight of the L1 of pixel differences
    vae_mean_steps: int = 750  # then this many steps on the posterior mean, at the final learning rate
    unet_steps: int = 8000  # held-out colour+shape accuracy (EMA weights): 0.70 at 3,000, 0.78 at 4,000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    cfg_drop: float = 0.1  # captions replaced by "" (classifier-free guidance)
    controlnet_steps: int = 3000  # held-out edge maps: position followed for 14 of 16 after 1,000 steps
    controlnet_batch: int = 32
    controlnet_lr: float = 5e-4
    controlnet_cfg_drop: float = 0.3
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    # Offset noise (a per-image, per-channel constant added to the training noise): SD's schedule keeps
    # ~0.5% of the signal at t=999, so without it the model learns to read the image's mean colour from
    # that residue, which pure noise at sampling time lacks, and every background comes out near the
    # data set's mean colour (measured: background right for 15% of held-out prompts after 3,000 steps).
    offset_noise: float = 0.15
    warmup: int = 200
    checkpoint_every: int = 250
    eval_every: int = 500
    eval_prompts: int = 40
    assets: Path | None = None  # where `pack` writes the compact weights (sdexport/demo/assets/small)


# --- small helpers ------------------------------------------------------------------------------


def log(run: Path, record: dict) -> None:
    record = {"time": round(time.time(), 1), **record}
    with open(run / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, STAGES.index(stage), step])


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGES.index(stage) * 100_003 + step)


def lr_at(step: int, base: float, warmup: int, total: int | None = None) -> float:
    """Linear warm-up, then constant (``total`` None) or cosine to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None:
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


# --- data ---------------------------------------------------------------------------------------


class Pool:
    """The rendered training scenes (uint8 images and edge maps), regenerated from the seed."""

    def __init__(self, n: int, seed: int, progress: bool = True):
        self.scenes = data.scenes(n, seed, "train")
        images = np.empty((n, data.RESOLUTION, data.RESOLUTION, 3), np.uint8)
        edges = np.empty((n, data.RESOLUTION, data.RESOLUTION), np.uint8)
        for i, scene in enumerate(tqdm(self.scenes, desc="render scenes", unit="img", disable=not progress,
                                       mininterval=10)):
            image = data.render(scene)
            images[i] = np.asarray(image)
            edges[i] = np.asarray(data.edge_map(image))[..., 0]
        self.images, self.edges = images, edges

    def __len__(self) -> int:
        return len(self.scenes)

    def pixels(self, idx: np.ndarray) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1]."""
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    def control(self, idx: np.ndarray) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1], as the ControlNet pipelines feed a control image."""
        e = torch.from_numpy(self.edges[idx]).float() / 255.0
        return e[:, None].expand(-1, 3, -1, -1).contiguous()


class Captions:
    """Captions to CLIP token ids (transformers' tokenizer on the real vocabulary), cached."""

    def __init__(self, tokenizer_dir: Path):
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
        self.cache: dict[str, list[int]] = {}

    def ids(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self.cache]
        if missing:
            out = self.tokenizer(missing, padding="max_length", max_length=77, truncation=True).input_ids
            self.cache.update(zip(missing, out))
        return torch.tensor([self.cache[c] for c in captions], dtype=torch.long)

    def used_token_ids(self) -> list[int]:
        """Every token a caption can contain (BPE works word by word), with BOS and EOS."""
        ids = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id}
        for word in data.CAPTION_VOCABULARY:
            ids.update(self.tokenizer(word, add_special_tokens=False).input_ids)
        return sorted(ids)


def batch_captions(pool: Pool, idx: np.ndarray, rng: np.random.Generator, drop: float) -> list[str]:
    out = []
    for i in idx:
        out.append("" if rng.uniform() < drop else data.training_caption(pool.scenes[int(i)], rng))
    return out


# --- models -------------------------------------------------------------------------------------


class CompactEmbedding(torch.nn.Module):
    """A token embedding with rows only for the tokens the captions use; other ids map to a last,
    untrained row. ``full()`` expands it into the standard 49,408-row table."""

    def __init__(self, token_ids: list[int], vocab_size: int, dim: int):
        super().__init__()
        lookup = torch.full((vocab_size,), len(token_ids), dtype=torch.long)
        lookup[torch.tensor(token_ids)] = torch.arange(len(token_ids))
        self.register_buffer("lookup", lookup)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long))
        self.weight = torch.nn.Parameter(torch.randn(len(token_ids) + 1, dim) * 0.02)

    def forward(self, input_ids):
        return torch.nn.functional.embedding(self.lookup[input_ids], self.weight)

    def full(self) -> torch.Tensor:
        """Unused ids get the mean of the trained rows: a neutral word rather than a random one."""
        rows = self.weight[: len(self.token_ids)].detach()
        table = rows.mean(0, keepdim=True).repeat(self.lookup.numel(), 1)
        table[self.token_ids] = rows
        return table


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def make_text_encoder(token_ids: list[int]):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    model.set_input_embeddings(CompactEmbedding(token_ids, TEXT_CONFIG["vocab_size"], TEXT_CONFIG["hidden_size"]))
    return model


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_controlnet(unet):
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING)


def noise_schedule():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def training_noise(shape, gen: torch.Generator, offset: float) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
    return noise


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR."""
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / snr


# --- stage 1: the VAE ---------------------------------------------------------------------------


def train_vae(s: Settings, pool: Pool) -> None:
    stage_dir = s.run / "vae"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = stage_dir / "checkpoint.pt"
    torch.manual_seed(s.seed)
    vae = make_vae().to(s.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    start, elapsed = 0, 0.0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
    total = s.vae_steps + s.vae_mean_steps
    if start >= total:
        return
    vae.train()
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, total), desc="vae", unit="step", initial=start, total=total, mininterval=10)
    for step in bar:
        rng = step_rng(s.seed, "vae", step)
        idx = rng.integers(0, len(pool), s.vae_batch)
        x = pool.pixels(idx).to(s.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(min(step, s.vae_steps), s.vae_lr, s.warmup, s.vae_steps)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean
        if step < s.vae_steps:  # phase 1: posterior samples; phase 2: the mean, what the U-Net will see
            z = z + posterior.std * torch.randn(z.shape, generator=step_generator(s.seed, "vae", step)).to(s.device)
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        mse = ((recon - x) ** 2).mean()
        grad = image_gradient_l1(recon, x)
        kl = posterior.kl().mean()  # summed over the latent, averaged over the batch
        loss = l1 + mse + s.vae_grad * grad + s.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % 50 == 0 or done == total:
            bar.set_postfix(l1=f"{l1.item():.4f}", mse=f"{mse.item():.5f}")
            log(s.run, {"stage": "vae", "step": done, "l1": l1.item(), "mse": mse.item(), "grad_l1": grad.item(), "kl": kl.item(),
                        "lr": opt.param_groups[0]["lr"], "elapsed": time.perf_counter() - t0})
        if done % s.checkpoint_every == 0 or done == total:
            save_checkpoint(ckpt_path, {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": done,
                                        "elapsed": time.perf_counter() - t0})
    bar.close()
    log(s.run, {"stage": "vae", "step": total, "eval": vae_eval(s, pool, vae.eval())})


def load_trained_vae(s: Settings):
    vae = make_vae()
    vae.load_state_dict(load_checkpoint(s.run / "vae" / "checkpoint.pt")["model"])
    return vae.eval().to(s.device)


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical pixel differences: what keeps edges sharp."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()




def encode_pool(s: Settings, pool: Pool, vae) -> dict:
    """Latent means of every pool image (unscaled), and the scaling factor 1/std of them."""
    path = s.run / "vae" / "latents.pt"
    cached = load_checkpoint(path)
    if cached is not None and cached["n"] == len(pool):
        return cached
    means = []
    with torch.no_grad():
        for i in tqdm(range(0, len(pool), 256), desc="encode latents", unit="batch", mininterval=10):
            idx = np.arange(i, min(i + 256, len(pool)))
            means.append(vae.encode(pool.pixels(idx).to(s.device)).latent_dist.mean.cpu())
    mean = torch.cat(means)
    scaling = float(1.0 / mean.flatten().std())
    out = {"n": len(pool), "mean": mean, "scaling_factor": round(scaling, 5)}
    save_checkpoint(path, out)
    return out


def vae_eval(s: Settings, pool: Pool, vae, n: int = 256) -> dict:
    """Reconstruction PSNR on held-out scenes, and whether the semantic check still reads them."""
    from sdexport.demo import semantic

    scenes = data.scenes(n, s.seed + 1, "held_out")
    images = np.stack([np.asarray(data.render(sc)) for sc in scenes])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(s.device)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    out = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    mse = float(np.mean((out.astype(np.float64) - images) ** 2))
    acc = semantic.accuracy([semantic.score(im, sc.caption) for im, sc in zip(out, scenes)])
    return {"psnr_db": 10 * math.log10(255**2 / max(mse, 1e-12)), "semantic": acc}


# --- sampling (for evaluation during training) --------------------------------------------------


@torch.no_grad()
def sample(unet, text_encoder, vae, scaling: float, ids: torch.Tensor, seed: int, steps: int = 20,
           guidance: float = 5.0, controlnet=None, control: torch.Tensor | None = None) -> np.ndarray:
    """Images (uint8 [B, H, W, 3]) from token ids, DPM-Solver++ 2M and classifier-free guidance."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(**SCHEDULE)
    sched.set_timesteps(steps)
    device = next(unet.parameters()).device
    b = ids.shape[0]
    empty = torch.full_like(ids, TEXT_CONFIG["eos_token_id"])
    empty[:, 0] = TEXT_CONFIG["bos_token_id"]
    emb = text_encoder(torch.cat([empty, ids]).to(device)).last_hidden_state
    latent = data.RESOLUTION // 4
    channels = VAE_CONFIG["latent_channels"]
    x = torch.randn((b, channels, latent, latent), generator=torch.Generator().manual_seed(seed)).to(device)
    x = x * sched.init_noise_sigma
    cond = torch.cat([control, control]).to(device) if control is not None else None
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        extra = {}
        if controlnet is not None:
            down, mid = controlnet(xin, t, emb, controlnet_cond=cond, return_dict=False)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        eps = unet(xin, t, emb, **extra).sample
        uncond, text = eps.chunk(2)
        x = sched.step(uncond + guidance * (text - uncond), t, x).prev_sample
    img = vae.decode(x / scaling).sample.clamp(-1, 1)
    return ((img + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def semantic_eval(s: Settings, unet, text_encoder, vae, scaling: float, captions: Captions,
                  controlnet=None, seed: int = 1234) -> dict:
    from sdexport.demo import semantic

    scenes = data.held_out_scenes(s.eval_prompts, seed=0)
    ids = captions.ids([sc.caption for sc in scenes])
    control = None
    if controlnet is not None:
        control = torch.stack([
            torch.from_numpy(np.asarray(data.edge_map(data.render(sc)))[..., 0].copy()).float().div(255)[None].expand(3, -1, -1)
            for sc in scenes
        ])
    images = sample(unet, text_encoder, vae, scaling, ids, seed, controlnet=controlnet, control=control)
    scores = [semantic.score(im, sc.caption) for im, sc in zip(images, scenes)]
    return semantic.accuracy(scores)


# --- stage 2: U-Net + text encoder --------------------------------------------------------------


def train_unet(s: Settings, pool: Pool, latents: dict, vae, captions: Captions) -> None:
    stage_dir = s.run / "unet"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = stage_dir / "checkpoint.pt"
    torch.manual_seed(s.seed + 1)
    unet = make_unet().to(s.device)
    text_encoder = make_text_encoder(captions.used_token_ids()).to(s.device)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.0)
    start, elapsed = 0, 0.0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text_encoder"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
    if start >= s.unet_steps:
        return
    sched = noise_schedule()
    alphas = sched.alphas_cumprod.to(s.device)
    scaling = latents["scaling_factor"]
    unet.train()
    text_encoder.train()
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, s.unet_steps), desc="unet+text", unit="step", initial=start, total=s.unet_steps, mininterval=10)
    for step in bar:
        rng = step_rng(s.seed, "unet", step)
        gen = step_generator(s.seed, "unet", step)
        idx = rng.integers(0, len(pool), s.unet_batch)
        ids = captions.ids(batch_captions(pool, idx, rng, s.cfg_drop)).to(s.device)
        z0 = latents["mean"][idx] * scaling
        noise = training_noise(z0.shape, gen, s.offset_noise)
        t = torch.randint(0, sched.config.num_train_timesteps, (s.unet_batch,), generator=gen)
        zt = sched.add_noise(z0, noise, t)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.unet_lr, s.warmup)
        emb = text_encoder(ids).last_hidden_state
        pred = unet(zt.to(s.device), t.to(s.device), emb).sample
        per_sample = ((pred - noise.to(s.device)) ** 2).mean(dim=(1, 2, 3))
        loss = (min_snr_weights(alphas, t.to(s.device), s.min_snr_gamma) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, step, s.ema_decay)
        ema_update(ema_text, text_encoder, step, s.ema_decay)
        done = step + 1
        if done % 50 == 0 or done == s.unet_steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log(s.run, {"stage": "unet", "step": done, "loss": loss.item(), "mse": per_sample.mean().item(),
                        "lr": opt.param_groups[0]["lr"], "elapsed": time.perf_counter() - t0})
        if done % s.checkpoint_every == 0 or done == s.unet_steps:
            save_checkpoint(ckpt_path, {
                "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(), "ema_text_encoder": ema_text.state_dict(),
                "optimizer": opt.state_dict(), "step": done, "elapsed": time.perf_counter() - t0,
            })
        if s.eval_every and (done % s.eval_every == 0 or done == s.unet_steps):
            acc = semantic_eval(s, ema_unet, ema_text, vae, scaling, captions)
            log(s.run, {"stage": "unet", "step": done, "eval": acc})
            tqdm.write(f"unet step {done}: held-out semantic accuracy {json.dumps(acc)}")
    bar.close()


def load_trained_unet(s: Settings, captions: Captions):
    state = load_checkpoint(s.run / "unet" / "checkpoint.pt")
    unet, text_encoder = make_unet(), make_text_encoder(captions.used_token_ids())
    unet.load_state_dict(state["ema_unet"])
    text_encoder.load_state_dict(state["ema_text_encoder"])
    return unet.eval().to(s.device), text_encoder.eval().to(s.device)


# --- stage 3: ControlNet ------------------------------------------------------------------------


def train_controlnet(s: Settings, pool: Pool, latents: dict, vae, captions: Captions) -> None:
    stage_dir = s.run / "controlnet"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = stage_dir / "checkpoint.pt"
    unet, text_encoder = load_trained_unet(s, captions)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    torch.manual_seed(s.seed + 2)
    controlnet = make_controlnet(unet).to(s.device)
    ema = copy.deepcopy(controlnet).eval()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=s.controlnet_lr, weight_decay=0.0)
    start, elapsed = 0, 0.0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        controlnet.load_state_dict(state["controlnet"])
        ema.load_state_dict(state["ema_controlnet"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
    if start >= s.controlnet_steps:
        return
    sched = noise_schedule()
    alphas = sched.alphas_cumprod.to(s.device)
    scaling = latents["scaling_factor"]
    controlnet.train()
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, s.controlnet_steps), desc="controlnet", unit="step", initial=start, total=s.controlnet_steps,
               mininterval=10)
    for step in bar:
        rng = step_rng(s.seed, "controlnet", step)
        gen = step_generator(s.seed, "controlnet", step)
        idx = rng.integers(0, len(pool), s.controlnet_batch)
        ids = captions.ids(batch_captions(pool, idx, rng, s.controlnet_cfg_drop)).to(s.device)
        cond = pool.control(idx).to(s.device)
        z0 = latents["mean"][idx] * scaling
        noise = training_noise(z0.shape, gen, s.offset_noise)
        t = torch.randint(0, sched.config.num_train_timesteps, (s.controlnet_batch,), generator=gen)
        zt = sched.add_noise(z0, noise, t).to(s.device)
        t = t.to(s.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.controlnet_lr, s.warmup)
        with torch.no_grad():
            emb = text_encoder(ids).last_hidden_state
        down, mid = controlnet(zt, t, emb, controlnet_cond=cond, return_dict=False)
        pred = unet(zt, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        per_sample = ((pred - noise.to(s.device)) ** 2).mean(dim=(1, 2, 3))
        loss = (min_snr_weights(alphas, t, s.min_snr_gamma) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        ema_update(ema, controlnet, step, s.ema_decay)
        done = step + 1
        if done % 50 == 0 or done == s.controlnet_steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log(s.run, {"stage": "controlnet", "step": done, "loss": loss.item(), "mse": per_sample.mean().item(),
                        "lr": opt.param_groups[0]["lr"], "elapsed": time.perf_counter() - t0})
        if done % s.checkpoint_every == 0 or done == s.controlnet_steps:
            save_checkpoint(ckpt_path, {"controlnet": controlnet.state_dict(), "ema_controlnet": ema.state_dict(),
                                        "optimizer": opt.state_dict(), "step": done, "elapsed": time.perf_counter() - t0})
        if s.eval_every and (done % s.eval_every == 0 or done == s.controlnet_steps):
            acc = semantic_eval(s, unet, text_encoder, vae, scaling, captions, controlnet=ema)
            log(s.run, {"stage": "controlnet", "step": done, "eval": acc})
            tqdm.write(f"controlnet step {done}: held-out semantic accuracy {json.dumps(acc)}")
    bar.close()


# --- stage 4: diffusers folders and the compact assets ------------------------------------------


def save_diffusers(s: Settings, vae, captions: Captions, scaling: float, tokenizer_dir: Path) -> tuple[Path, Path]:
    """The EMA weights as a StableDiffusionPipeline folder and a ControlNet folder (fp32)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet, compact_text = load_trained_unet(s, captions)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    compact = compact_text.get_input_embeddings()
    state = {k: v for k, v in compact_text.state_dict().items() if "token_embedding" not in k}
    text_encoder.load_state_dict(state, strict=False)
    text_encoder.get_input_embeddings().weight.data.copy_(compact.full())
    missing = set(text_encoder.state_dict()) - set(state)
    assert all("token_embedding" in k for k in missing), missing
    vae = copy.deepcopy(vae).cpu()
    vae.register_to_config(scaling_factor=scaling)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet.cpu(), vae=vae, text_encoder=text_encoder.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77),
        scheduler=diffusers.DPMSolverMultistepScheduler(**SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = s.run / "diffusers"
    pipe.save_pretrained(str(out / "model"), safe_serialization=True)
    controlnet = make_controlnet(unet)
    controlnet.load_state_dict(load_checkpoint(s.run / "controlnet" / "checkpoint.pt")["ema_controlnet"])
    controlnet.save_pretrained(str(out / "controlnet"), safe_serialization=True)
    return out / "model", out / "controlnet"


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "numpy", "pillow", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def final_losses(run: Path) -> dict:
    """Mean of the last 10 logged values per stage (each logged value is one batch)."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    out = {}
    for stage, key in (("vae", "l1"), ("vae", "mse"), ("unet", "loss"), ("unet", "mse"), ("controlnet", "loss"), ("controlnet", "mse")):
        values = [r[key] for r in records if r.get("stage") == stage and key in r]
        if values:
            out[f"{stage}_{key}"] = float(np.mean(values[-10:]))
    evals = {r["stage"]: r["eval"] for r in records if "eval" in r}
    return {"losses": out, "last_eval": evals}


def stage_times(run: Path) -> dict:
    times = {}
    for stage in ("vae", "unet", "controlnet"):
        state = load_checkpoint(run / stage / "checkpoint.pt")
        if state is not None:
            times[stage] = round(state["elapsed"], 1)
    return times


def plot_losses(run: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (stage, key, title) in zip(axes, (("vae", "l1", "VAE: L1 reconstruction"), ("unet", "mse", "U-Net + text encoder: eps MSE"),
                                               ("controlnet", "mse", "ControlNet: eps MSE"))):
        pts = [(r["step"], r[key]) for r in records if r.get("stage") == stage and key in r]
        if not pts:
            continue
        steps, values = np.array(pts).T
        ax.plot(steps, values, lw=0.6, alpha=0.4, color="#4c72b0")
        k = 10
        if len(values) > k:
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, lw=1.5, color="#4c72b0")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        evals = [(r["step"], r["eval"].get("color_and_shape")) for r in records if r.get("stage") == stage and "eval" in r]
        if evals:
            ax2 = ax.twinx()
            ax2.plot(*np.array(evals, dtype=float).T, "o-", color="#dd8452", ms=3)
            ax2.set_ylim(0, 1.02)
            ax2.set_ylabel("held-out colour+shape accuracy", color="#dd8452", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pack(s: Settings, pool: Pool, vae, captions: Captions, latents: dict, tokenizer_dir: Path, argv: list[str]) -> None:
    from sdexport.demo.run import pack_assets

    model_dir, controlnet_dir = save_diffusers(s, vae, captions, latents["scaling_factor"], tokenizer_dir)
    assets = Path(s.assets) if s.assets else Path(__file__).resolve().parent / "assets" / "small"
    provenance = {
        "command": "python -m sdexport.demo.train " + " ".join(argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()
                     if k not in ("run", "assets", "threads")},
        "seed": s.seed,
        "steps": {"vae": s.vae_steps + s.vae_mean_steps, "unet": s.unet_steps, "controlnet": s.controlnet_steps},
        "wall_time_s": stage_times(s.run),
        "device": s.device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "libraries": library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": {"train_images": len(pool), "resolution": data.RESOLUTION, "held_out_combinations": len(data.held_out_combinations()),
                 "all_combinations": len(data.all_combinations())},
        "vae_eval": vae_eval(s, pool, vae),
        **final_losses(s.run),
    }
    pack_assets(model_dir, controlnet_dir, assets, provenance, captions.used_token_ids())
    plot_losses(s.run, s.run / "loss_curve.png")
    print(f"wrote {assets} and {s.run / 'loss_curve.png'}")


# --- command line -------------------------------------------------------------------------------


def parse(argv: list[str]) -> tuple[Settings, list[str]]:
    defaults = Settings(run=Path("."))
    p = argparse.ArgumentParser(prog="python -m sdexport.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="run directory (checkpoints, logs; resumed if present)")
    p.add_argument("--stage", choices=("all", *STAGES), default="all", help="run one stage (and what it needs) or all")
    for f in dataclasses.fields(Settings):
        if f.name in ("run",):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = {int: int, float: float, str: str}.get(type(default), str)
        if f.name == "threads":
            kind = int
        if f.name == "assets":
            kind = Path
        p.add_argument(flag, type=kind, default=default)
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    return Settings(**values), [args.stage]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s, (stage,) = parse(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    s.run.mkdir(parents=True, exist_ok=True)
    from sdexport.sources.clip_vocab import write_clip_vocab

    tokenizer_dir = s.run / "tokenizer"
    if not (tokenizer_dir / "merges.txt").is_file():
        write_clip_vocab(tokenizer_dir)
    captions = Captions(tokenizer_dir)
    pool = Pool(s.n_images, s.seed)
    wanted = STAGES if stage == "all" else STAGES[: STAGES.index(stage) + 1]
    train_vae(s, pool)
    vae = load_trained_vae(s)
    if "unet" not in wanted:
        return 0
    latents = encode_pool(s, pool, vae)
    train_unet(s, pool, latents, vae, captions)
    if "controlnet" in wanted:
        train_controlnet(s, pool, latents, vae, captions)
    if "pack" in wanted:
        pack(s, pool, vae, captions, latents, tokenizer_dir, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
