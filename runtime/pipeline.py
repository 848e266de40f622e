"""One denoising loop for txt2img, img2img, inpainting and ControlNet, over any backend.

The loop follows diffusers' Stable Diffusion pipelines step for step (same order of random draws,
same float32 arithmetic), so that with ``rng="torch"`` a seed gives the image diffusers gives.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from runtime import image as imgproc
from runtime.backends import SessionOptions, open_session
from runtime.manifest import Manifest
from runtime.numerics import check_finite
from runtime.rng import RNG_KINDS, make_rng
from runtime.schedulers import SCHEDULER_NAMES, scheduler_from_config, scheduler_from_file
from runtime.tokenizer import CLIPTokenizer

__all__ = ["Pipeline", "Control", "Result", "PipelineInputError"]

F32 = np.float32


class PipelineInputError(ValueError):
    """A generation argument is invalid; the message says which and why."""


@dataclasses.dataclass
class Control:
    """One ControlNet applied to a run."""

    name: str  # the ControlNet's name in the export (controlnet/<name>)
    image: Image.Image | str | Path
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps where the control starts ...
    end: float = 1.0  # ... and stops acting


@dataclasses.dataclass
class Result:
    images: list[Image.Image]
    latents: np.ndarray | None
    seed: int
    settings: dict[str, Any]
    timings: dict[str, float]  # seconds per component (summed over calls), "load" (sessions opened), "total"
    calls: dict[str, int]

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def overhead_seconds(self) -> float:
        """Time not spent inside a model or loading one: tokenizer, scheduler, CFG arithmetic, image conversion."""
        return self.timings["total"] - sum(v for k, v in self.timings.items() if k != "total")


class _Timed:
    """A session wrapper that accumulates wall time and call counts per component."""

    def __init__(self, session, name: str, timings: dict, calls: dict):
        self.session, self.name, self.timings, self.calls = session, name, timings, calls
        self.component = session.component

    def run(self, feeds):
        start = time.perf_counter()
        out = self.session.run(feeds)
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - start
        self.calls[self.name] = self.calls.get(self.name, 0) + 1
        return out


class Pipeline:
    """Generate images from an sdexport artifact directory.

    >>> pipe = Pipeline.from_dir("OUT")
    >>> image = pipe("a prompt", steps=20, seed=1, rng="torch")
    """

    def __init__(self, manifest: Manifest, options: SessionOptions | Mapping[str, Any] | None = None,
                 cfg: str | None = None):
        self.manifest = manifest
        self.root = Path(manifest.root or ".")
        self.info = manifest.model
        profile_backend = dict(manifest.runtime.backend_options)
        if options is None:
            options = SessionOptions.from_mapping(profile_backend)
        elif not isinstance(options, SessionOptions):
            if "device" in options and "providers" not in options:
                profile_backend.pop("providers", None)  # a device chosen here replaces the profile's providers
            options = SessionOptions.from_mapping({**profile_backend, **options})
        self.options = options
        self.cfg = cfg or manifest.runtime.cfg
        if self.cfg not in ("batched", "sequential"):
            raise PipelineInputError(f"cfg mode {self.cfg!r}: use batched or sequential")
        self.tokenizer = CLIPTokenizer.from_dir(self.root / manifest.tokenizer_dir)
        self.scheduler_path = self.root / manifest.scheduler_config
        scheduler_from_file(self.scheduler_path)  # fails here, naming the file, if the config is unusable
        self.scheduler_config = json.loads(self.scheduler_path.read_text(encoding="utf-8"))
        self._sessions: dict[str, Any] = {}
        self._device_loop: Any = None  # runtime.device_loop.DeviceLoop, opened where it applies
        self.loop_note: str | None = None  # why the last run used the numpy loop (None: device loop or not tried)
        self.timings: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @classmethod
    def from_dir(cls, directory: str | Path, options: SessionOptions | Mapping[str, Any] | None = None,
                 cfg: str | None = None) -> "Pipeline":
        return cls(Manifest.load(directory), options, cfg)

    # -- sessions ------------------------------------------------------------------------------

    def session(self, name: str):
        """Open a component on first use (an img2img-free run never loads the VAE encoder)."""
        if name not in self._sessions:
            start = time.perf_counter()
            component = self.manifest.component(name)
            self.manifest.check_files(components=[name])
            self._sessions[name] = _Timed(open_session(component, self.root, self.options), name, self.timings, self.calls)
            self.timings["load"] = self.timings.get("load", 0.0) + time.perf_counter() - start
        return self._sessions[name]

    def warmup(self, names: Sequence[str] = ("text_encoder", "unet", "vae_decoder")) -> None:
        for name in names:
            if name == "unet" and self.device_loop() is not None:
                continue  # the device loop holds its own U-Net session
            self.session(name)

    def device_loop(self):
        """The device-resident loop (runtime.device_loop) for this pipeline's U-Net, or None.

        Backend option ``device_loop``: "auto" (default: on the CUDA provider), "on" (any provider
        it supports, the CPU one included), "off"."""
        mode = str(self.options.extra.get("device_loop", self.manifest.runtime.device_loop)).lower()
        component = self.manifest.component("unet")
        if mode == "off" or component.backend != "onnxruntime":
            return None
        if self._device_loop is None:
            from runtime.backends.onnxruntime import resolve_providers
            from runtime.device_loop import DeviceLoop, DeviceLoopUnsupported

            if mode == "auto" and resolve_providers(self.options)[0] != "CUDAExecutionProvider":
                return None
            start = time.perf_counter()
            try:
                self._device_loop = DeviceLoop.open(component, self.root, self.options)
            except DeviceLoopUnsupported as e:
                self.loop_note = str(e)
                return None
            self.timings["load"] = self.timings.get("load", 0.0) + time.perf_counter() - start
        return self._device_loop

    def _device_loop_for(self, sched, timesteps, controls, mask):
        """The device loop when this run can use it, else None (and ``loop_note`` says why)."""
        from runtime.device_loop import PlanError

        self.loop_note = None
        if controls is not None:
            self.loop_note = "ControlNet runs use the numpy loop"
        elif mask is not None and not self.info.is_inpainting:
            self.loop_note = "mask blending for ordinary U-Nets uses the numpy loop"
        elif {s.name for s in self.manifest.component("unet").inputs} - {"sample", "timestep", "encoder_hidden_states"}:
            self.loop_note = "this U-Net takes inputs the device loop does not feed"
        loop = None if self.loop_note else self.device_loop()
        if loop is None:
            return None
        try:
            loop.plan(sched, timesteps)
        except PlanError as e:
            self.loop_note = f"numpy loop: {e}"
            return None
        return loop

    # -- pieces of the loop --------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(prompts))
        return self.session("text_encoder").run({"input_ids": ids})["last_hidden_state"].astype(F32, copy=False)

    def _encode_image(self, pixels: np.ndarray, rng) -> np.ndarray:
        """VAE encoder + sampling of the latent distribution with our RNG, times the scaling factor."""
        out = self.session("vae_encoder").run({"sample": pixels})
        mean, logvar = out["latent_mean"].astype(F32), out["latent_logvar"].astype(F32)
        std = np.exp(F32(0.5) * logvar)
        latents = mean + std * rng.randn(mean.shape)
        return (F32(self.info.vae_scaling_factor) * latents).astype(F32)

    def decode(self, latents: np.ndarray) -> list[Image.Image]:
        z = latents / F32(self.info.vae_scaling_factor)
        if self.info.vae_shift_factor is not None:
            z = z + F32(self.info.vae_shift_factor)
        sample = self.session("vae_decoder").run({"latent_sample": z.astype(F32)})["sample"]
        check_finite("vae_decoder", sample, self.manifest.component("vae_decoder").precision)
        return imgproc.decode_to_images(sample)

    def make_scheduler(self, name: str | None):
        if name is not None and name not in SCHEDULER_NAMES:
            raise PipelineInputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
        return scheduler_from_config(self.scheduler_config, name)

    # -- the loop ------------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], **kwargs):
        result = self.generate(prompt, **kwargs)
        return result.images[0] if isinstance(prompt, str) else result.images

    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int = 0,
        rng: str = "numpy",
        height: int | None = None,
        width: int | None = None,
        image: Image.Image | str | Path | None = None,
        strength: float | None = None,
        mask: Image.Image | str | Path | None = None,
        controls: Sequence[Control] = (),
        guess_mode: bool = False,
        callback: Callable[[int, float, np.ndarray], None] | None = None,
        progress: bool = False,
        return_latents: bool = False,
    ) -> Result:
        t_start = time.perf_counter()
        self.timings.clear()
        self.calls.clear()
        info = self.info
        recommended = info.recommended or {}
        steps = int(steps if steps is not None else recommended.get("steps", 50))
        guidance_scale = float(guidance_scale if guidance_scale is not None else recommended.get("guidance_scale", 7.5))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        if batch == 0:
            raise PipelineInputError("no prompt given")
        if negative_prompt is None:
            negatives = [""] * batch
        else:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != batch:
                raise PipelineInputError(f"{len(negatives)} negative prompts for {batch} prompts")
        if steps < 1:
            raise PipelineInputError(f"steps must be at least 1, got {steps}")
        if rng not in RNG_KINDS:
            raise PipelineInputError(f"unknown rng {rng!r}; choose one of {', '.join(RNG_KINDS)}")
        if mask is not None and image is None:
            raise PipelineInputError("a mask needs an input image (--image) to inpaint")
        if info.is_inpainting and (image is None or mask is None):
            raise PipelineInputError("this is an inpainting model: give an image and a mask")
        if strength is None:
            strength = 1.0 if mask is not None else 0.8
        if not 0.0 <= float(strength) <= 1.0:
            raise PipelineInputError(f"strength must be within [0, 1], got {strength}")

        init_image = imgproc.load_image(image, "input image") if image is not None else None
        mask_image = imgproc.load_image(mask, "mask") if mask is not None else None
        if mask_image is not None and mask_image.size != init_image.size:
            raise PipelineInputError(
                f"mask is {mask_image.width}x{mask_image.height} but the image is {init_image.width}x{init_image.height}"
            )
        f = info.vae_scale_factor
        if init_image is not None:
            height, width = imgproc.default_size(init_image, height, width, f)
        else:
            static_h, static_w = self.static_size()
            height = int(height or static_h or info.default_height)
            width = int(width or static_w or info.default_width)
        for label, value in (("height", height), ("width", width)):
            if value <= 0 or value % f:
                raise PipelineInputError(f"{label} {value} must be a positive multiple of {f}")
        self._check_static_shape(height, width, batch)

        do_cfg = guidance_scale > 1.0 and not info.time_cond_proj_dim
        noise_rng = make_rng(seed, rng)
        sched = self.make_scheduler(scheduler)

        # 1. text
        embeddings = self.encode_prompts(prompts)
        if do_cfg:
            embeddings = np.concatenate([self.encode_prompts(negatives), embeddings])

        # 2. timesteps (img2img and inpainting start part way, as diffusers' get_timesteps does)
        sched.set_timesteps(steps)
        timesteps = np.asarray(sched.timesteps)
        if init_image is not None:
            init_steps = min(int(steps * strength), steps)
            t_start_index = max(steps - init_steps, 0)
            timesteps = timesteps[t_start_index * sched.order:]
            sched.set_begin_index(t_start_index * sched.order)
            if len(timesteps) == 0 or steps - t_start_index < 1:
                raise PipelineInputError(
                    f"strength {strength} with {steps} steps leaves no denoising step; raise --strength or --steps"
                )

        # 3. latents
        latent_shape = (batch, info.latent_channels, height // f, width // f)
        # One image for the whole batch: encoded once (one noise draw), then repeated, as diffusers does.
        pixels = imgproc.to_model_input(init_image, height, width) if init_image is not None else None
        image_latents = noise = None
        full_strength = strength == 1.0
        if init_image is None:
            latents = noise_rng.randn(latent_shape) * F32(sched.init_noise_sigma)
        elif mask_image is None:  # img2img
            image_latents = np.repeat(self._encode_image(pixels, noise_rng), batch, axis=0)
            noise = noise_rng.randn(latent_shape)
            latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        else:  # inpainting: encode the image only when needed, as diffusers does
            if not info.is_inpainting or not full_strength:
                image_latents = np.repeat(self._encode_image(pixels, noise_rng), batch, axis=0)
            noise = noise_rng.randn(latent_shape)
            if full_strength:
                latents = noise * F32(sched.init_noise_sigma)
            else:
                latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        latents = latents.astype(F32)

        mask_latent = masked_latents = None
        if mask_image is not None:
            mask_full = imgproc.mask_to_array(mask_image, height, width)
            masked_pixels = pixels * (mask_full < 0.5)
            mask_latent = np.repeat(imgproc.nearest_downsample(mask_full, height // f, width // f), batch, axis=0)
            masked_latents = np.repeat(self._encode_image(masked_pixels.astype(F32), noise_rng), batch, axis=0)

        # 4. ControlNets
        control_state = self._prepare_controls(controls, height, width, batch, do_cfg, guess_mode, len(timesteps))

        # 5. denoise
        n_total = len(timesteps)
        loop = self._device_loop_for(sched, timesteps, control_state, mask_image)
        if loop is not None:
            extra = None
            if info.is_inpainting:
                extra = np.concatenate([mask_latent, masked_latents], axis=1)
                if do_cfg:
                    extra = np.concatenate([extra, extra])
            start = time.perf_counter()
            latents = loop.denoise(sched, timesteps, latents, embeddings, guidance_scale=guidance_scale, rng=noise_rng,
                                   cfg=self.cfg if do_cfg else "off", extra=extra, callback=callback)
            self.timings["unet"] = self.timings.get("unet", 0.0) + time.perf_counter() - start
            self.calls["unet"] = n_total * (2 if do_cfg and self.cfg == "sequential" else 1)
            timesteps = timesteps[:0]  # the numpy loop below has nothing left to do
        iterator = enumerate(timesteps)
        if progress and loop is None:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=n_total, desc="denoise", unit="step")
        for i, t in iterator:
            model_input = np.concatenate([latents, latents]) if do_cfg else latents
            model_input = sched.scale_model_input(model_input, t).astype(F32, copy=False)
            unet_input = model_input
            if info.is_inpainting:
                extra = [mask_latent, masked_latents]
                if do_cfg:
                    extra = [np.concatenate([e, e]) for e in extra]
                unet_input = np.concatenate([model_input, *extra], axis=1)
            residuals = self._control_residuals(control_state, i, t, latents, model_input, embeddings, sched, do_cfg)
            noise_pred = self._unet(unet_input, t, embeddings, residuals, do_cfg)
            if do_cfg:
                uncond, text = np.split(noise_pred, 2)
                noise_pred = uncond + F32(guidance_scale) * (text - uncond)
            latents = np.asarray(sched.step(noise_pred, t, latents, rng=noise_rng), dtype=F32)
            if mask_image is not None and not info.is_inpainting:
                # ordinary U-Net: keep the unmasked area on the noised original's trajectory
                proper = image_latents
                if i < n_total - 1:
                    proper = sched.add_noise(image_latents, noise, np.asarray([timesteps[i + 1]]))
                latents = ((1 - mask_latent) * proper + mask_latent * latents).astype(F32)
            if callback is not None:
                callback(i, float(t), latents)

        # 6. decode
        check_finite("unet", latents, self.manifest.component("unet").precision)
        images = self.decode(latents)
        self.timings["total"] = time.perf_counter() - t_start
        settings = {
            "prompt": prompts[0] if batch == 1 else prompts,
            "negative_prompt": negatives[0] if batch == 1 else negatives,
            "seed": seed,
            "rng": rng,
            "scheduler": scheduler or self.scheduler_config.get("_class_name"),
            "steps": steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "strength": strength if init_image is not None else None,
            "controls": [dataclasses.asdict(c) | {"image": str(c.image) if not isinstance(c.image, Image.Image) else "<image>"} for c in controls] or None,
            "guess_mode": guess_mode or None,
            "model_hash": self.manifest.exporter.get("artifact_hash"),
            "cfg": self.cfg if do_cfg else "off",
            "loop": "device" if loop is not None else "numpy",
        }
        return Result(images, latents if return_latents else None, seed, settings, dict(self.timings), dict(self.calls))

    def static_size(self) -> tuple[int | None, int | None]:
        """Pixel height and width fixed by a static export, else (None, None)."""
        h, w = self.manifest.component("unet").inputs[0].shape[2:4]
        f = self.info.vae_scale_factor
        return (h * f, w * f) if isinstance(h, int) and isinstance(w, int) else (None, None)

    def _check_static_shape(self, height: int, width: int, batch: int) -> None:
        unet = self.manifest.component("unet")
        sample = unet.inputs[0]
        f = self.info.vae_scale_factor
        h, w = sample.shape[2], sample.shape[3]
        if isinstance(h, int) and (h * f, w * f) != (height, width):
            raise PipelineInputError(f"this export has static shapes {h * f}x{w * f}; asked for {height}x{width}")
        static = self.manifest.runtime.static_shape.batch if self.manifest.runtime.static_shape else None
        if static and static != batch:
            raise PipelineInputError(f"this export has a static batch of {static} prompt(s); asked for {batch}")

    def _unet(self, sample, t, embeddings, residuals, do_cfg) -> np.ndarray:
        name = "unet_control" if residuals is not None else "unet"
        session = self.session(name)

        def call(x, e, res):
            feeds = {"sample": x, "timestep": np.full((x.shape[0],), t, dtype=F32), "encoder_hidden_states": e}
            if res is not None:
                feeds.update(res)
            return session.run(feeds)["out_sample"].astype(F32, copy=False)

        if do_cfg and self.cfg == "sequential":
            half = sample.shape[0] // 2
            parts = []
            for sl in (slice(0, half), slice(half, None)):
                res = {k: v[sl] for k, v in residuals.items()} if residuals is not None else None
                parts.append(call(sample[sl], embeddings[sl], res))
            return np.concatenate(parts)
        return call(sample, embeddings, residuals)

    # -- ControlNet ----------------------------------------------------------------------------

    def _prepare_controls(self, controls, height, width, batch, do_cfg, guess_mode, n_steps):
        if not controls:
            return None
        available = self.manifest.controlnets()
        if not available:
            raise PipelineInputError("control requested, but this export has no ControlNet (export it with --controlnet)")
        names = [s.name for s in self.manifest.component("unet_control").inputs if "additional_residual" in s.name]
        state = []
        for c in controls:
            if c.name not in available:
                raise PipelineInputError(f"unknown ControlNet {c.name!r}; this export has: {', '.join(sorted(available))}")
            if not (0.0 <= c.start <= c.end <= 1.0):
                raise PipelineInputError(f"control {c.name}: need 0 <= start <= end <= 1, got {c.start}..{c.end}")
            cond = imgproc.control_to_array(imgproc.load_image(c.image, f"control image for {c.name}"), height, width)
            cond = np.repeat(cond, batch, axis=0)
            if do_cfg and not guess_mode:
                cond = np.concatenate([cond, cond])
            keep = [1.0 - float(i / n_steps < c.start or (i + 1) / n_steps > c.end) for i in range(n_steps)]
            state.append((c, cond, keep))
        return {"nets": state, "residual_names": names, "guess_mode": guess_mode}

    def _control_residuals(self, state, i, t, latents, model_input, embeddings, sched, do_cfg):
        if state is None:
            return None
        guess = state["guess_mode"] and do_cfg
        if guess:
            # only the conditional branch sees the control; the unconditional half gets zeros
            control_input = sched.scale_model_input(latents, t).astype(F32, copy=False)
            control_embeddings = embeddings[embeddings.shape[0] // 2:]
        else:
            control_input, control_embeddings = model_input, embeddings
        total = None
        n = control_input.shape[0]
        scales_guess = self.manifest.runtime.guess_mode_scales or None
        for control, cond, keep in state["nets"]:
            scale = F32(control.scale * keep[i])
            component = self.manifest.component(f"controlnet/{control.name}")
            if scale == 0:
                continue  # outside its start/end window a ControlNet adds exact zeros: skip the call
            n_res = component.input("conditioning_scale").shape[0]
            if state["guess_mode"]:
                per_residual = np.asarray(scales_guess, F32) * scale
            else:
                per_residual = np.full((n_res,), scale, F32)
            batched = {"sample": control_input, "timestep": np.full((n,), t, dtype=F32),
                       "encoder_hidden_states": control_embeddings, "controlnet_cond": cond}
            # Sequential CFG: the ControlNet, like the U-Net, sees one branch per call.
            halves = [slice(0, n // 2), slice(n // 2, n)] if self.cfg == "sequential" and do_cfg and not guess else [slice(0, n)]
            session = self.session(f"controlnet/{control.name}")
            parts = [session.run({**{k: v[sl] for k, v in batched.items()}, "conditioning_scale": per_residual})
                     for sl in halves]
            values = [np.concatenate([p[o.name] for p in parts]).astype(F32, copy=False) for o in component.outputs]
            total = values if total is None else [a + b for a, b in zip(total, values)]
        if total is None:
            return None  # no ControlNet active at this step: the plain U-Net gives the same result
        if guess:
            total = [np.concatenate([np.zeros_like(r), r]) for r in total]
        return dict(zip(state["residual_names"], total))
