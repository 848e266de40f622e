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

from runtime import depth as depthproc
from runtime import image as imgproc
from runtime.backends import SessionOptions, open_session
from runtime.manifest import Manifest, ManifestError
from runtime.numerics import check_finite
from runtime.prompts import PromptOptions, PromptSyntaxError, chunk_batch, chunk_prompt, encode_chunks
from runtime.resources import check_request
from runtime.rng import RNG_KINDS, make_rng
from runtime.schedulers import SCHEDULER_NAMES, scheduler_from_config, scheduler_from_file
from runtime import sdxl
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
    loop_reason: str | None = None  # why settings["loop"] is the device or the numpy loop

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def overhead_seconds(self) -> float:
        """Time not spent inside a model or loading one: tokenizer, scheduler, CFG arithmetic, image conversion."""
        return self.timings["total"] - sum(v for k, v in self.timings.items() if k != "total")


@dataclasses.dataclass
class _Run:
    """One generate call's arguments, checked and with their defaults filled in."""

    prompts: list[str]
    negatives: list[str]
    steps: int
    guidance_scale: float
    strength: float
    height: int
    width: int
    init_image: Image.Image | None
    mask_image: Image.Image | None
    do_cfg: bool
    emphasis: bool = False  # A1111's (x:1.3) [x] BREAK syntax read (runtime.prompts)
    prompt_chunks: int = 1  # 75-token chunks each prompt and negative prompt is encoded as
    xl: sdxl.XLRequest | None = None  # SDXL exports: their extra arguments
    added_cond: dict[str, np.ndarray] | None = None  # SDXL: the U-Net's text_embeds and time_ids

    @property
    def batch(self) -> int:
        return len(self.prompts)


@dataclasses.dataclass
class _Latents:
    """The initial latents, and what img2img and inpainting keep of the input image."""

    latents: np.ndarray
    image_latents: np.ndarray | None = None  # the encoded input image (batch-repeated)
    noise: np.ndarray | None = None  # the noise added to it, to re-noise the kept area at each step
    mask: np.ndarray | None = None  # [B, 1, h, w], 1 where to paint
    masked_image: np.ndarray | None = None  # the encoded input image with the area to paint blanked
    depth: np.ndarray | None = None  # depth-to-image: [B, 1, h, w] in [-1, 1], the U-Net's fifth channel


def _prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch = len(prompts)
    if batch == 0:
        raise PipelineInputError("no prompt given")
    if negative_prompt is None:
        return prompts, [""] * batch
    negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != batch:
        raise PipelineInputError(f"{len(negatives)} negative prompts for {batch} prompts")
    return prompts, negatives


def _control_setting(control: Control) -> dict[str, Any]:
    image = str(control.image) if not isinstance(control.image, Image.Image) else "<image>"
    return dataclasses.asdict(control) | {"image": image}


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

    ``generate`` runs the stages of diffusers' ``__call__``, each a method: ``check_inputs``,
    ``text_embeddings``, ``prepare_timesteps``, ``prepare_latents``, ``choose_loop`` (the device or
    the numpy loop, and why), ``denoise``, ``decode``.
    """

    def __init__(self, manifest: Manifest, options: SessionOptions | Mapping[str, Any] | None = None,
                 cfg: str | None = None, loras: Sequence = ()):
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
        self.sdxl = sdxl.Conditioner(manifest, self.session) if self.info.is_sdxl else None
        self._sessions: dict[str, Any] = {}
        self._device_loop: Any = None  # runtime.device_loop.DeviceLoop, opened where it applies
        self.timings: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.loras: tuple = ()  # (path, scale) pairs applied to the weights (set_loras)
        self._lora_patches: dict[str, Any] = {}
        if loras:
            self.set_loras(loras)

    @classmethod
    def from_dir(cls, directory: str | Path, options: SessionOptions | Mapping[str, Any] | None = None,
                 cfg: str | None = None, loras: Sequence = ()) -> "Pipeline":
        return cls(Manifest.load(directory), options, cfg, loras)

    def set_loras(self, loras: Sequence = ()) -> set[str]:
        """Apply LoRAs (``FILE[:SCALE]`` strings or (file, scale) pairs; none: the base model) from the
        next call on. Only the sessions whose weights change are closed (re-created, patched, on next
        use); returns their names. A LoRA that does not fit fails here, before anything changes."""
        from runtime.lora.resolve import LoraError, LoraSpec, changed, plan_patches

        try:
            specs = [LoraSpec.parse(s) for s in loras]
            patches = plan_patches(self.manifest, specs)
        except LoraError as e:
            raise PipelineInputError(str(e)) from None
        stale = changed(self._lora_patches, patches)
        for name in stale:
            self._sessions.pop(name, None)
            if self.manifest.components[name].role == "unet":
                self._device_loop = None
        self._lora_patches = patches
        self.loras = tuple((str(s.path), s.scale) for s in specs)
        return stale

    # -- sessions ------------------------------------------------------------------------------

    def session(self, name: str):
        """Open a component on first use (an img2img-free run never loads the VAE encoder)."""
        if name not in self._sessions:
            start = time.perf_counter()
            component = self.manifest.component(name)
            self.manifest.check_files(components=[name])
            patch = self._lora_patches.get(name)
            session = open_session(component, self.root, self.options, lora=patch.weights if patch else None)
            self._sessions[name] = _Timed(session, name, self.timings, self.calls)
            self.timings["load"] = self.timings.get("load", 0.0) + time.perf_counter() - start
        return self._sessions[name]

    def warmup(self, names: Sequence[str] = ("text_encoder", "unet", "vae_decoder")) -> None:
        if self.info.is_sdxl:  # both text encoders (a refiner has only the second)
            names = [n for n in names if n != "text_encoder" or self.sdxl.first] + ["text_encoder_2"] * ("text_encoder" in names)
        for name in names:
            if name == "unet" and self.device_loop() is not None:
                continue  # the device loop holds its own U-Net session
            self.session(name)

    def device_loop(self):
        """The device-resident loop (runtime.device_loop) for this pipeline's U-Net, or None.

        Backend option ``device_loop``: "auto" (default: on the CUDA provider), "on" (any provider
        it supports, the CPU one included), "off"."""
        return self._open_device_loop()[0]

    def _device_loop_mode(self) -> str:
        return str(self.options.extra.get("device_loop", self.manifest.runtime.device_loop)).lower()

    def _open_device_loop(self):
        """(the device loop, None), or (None, why it does not apply to this pipeline)."""
        mode = self._device_loop_mode()
        component = self.manifest.component("unet")
        if mode == "off":
            return None, "device_loop is off"
        if "unet" in self._lora_patches:
            return None, "run-time LoRAs on the U-Net use the numpy loop"
        if component.backend != "onnxruntime":
            return None, f"the device loop runs ONNX Runtime U-Nets, this one is {component.backend}"
        if self._device_loop is None:
            from runtime.backends.onnxruntime import resolve_providers
            from runtime.device_loop import DeviceLoop, DeviceLoopUnsupported

            if mode == "auto" and resolve_providers(self.options)[0] != "CUDAExecutionProvider":
                return None, "device_loop auto uses the device loop on the CUDA provider only"
            start = time.perf_counter()
            try:
                self._device_loop = DeviceLoop.open(component, self.root, self.options)
            except DeviceLoopUnsupported as e:
                return None, str(e)
            self.timings["load"] = self.timings.get("load", 0.0) + time.perf_counter() - start
        return self._device_loop, None

    def choose_loop(self, sched, timesteps, controls, mask) -> tuple[Any, str]:
        """(the device loop, why) when this run can use it, else (None, why the numpy loop runs)."""
        from runtime.device_loop import PlanError

        if controls is not None:
            return None, "ControlNet runs use the numpy loop"
        if mask is not None and not self.info.is_inpainting:
            return None, "mask blending for ordinary U-Nets uses the numpy loop"
        fed = {"sample", "timestep", "encoder_hidden_states"} | ({"text_embeds", "time_ids"} if self.info.is_sdxl else set())
        if {s.name for s in self.manifest.component("unet").inputs} - fed:
            return None, "this U-Net takes inputs the device loop does not feed"
        loop, reason = self._open_device_loop()
        if loop is None:
            return None, reason
        try:
            loop.plan(sched, timesteps)
        except PlanError as e:
            return None, f"numpy loop: {e}"
        return loop, "the scheduler's step is linear: the device loop runs it"

    # -- pieces of the loop --------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str], emphasis: bool = False, chunks: int | None = None) -> np.ndarray:
        """Hidden states [B, 77 * chunks, D]; ``chunks`` (default: as many as the longest prompt needs)
        pads shorter prompts with empty chunks. One chunk is the tokenizer's window, as diffusers encodes it."""
        options = PromptOptions(emphasis=emphasis)
        chunks = chunks or self.prompt_chunk_count(prompts, emphasis)
        try:
            batch = chunk_batch(self.tokenizer, list(prompts), options, chunks)
        except PromptSyntaxError as e:
            raise PipelineInputError(str(e)) from None
        return encode_chunks(self._encode_ids, batch, emphasis)

    def _encode_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.session("text_encoder").run({"input_ids": ids})["last_hidden_state"].astype(F32, copy=False)

    def prompt_chunk_count(self, texts: Sequence[str], emphasis: bool = False) -> int:
        """The 75-token chunks these prompts are encoded as: the longest one's, or the fixed count of a
        static export (fails, naming the export to make, when a prompt needs more than it takes)."""
        try:
            needed = max(len(chunk_prompt(self.tokenizer, t, PromptOptions(emphasis=emphasis))) for t in texts)
        except PromptSyntaxError as e:
            raise PipelineInputError(str(e)) from None
        fixed = self.fixed_prompt_chunks()
        if fixed is not None and needed > fixed:
            raise PipelineInputError(
                f"the prompt needs {needed} chunks of 75 tokens, this export's U-Net takes {fixed} "
                f"({fixed * self.info.max_length} positions): re-export it with dynamic shapes, or with --prompt-chunks {needed}")
        return fixed or needed

    def fixed_prompt_chunks(self) -> int | None:
        """Chunks the U-Net (and ControlNets) take when their sequence axis is fixed (77 in exports made
        before long prompts, 77 * --prompt-chunks in static ones), else None."""
        fixed = []
        for component in self.manifest.components.values():
            spec = next((s for s in component.inputs if s.name == "encoder_hidden_states"), None)
            if spec is not None and isinstance(spec.shape[1], int):
                fixed.append(max(spec.shape[1] // self.info.max_length, 1))
        return min(fixed) if fixed else None

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
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        generator=None,
        decode: bool = True,
            noise_level: int | None = None,
        tiling: Any = None,
        depth_map: Image.Image | str | Path | None = None,
        emphasis: bool = False,
    ) -> Result:
        """SDXL: ``denoising_end`` stops the base part way (``decode=False`` keeps its latents, as
        diffusers' ``output_type="latent"``); a refiner takes them as ``image`` (an ndarray) with
        ``denoising_start``. ``generator``: an rng from :func:`runtime.rng.make_rng` to continue
        (one generator through base and refiner, as diffusers users pass one)."""
        if self.info.family == "upscaler":  # its own loop: runtime.upscale
            if any(v is not None for v in (height, width, strength, mask, depth_map)) or controls:
                raise PipelineInputError("an x4 upscaler export takes --image (output 4x its size) and --noise-level; "
                                         "--height, --width, --strength, --mask and --control do not apply")
            return self._upscale(prompt, negative_prompt, return_latents, image=image, noise_level=noise_level,
                                 steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, rng=rng,
                                 tiling=tiling, callback=callback, progress=progress)
        if noise_level is not None or tiling is not None:
            raise PipelineInputError("--noise-level and tiling apply to x4 upscaler exports only")
        t_start = time.perf_counter()
        self.timings.clear()
        self.calls.clear()
        xl = sdxl.XLRequest(denoising_start, denoising_end, aesthetic_score, negative_aesthetic_score,
                            image if isinstance(image, np.ndarray) else None, negative_prompt is None)
        image, height, width, strength, guidance_scale = self._sdxl_defaults(xl, image, mask, height, width, strength,
                                                                             guidance_scale)
        run = self.check_inputs(prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, rng=rng,
                                height=height, width=width, image=image, strength=strength, mask=mask,
                                emphasis=emphasis)
        run.xl = xl if self.info.is_sdxl else None
        given_depth = self._depth_input(run, depth_map)  # checked before any model runs
        noise_rng = generator if generator is not None else make_rng(seed, rng)
        sched = self.make_scheduler(scheduler)
        embeddings = self.text_embeddings(run)
        timesteps = self.prepare_timesteps(sched, run)
        state = self.prepare_latents(run, sched, timesteps, noise_rng)
        state.depth = self.prepare_depth(run, given_depth)
        control_state = self._prepare_controls(controls, run.height, run.width, run.batch, run.do_cfg, guess_mode,
                                               len(timesteps))
        loop, loop_reason = self.choose_loop(sched, timesteps, control_state, run.mask_image)
        latents = self.denoise(loop, run, sched, timesteps, state, embeddings, control_state, noise_rng,
                               callback=callback, progress=progress)
        if loop is not None:  # the CUDA graph's fate (on, or off and why) belongs with the loop's reason
            loop_reason = f"{loop_reason}; CUDA graph {loop.cuda_graph_status}"
        check_finite("unet", latents, self.manifest.component("unet").precision)
        images = self.decode(latents) if decode else []
        return_latents = return_latents or not decode
        self.timings["total"] = time.perf_counter() - t_start
        settings = self._settings(run, seed=seed, rng=rng, scheduler=scheduler, controls=controls,
                                  guess_mode=guess_mode, loop="device" if loop is not None else "numpy")
        return Result(images, latents if return_latents else None, seed, settings, dict(self.timings),
                      dict(self.calls), loop_reason)

    def _upscale(self, prompt, negative_prompt, return_latents: bool, **kwargs) -> Result:
        """An x4 upscaler export's run (runtime.upscale), as a Result."""
        from runtime.upscale import UpscaleInputError, upscale

        t_start = time.perf_counter()
        self.timings.clear()
        self.calls.clear()
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        try:
            out = upscale(self, prompts, negatives, **kwargs)
        except UpscaleInputError as e:
            raise PipelineInputError(str(e)) from None
        self.timings["total"] = time.perf_counter() - t_start
        return Result(out.images, out.latents if return_latents else None, kwargs["seed"], out.settings,
                      dict(self.timings), dict(self.calls), "the upscaler runs the numpy loop")

    # -- 1. inputs ------------------------------------------------------------------------------

    def _sdxl_defaults(self, xl: sdxl.XLRequest, image, mask, height, width, strength, guidance_scale):
        """SDXL's own arguments checked (and refused on other families), and diffusers' SDXL defaults:
        guidance 5.0 and strength 0.3, inpainting 7.5 and 0.9999; base latents set the output size."""
        sdxl.check_request(self.manifest, xl, has_image=image is not None and xl.latents is None, has_mask=mask is not None,
                           error=PipelineInputError)
        if xl.latents is not None:
            f = self.info.vae_scale_factor
            image, height, width = None, xl.latents.shape[2] * f, xl.latents.shape[3] * f
        if self.info.is_sdxl:
            strength = (0.9999 if mask is not None else 0.3) if strength is None else strength
            if guidance_scale is None and "guidance_scale" not in (self.info.recommended or {}):
                guidance_scale = 7.5 if mask is not None else 5.0
        return image, height, width, strength, guidance_scale

    def check_inputs(self, prompt, negative_prompt, *, steps, guidance_scale, rng, height, width, image, strength,
                     mask, emphasis: bool = False) -> _Run:
        """Every argument checked, and the defaults filled in, before any model runs."""
        recommended = self.info.recommended or {}
        steps = int(steps if steps is not None else recommended.get("steps", 50))
        guidance_scale = float(guidance_scale if guidance_scale is not None else recommended.get("guidance_scale", 7.5))
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        if not np.isfinite(guidance_scale):
            raise PipelineInputError(f"guidance scale {guidance_scale} is not a finite number")
        if steps < 1:
            raise PipelineInputError(f"steps must be at least 1, got {steps}")
        if rng not in RNG_KINDS:
            raise PipelineInputError(f"unknown rng {rng!r}; choose one of {', '.join(RNG_KINDS)}")
        if mask is not None and image is None:
            raise PipelineInputError("a mask needs an input image (--image) to inpaint")
        if self.info.is_inpainting and (image is None or mask is None):
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
        height, width = self._output_size(init_image, height, width)
        self._check_static_shape(height, width, len(prompts))
        do_cfg = guidance_scale > 1.0 and not self.info.time_cond_proj_dim
        check_request(self.info, height, width, len(prompts), steps, do_cfg, PipelineInputError)  # before any model runs
        # SDXL: one 77-token window per encoder, as diffusers' SDXL pipelines truncate
        chunks = 1 if self.info.is_sdxl else self.prompt_chunk_count(prompts + negatives if do_cfg else prompts, emphasis)
        return _Run(prompts, negatives, steps, guidance_scale, strength, height, width, init_image, mask_image, do_cfg,
                    bool(emphasis), chunks)

    def _output_size(self, init_image, height, width) -> tuple[int, int]:
        f = self.info.vae_scale_factor
        if init_image is not None:
            height, width = imgproc.default_size(init_image, height, width, f)
        else:
            static_h, static_w = self.static_size()
            height = int(height if height is not None else static_h or self.info.default_height)
            width = int(width if width is not None else static_w or self.info.default_width)
        for label, value in (("height", height), ("width", width)):
            if value <= 0 or value % f:
                raise PipelineInputError(f"{label} {value} must be a positive multiple of {f}")
        return height, width

    def text_embeddings(self, run: _Run) -> np.ndarray:
        """The prompts' embeddings, after the negative prompts' when classifier-free guidance is on."""
        if run.xl is not None:  # SDXL: two encoders, and the U-Net's added conditioning (one 77-token window)
            if run.emphasis:
                raise PipelineInputError("prompt emphasis (--emphasis) is not supported for SDXL exports yet")
            embeddings, run.added_cond = self.sdxl.conditioning(run.prompts, run.negatives, run.height, run.width,
                                                                run.do_cfg, run.xl)
            return embeddings
        embeddings = self.encode_prompts(run.prompts, run.emphasis, run.prompt_chunks)
        if run.do_cfg:
            embeddings = np.concatenate([self.encode_prompts(run.negatives, run.emphasis, run.prompt_chunks), embeddings])
        return embeddings

    # -- 2. timesteps ---------------------------------------------------------------------------

    def prepare_timesteps(self, sched, run: _Run) -> np.ndarray:
        """The run's timesteps; img2img and inpainting start part way, as diffusers' get_timesteps does."""
        try:
            sched.set_timesteps(run.steps)
            sched.check_step_count(run.steps)
        except ValueError as e:  # a count the schedule cannot give: refused before the loop, not after it
            raise PipelineInputError(f"{type(sched).__name__}: {e}") from None
        timesteps = np.asarray(sched.timesteps)
        if run.xl is not None and run.xl.denoising_start is not None:
            return self._cut_at_end(sched, sdxl.start_at(sched, run.xl.denoising_start), run)
        if run.init_image is None and (run.xl is None or run.xl.latents is None):
            return self._cut_at_end(sched, timesteps, run)
        steps = run.steps
        init_steps = min(int(steps * run.strength), steps)
        t_start_index = max(steps - init_steps, 0)
        timesteps = timesteps[t_start_index * sched.order:]
        sched.set_begin_index(t_start_index * sched.order)
        if len(timesteps) == 0 or steps - t_start_index < 1:
            raise PipelineInputError(
                f"strength {run.strength} with {steps} steps leaves no denoising step; raise --strength or --steps"
            )
        return self._cut_at_end(sched, timesteps, run)

    @staticmethod
    def _cut_at_end(sched, timesteps, run: _Run) -> np.ndarray:
        """SDXL's ``denoising_end`` (the base hands over to the refiner there); others unchanged."""
        if run.xl is None:
            return timesteps
        timesteps = sdxl.cut_at_end(sched, timesteps, run.xl.denoising_end)
        if len(timesteps) == 0:
            raise PipelineInputError(f"this --denoising-start/--denoising-end with {run.steps} steps leaves no "
                                     f"denoising step; raise --steps")
        return timesteps

    # -- 3. latents -----------------------------------------------------------------------------

    def prepare_latents(self, run: _Run, sched, timesteps: np.ndarray, rng) -> _Latents:
        """The initial latents of txt2img, img2img or inpainting (random draws in diffusers' order)."""
        f = self.info.vae_scale_factor
        shape = (run.batch, self.info.latent_channels, run.height // f, run.width // f)
        if run.xl is not None and (run.xl.latents is not None or run.xl.denoising_start is not None):
            return self._handed_over_latents(run, sched, timesteps, rng)
        if run.init_image is None:
            return _Latents((rng.randn(shape) * F32(sched.init_noise_sigma)).astype(F32))
        pixels = imgproc.to_model_input(run.init_image, run.height, run.width)
        if run.mask_image is None:
            image_latents = self._encode_batch(pixels, rng, run.batch)
            noise = rng.randn(shape)
            latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(run.batch))
            return _Latents(latents.astype(F32), image_latents, noise)
        return self._inpainting_latents(run, pixels, shape, sched, timesteps, rng)

    def _handed_over_latents(self, run: _Run, sched, timesteps, rng) -> _Latents:
        """SDXL img2img from the base's latents or with ``denoising_start``: no noise added at a
        denoising_start (the base's latents are already noisy), as StableDiffusionXLImg2ImgPipeline."""
        if run.xl.latents is not None:
            image_latents = run.xl.latents.astype(F32)
            if run.batch > len(image_latents) and run.batch % len(image_latents) == 0:
                image_latents = np.concatenate([image_latents] * (run.batch // len(image_latents)))
            elif run.batch != len(image_latents):
                raise PipelineInputError(f"{len(image_latents)} base latents for {run.batch} prompts")
        else:
            pixels = imgproc.to_model_input(run.init_image, run.height, run.width)
            image_latents = self._encode_batch(pixels, rng, run.batch)
        if run.xl.denoising_start is not None:
            return _Latents(image_latents, image_latents)
        noise = rng.randn(image_latents.shape)
        latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(run.batch))
        return _Latents(latents.astype(F32), image_latents, noise)

    def _inpainting_latents(self, run: _Run, pixels, shape, sched, timesteps, rng) -> _Latents:
        full_strength = run.strength == 1.0
        image_latents = None
        if not self.info.is_inpainting or not full_strength:  # encoded only when needed, as diffusers does
            image_latents = self._encode_batch(pixels, rng, run.batch)
        noise = rng.randn(shape)
        if full_strength:
            latents = noise * F32(sched.init_noise_sigma)
        else:
            latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(run.batch))
        f = self.info.vae_scale_factor
        mask_full = imgproc.mask_to_array(run.mask_image, run.height, run.width)
        mask = np.repeat(imgproc.nearest_downsample(mask_full, run.height // f, run.width // f), run.batch, axis=0)
        masked_image = self._encode_batch((pixels * (mask_full < 0.5)).astype(F32), rng, run.batch)
        return _Latents(latents.astype(F32), image_latents, noise, mask, masked_image)

    def _encode_batch(self, pixels: np.ndarray, rng, batch: int) -> np.ndarray:
        # One image for the whole batch: encoded once (one noise draw), then repeated, as diffusers does.
        return np.repeat(self._encode_image(pixels, rng), batch, axis=0)

    # -- 4. denoise -----------------------------------------------------------------------------

    def denoise(self, loop, run: _Run, sched, timesteps, state: _Latents, embeddings, controls, rng, *,
                callback=None, progress: bool = False) -> np.ndarray:
        """The final latents, from ``loop`` (see :meth:`choose_loop`) or, when it is None, the numpy loop."""
        if loop is not None:
            return self._denoise_on_device(loop, run, sched, timesteps, state, embeddings, rng, callback)
        latents = state.latents
        iterator = enumerate(timesteps)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(timesteps), desc="denoise", unit="step")
        for i, t in iterator:
            noise_pred = self._predict_noise(run, sched, i, t, latents, state, embeddings, controls)
            latents = np.asarray(sched.step(noise_pred, t, latents, rng=rng), dtype=F32)
            if run.mask_image is not None and not self.info.is_inpainting:
                latents = self._keep_unmasked(sched, timesteps, i, latents, state)
            if callback is not None:
                callback(i, float(t), latents)
        return latents

    def _denoise_on_device(self, loop, run: _Run, sched, timesteps, state: _Latents, embeddings, rng, callback):
        extra = None
        if self.info.is_inpainting:
            extra = np.concatenate([state.mask, state.masked_image], axis=1)
            if run.do_cfg:
                extra = np.concatenate([extra, extra])
        elif state.depth is not None:
            extra = np.concatenate([state.depth, state.depth]) if run.do_cfg else state.depth
        start = time.perf_counter()
        latents = loop.denoise(sched, timesteps, state.latents, embeddings, guidance_scale=run.guidance_scale,
                               rng=rng, cfg=self.cfg if run.do_cfg else "off", extra=extra, callback=callback,
                               added=run.added_cond)
        self.timings["unet"] = self.timings.get("unet", 0.0) + time.perf_counter() - start
        self.calls["unet"] = len(timesteps) * (2 if run.do_cfg and self.cfg == "sequential" else 1)
        return latents

    def _predict_noise(self, run: _Run, sched, i, t, latents, state: _Latents, embeddings, controls) -> np.ndarray:
        """The U-Net's output at step ``i``, classifier-free guidance applied."""
        model_input = np.concatenate([latents, latents]) if run.do_cfg else latents
        model_input = sched.scale_model_input(model_input, t).astype(F32, copy=False)
        unet_input = model_input
        if self.info.is_inpainting:
            extra = [state.mask, state.masked_image]
            if run.do_cfg:
                extra = [np.concatenate([e, e]) for e in extra]
            unet_input = np.concatenate([model_input, *extra], axis=1)
        elif state.depth is not None:
            depth = np.concatenate([state.depth, state.depth]) if run.do_cfg else state.depth
            unet_input = np.concatenate([model_input, depth], axis=1)
        residuals = self._control_residuals(controls, i, t, latents, model_input, embeddings, sched, run.do_cfg,
                                            run.added_cond)
        noise_pred = self._unet(unet_input, t, embeddings, residuals, run.do_cfg, run.added_cond)
        if run.do_cfg:
            uncond, text = np.split(noise_pred, 2)
            noise_pred = uncond + F32(run.guidance_scale) * (text - uncond)
        return noise_pred

    @staticmethod
    def _keep_unmasked(sched, timesteps, i, latents, state: _Latents) -> np.ndarray:
        """Inpainting with an ordinary U-Net: the unmasked area stays on the noised original's trajectory."""
        proper = state.image_latents
        if i < len(timesteps) - 1:
            proper = sched.add_noise(state.image_latents, state.noise, np.asarray([timesteps[i + 1]]))
        return ((1 - state.mask) * proper + state.mask * latents).astype(F32)

    # -- depth -----------------------------------------------------------------------------------

    @property
    def is_depth(self) -> bool:
        """A depth-to-image U-Net: latents plus one depth channel."""
        return self.info.unet_in_channels == self.info.latent_channels + 1

    def _depth_input(self, run: _Run, depth_map) -> np.ndarray | None:
        """The user's depth map [1, H, W] (or None: estimated), checked before any model runs."""
        if not self.is_depth:
            if depth_map is not None:
                raise PipelineInputError(f"a depth map is for depth-to-image models; this export is {self.info.family}")
            return None
        if run.init_image is None:
            raise PipelineInputError("this is a depth-to-image model: give an input image (--image)")
        if depth_map is None:
            if "depth_estimator" not in self.manifest.components:
                raise PipelineInputError("this export has no depth estimator: give a depth map (--depth-map)")
            return None
        image = imgproc.load_image(depth_map, "depth map")
        try:
            return depthproc.depth_map_array(image, run.init_image.height, run.init_image.width)
        except depthproc.DepthInputError as e:
            raise PipelineInputError(str(e)) from None

    def prepare_depth(self, run: _Run, given: np.ndarray | None) -> np.ndarray | None:
        """diffusers' prepare_depth_map: the depth (given, else estimated) at latent size in [-1, 1]."""
        if not self.is_depth:
            return None
        depth = given if given is not None else self.estimate_depth(run.init_image)
        f = self.info.vae_scale_factor
        try:
            condition = depthproc.depth_condition(depth, run.height // f, run.width // f,
                                                  "depth map" if given is not None else "estimated depth")
        except depthproc.DepthInputError as e:
            raise PipelineInputError(str(e)) from None
        return np.repeat(condition, run.batch, axis=0)

    def estimate_depth(self, image: Image.Image) -> np.ndarray:
        """The exported depth estimator on an image, preprocessed as its DPTImageProcessor: [1, H', W']."""
        component = self.manifest.component("depth_estimator")
        try:
            config = depthproc.processor_config(component.details)
        except (depthproc.DepthInputError, TypeError) as e:
            raise ManifestError(f"depth_estimator: {e}") from None
        pixels = depthproc.dpt_pixel_values(image, config)
        depth = self.session("depth_estimator").run({"pixel_values": pixels})["predicted_depth"]
        check_finite("depth_estimator", depth, component.precision)
        return np.asarray(depth, F32)

    def depth_control_image(self, image: Image.Image | str | Path) -> Image.Image:
        """A photo -> the control image of a depth ControlNet (runtime.depth.depth_control_image), same size."""
        if "depth_estimator" not in self.manifest.components:
            raise PipelineInputError("--preprocess depth needs a depth estimator in the export "
                                     "(sdexport export ... --depth-estimator DIR)")
        image = imgproc.load_image(image, "control image")
        try:
            return depthproc.depth_control_image(self.estimate_depth(image)[0], image.height, image.width)
        except depthproc.DepthInputError as e:
            raise PipelineInputError(str(e)) from None

    # -- 5. what the run was --------------------------------------------------------------------

    def _settings(self, run: _Run, *, seed, rng, scheduler, controls, guess_mode, loop: str) -> dict[str, Any]:
        one = run.batch == 1
        return {
            "prompt": run.prompts[0] if one else run.prompts,
            "negative_prompt": run.negatives[0] if one else run.negatives,
            "seed": seed,
            "rng": rng,
            "scheduler": scheduler or self.scheduler_config.get("_class_name"),
            "steps": run.steps,
            "guidance_scale": run.guidance_scale,
            "height": run.height,
            "width": run.width,
            "strength": run.strength if run.init_image is not None else None,
            "controls": [_control_setting(c) for c in controls] or None,
            "guess_mode": guess_mode or None,
            "model_hash": self._artifact_hash(),
            "cfg": self.cfg if run.do_cfg else "off",
            "loop": loop,
            "emphasis": run.emphasis,
            "prompt_chunks": run.prompt_chunks,
        } | ({"loras": [list(lora) for lora in self.loras]} if self.loras else {})

    def _artifact_hash(self) -> str | None:
        return self.manifest.exporter.get("artifact_hash")

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

    def _unet(self, sample, t, embeddings, residuals, do_cfg, added=None) -> np.ndarray:
        name = "unet_control" if residuals is not None else "unet"
        session = self.session(name)
        if added is not None:  # SDXL's text_embeds and time_ids: batched (and split) as the residuals are
            residuals = {**(residuals or {}), **added}

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

    def _control_residuals(self, state, i, t, latents, model_input, embeddings, sched, do_cfg, added=None):
        if state is None:
            return None
        guess = state["guess_mode"] and do_cfg
        added = dict(added or {})  # SDXL ControlNets take text_embeds and time_ids too
        if guess:
            # only the conditional branch sees the control; the unconditional half gets zeros
            control_input = sched.scale_model_input(latents, t).astype(F32, copy=False)
            control_embeddings = embeddings[embeddings.shape[0] // 2:]
            added = {k: v[v.shape[0] // 2:] for k, v in added.items()}
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
                       "encoder_hidden_states": control_embeddings, "controlnet_cond": cond, **added}
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
