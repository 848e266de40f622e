"""Calibration data for post-training quantization, from real pipeline runs of the model being exported.

Quantizing activations needs their ranges as the model sees them in use, not on random tensors:
a U-Net's activations at t=999 on pure noise differ by orders of magnitude from those at t=50 on an
almost clean latent. So the shipped prompt set (``prompts/calibration.txt``) is run through the
diffusers torch pipeline of the source model, with a given scheduler, step count and resolution and
classifier-free guidance as users run it, and the inputs of each component are recorded:

- ``unet`` / ``unet_control``: ``sample``, ``timestep``, ``encoder_hidden_states`` at a few steps per
  prompt, spread over the trajectory (each prompt starts at another offset, so together they cover
  every step); for ``unet_control`` also the ControlNet residuals: zeros, or those of a given
  ControlNet on the same inputs (its control image is the previous prompt's decoded image);
- ``vae_decoder``: the final latents of each run (divided by the VAE scaling factor, as the runtime feeds them);
- ``vae_encoder``: the decoded images in [-1, 1];
- ``text_encoder``: the token ids of each prompt and negative prompt.

The result is target-independent: lists of feed dicts keyed by the ComponentSpec input names (numpy
arrays), usable by OpenVINO/NNCF and ONNX Runtime quantizers alike. It is deterministic for a seed,
cached on disk (keyed by the source files' sizes and mtimes, resolution, scheduler, steps and
counts) and bounded in size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sdexport.errors import ExportError, OptionError
from sdexport.measure.reference_schedulers import DIFFUSERS_SCHEDULERS, use_scheduler
from sdexport.quantize import calibration_sdxl

__all__ = [
    "CalibrationSettings",
    "CalibrationData",
    "collect",
    "load_prompts",
    "rebatch",
    "default_cache_dir",
    "PROMPTS_FILE",
]

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "prompts" / "calibration.txt"
CACHE_VERSION = 1
COMPONENTS = ("text_encoder", "unet", "unet_control", "vae_encoder", "vae_decoder")
NEGATIVE_PROMPTS = ("", "blurry, low quality, watermark", "", "ugly, deformed, jpeg artifacts")



@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """How much to record and from which runs. A profile's ``[calibration]`` table sets these."""

    samples: int = 64  # U-Net feeds (one CFG batch each)
    per_prompt: int = 4  # U-Net feeds recorded per prompt, spread over its trajectory
    steps: int = 20
    scheduler: str | None = None  # a runtime short name (dpmpp-2m, ...); None: the model's own scheduler
    guidance_scale: float | None = None  # None: the pipeline's own default, as users run it (SD 7.5, SDXL 5.0)
    seed: int = 0
    max_bytes: int = 1 << 30  # bound on the recorded arrays; U-Net feeds are thinned to fit

    def __post_init__(self):
        if self.samples < 1 or self.per_prompt < 1 or self.steps < 1:
            raise OptionError("calibration samples, per_prompt and steps must be at least 1")
        if self.scheduler is not None and self.scheduler not in DIFFUSERS_SCHEDULERS:
            raise OptionError(f"calibration scheduler {self.scheduler!r}: use one of {', '.join(DIFFUSERS_SCHEDULERS)}")

    @property
    def prompts(self) -> int:
        return math.ceil(self.samples / min(self.per_prompt, self.steps))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "CalibrationSettings":
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise OptionError(f"unknown calibration settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})")
        return cls(**values)


@dataclasses.dataclass
class CalibrationData:
    feeds: dict[str, list[dict[str, np.ndarray]]]  # component name -> feed dicts
    info: dict[str, Any]  # settings, prompts, cache key, bytes, whether it came from the cache

    def for_component(self, name: str, batch: int | None = None) -> list[dict[str, np.ndarray]]:
        """The feeds of one component, regrouped to a leading dimension of ``batch`` if given."""
        if name not in self.feeds:
            raise ExportError(f"calibration data has no {name!r} feeds (it has: {', '.join(self.feeds)})")
        feeds = self.feeds[name]
        return rebatch(feeds, batch) if batch else feeds

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for feeds in self.feeds.values() for f in feeds for a in f.values())


# --- helpers ---------------------------------------------------------------------------------


def load_prompts(path: Path | None = None) -> list[str]:
    lines = Path(path or PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def rebatch(feeds: Sequence[Mapping[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """Regroup feeds along axis 0 into batches of ``n`` rows (a static CFG batch of 2B, or B when the
    two guidance branches run one after the other). Leftover rows that do not fill a batch are dropped.
    Inputs without a batch axis (a per-residual scale vector) are taken from the first feed of a group."""
    if not feeds:
        return []
    batched = [k for k, v in feeds[0].items() if v.ndim and k != "conditioning_scale"]
    if all(feeds[0][k].shape[0] == n for k in batched):
        return [dict(f) for f in feeds]
    rows = {k: np.concatenate([f[k] for f in feeds]) for k in batched}
    total = min(len(v) for v in rows.values())
    out = []
    for start in range(0, total - n + 1, n):
        feed = {k: v[start:start + n] for k, v in rows.items()}
        feed.update({k: v for k, v in feeds[0].items() if k not in feed})
        out.append(feed)
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdexport" / "calibration"


def _files_fingerprint(paths: Iterable[Path]) -> list:
    """Size and mtime of every file under the given folders: cheap, and any rewrite changes it."""
    out = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                st = p.stat()
                out.append([p.relative_to(root.parent).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def _module_fingerprint(module) -> str:
    """A U-Net given as a module (LoRA fused, say) is keyed by its weights, not by files."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.named_parameters():
            flat = p.detach().reshape(-1)
            stats = (float(flat.double().sum()), float(flat.abs().double().sum()), *flat[:4].tolist())
            digest.update(f"{name}{tuple(p.shape)}{stats}".encode())
    return digest.hexdigest()


def _step_indices(prompt_index: int, per_prompt: int, steps: int) -> list[int]:
    """``per_prompt`` steps spread over ``steps``; successive prompts start at successive offsets,
    so that together they visit every step of the trajectory."""
    k = min(per_prompt, steps)
    stride = steps / k
    offset = (prompt_index % max(1, int(stride))) if stride >= 1 else 0
    return sorted({min(steps - 1, int(i * stride) + offset) for i in range(k)})


def _synthetic_image(size: tuple[int, int], seed: int):
    """A smooth image with a few shapes (inpainting calibration needs an input image to start from)."""
    from PIL import Image, ImageDraw

    height, width = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    colors = rng.uniform(0.2, 1.0, (3, 3))
    base = np.stack([colors[0, c] * x + colors[1, c] * y + colors[2, c] * (1 - x * y) for c in range(3)], -1)
    img = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = rng.integers(0, width * 3 // 4), rng.integers(0, height * 3 // 4)
        w, h = rng.integers(width // 8, width // 3), rng.integers(height // 8, height // 3)
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def _random_mask(size: tuple[int, int], seed: int):
    from PIL import Image, ImageDraw

    height, width = size
    rng = np.random.default_rng(seed + 7919)
    mask = Image.new("L", (width, height), 0)
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    ImageDraw.Draw(mask).rectangle([x0, y0, x0 + width // 2, y0 + height // 2], fill=255)
    return mask


# --- the cache -------------------------------------------------------------------------------


def _save(path: Path, data: CalibrationData) -> None:
    arrays = {f"{comp}/{i}/{name}": a for comp, feeds in data.feeds.items() for i, f in enumerate(feeds) for name, a in f.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        np.savez(tmp, **arrays)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the cache entry is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    path.with_suffix(".json").write_text(json.dumps(data.info, indent=2), encoding="utf-8")


def _load(path: Path) -> CalibrationData | None:
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        feeds: dict[str, dict[int, dict[str, np.ndarray]]] = {}
        with np.load(path) as npz:
            for key in npz.files:
                comp, index, name = key.rsplit("/", 2)
                feeds.setdefault(comp, {}).setdefault(int(index), {})[name] = npz[key]
    except (OSError, ValueError, json.JSONDecodeError):
        return None  # a damaged entry is recomputed, not trusted
    os.utime(path)  # least-recently-used eviction reads mtimes
    info["cached"] = True
    return CalibrationData({c: [f[i] for i in sorted(f)] for c, f in feeds.items()}, info)


def _evict(cache_dir: Path, keep_bytes: int, protect: Path) -> None:
    """Remove least recently used entries until the cache holds at most ``keep_bytes``."""
    entries = sorted(cache_dir.glob("*.npz"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in entries)
    for p in entries:
        if total <= keep_bytes:
            break
        if p == protect:
            continue
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
        p.with_suffix(".json").unlink(missing_ok=True)


# --- recording -------------------------------------------------------------------------------


def collect(
    source_path: str | Path,
    components: Sequence[str] = ("text_encoder", "unet", "vae_encoder", "vae_decoder"),
    *,
    height: int,
    width: int,
    settings: CalibrationSettings = CalibrationSettings(),
    unet=None,
    controlnet: str | Path | None = None,
    cache_dir: str | Path | None = None,
    cache_max_bytes: int = 8 << 30,
    progress: bool = False,
) -> CalibrationData:
    """Record the inputs of ``components`` over real pipeline runs of the model at ``source_path``.

    ``unet``: a diffusers U-Net to use instead of the source's (the module being exported, with LoRAs
    fused, say). ``controlnet``: a diffusers ControlNet folder whose residuals feed ``unet_control``
    (zeros without one). ``cache_dir``: where results are kept (default ``~/.cache/sdexport/calibration``;
    "" disables the cache).
    """
    source_path = Path(source_path).resolve()
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise OptionError(f"calibration cannot record {', '.join(unknown)}; it knows {', '.join(COMPONENTS)}")
    key_data = {
        "version": CACHE_VERSION,
        "source": str(source_path),
        "files": _files_fingerprint(source_path / p for p in ("unet", "text_encoder", "vae", "scheduler", "tokenizer")),
        "unet": _module_fingerprint(unet) if unet is not None else None,
        "controlnet": _files_fingerprint([Path(controlnet).resolve()]) if controlnet else None,
        "height": height,
        "width": width,
        "components": sorted(components),
        "settings": dataclasses.asdict(settings),
        "prompts": hashlib.sha256("\n".join(load_prompts()).encode()).hexdigest(),
    }
    if (family := calibration_sdxl.family(source_path)) is not None:  # SD keys stay as they were
        extra_files = _files_fingerprint(source_path / p for p in calibration_sdxl.EXTRA_FOLDERS)
        key_data.update(family=family, files_2=extra_files)
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:24]
    cache = default_cache_dir() if cache_dir is None else (Path(cache_dir) if cache_dir else None)
    path = cache / f"{key}.npz" if cache else None
    if path is not None and (hit := _load(path)) is not None:
        return hit

    data = _record(source_path, components, height, width, settings, unet, controlnet, progress)
    data.info.update(key=key, source=str(source_path), height=height, width=width, cached=False)
    if path is not None:
        _save(path, data)
        _evict(cache, cache_max_bytes, protect=path)
    return data


def _load_pipeline(source_path: Path, inpaint: bool, scheduler: str | None, unet, info=None):
    import diffusers

    cls = diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionPipeline
    extra = {"unet": unet} if unet is not None else {}
    if info is not None and info.is_sdxl:  # SDXL pipelines have no safety checker to turn off
        cls = calibration_sdxl.pipeline_class(info)
    else:
        extra.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(str(source_path), **extra)
    except Exception as e:  # diffusers raises many types for unusable folders
        raise ExportError(f"{source_path}: cannot load the diffusers pipeline for calibration "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        use_scheduler(pipe, scheduler)
    return pipe


def _record(source_path: Path, components: Sequence[str], height: int, width: int, settings: CalibrationSettings,
            unet, controlnet, progress: bool) -> CalibrationData:
    info, pipe, cn_model = _open_reference(source_path, components, settings, unet, controlnet)
    if settings.guidance_scale is None:
        settings = dataclasses.replace(settings, guidance_scale=pipeline_guidance(pipe))
    prompts = _pick_prompts(settings)
    recorder = _UNetRecorder(info, components, cn_model)
    feeds = recorder.feeds
    needs_image = (recorder.cn_model is not None or info.is_inpainting
                   or (info.is_sdxl and calibration_sdxl.needs_image(info)))  # an SDXL refiner's img2img input
    handle = pipe.unet.register_forward_pre_hook(recorder.hook, with_kwargs=True)
    previous_image = None
    try:
        iterator = range(settings.prompts)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="calibration", unit="prompt")
        for i in iterator:
            prompt, negative = prompts[i], NEGATIVE_PROMPTS[i % len(NEGATIVE_PROMPTS)]
            recorder.start_prompt(_step_indices(i, settings.per_prompt, settings.steps))
            image = None
            if needs_image:
                image = previous_image or _synthetic_image((height, width), settings.seed + i)
            extra = calibration_sdxl.run_kwargs(info, negative, image, settings.steps) if info.is_sdxl else {}
            latents, pixels = _generate(pipe, recorder, i, prompt, negative, image, settings, height, width,
                                        info.is_inpainting, extra, decode=needs_image or "vae_encoder" in feeds)
            _record_text_and_vae(feeds, pipe, (prompt, negative), latents, pixels)
            previous_image = _to_pil(pixels) if pixels is not None else None
    finally:
        handle.remove()
    for c in recorder.wanted_unet:
        feeds[c] = feeds[c][: settings.samples]
    dropped = _bound(feeds, settings.max_bytes)
    return CalibrationData(feeds, {
        "settings": dataclasses.asdict(settings),
        "scheduler": type(pipe.scheduler).__name__,
        "pipeline": type(pipe).__name__,
        "prompts": prompts,
        "controlnet": str(controlnet) if cn_model is not None else None,
        "residuals": ("controlnet" if cn_model is not None else "zeros") if "unet_control" in components else None,
        "counts": {c: len(f) for c, f in feeds.items()},
        "dropped_for_size": dropped,
        "bytes": sum(a.nbytes for fs in feeds.values() for f in fs for a in f.values()),
    })


def pipeline_guidance(pipe) -> float:
    """The guidance scale a diffusers pipeline runs with when given none: 7.5 for SD's, 5.0 for SDXL's
    text-to-image and img2img pipelines, 7.5 for SDXL inpainting."""
    return float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)


def _open_reference(source_path: Path, components: Sequence[str], settings: CalibrationSettings, unet, controlnet):
    """The model's facts, its diffusers pipeline, and the ControlNet when ``unet_control`` is recorded."""
    from sdexport.export.components import model_info as _model_info
    from sdexport.sources.diffusers import DiffusersSource

    source = DiffusersSource.open(source_path)
    info = _model_info(source)
    if info.unet_in_channels not in (info.latent_channels, 2 * info.latent_channels + 1):
        raise ExportError(f"{source_path}: calibration runs txt2img or inpainting pipelines; a U-Net with "
                          f"{info.unet_in_channels} input channels ({info.family}) is not supported")
    if info.is_sdxl:
        calibration_sdxl.check_components(info, components)
    pipe = _load_pipeline(source_path, info.is_inpainting, settings.scheduler, unet, info)
    cn_model = None
    if controlnet is not None and "unet_control" in components:
        from diffusers import ControlNetModel

        cn_model = ControlNetModel.from_pretrained(str(controlnet)).eval()
    return info, pipe, cn_model


def _pick_prompts(settings: CalibrationSettings) -> list[str]:
    prompts_all = load_prompts()
    order = np.random.default_rng(settings.seed).permutation(len(prompts_all))
    return [prompts_all[order[i % len(order)]] for i in range(settings.prompts)]


class _UNetRecorder:
    """A forward pre-hook on the reference U-Net that keeps the inputs of the chosen calls of each
    prompt (and, for ``unet_control``, the ControlNet residuals those inputs give)."""

    def __init__(self, info, components: Sequence[str], cn_model):
        from sdexport.export.components import residual_names

        self.info, self.cn_model = info, cn_model
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {c: [] for c in components}
        self.wanted_unet = [c for c in ("unet", "unet_control") if c in components]
        self.res_names = residual_names(info)
        self.call, self.record, self.cond = 0, set(), None

    def start_prompt(self, indices) -> None:
        self.call, self.record = 0, set(indices)

    def hook(self, module, args, kwargs):
        import torch

        index = self.call
        self.call += 1
        if index not in self.record or not self.wanted_unet:
            return
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        n = sample.shape[0]
        t = torch.as_tensor(timestep).float().reshape(-1).expand(n) if torch.as_tensor(timestep).numel() == 1 \
            else torch.as_tensor(timestep).float().reshape(n)
        feed = {"sample": sample.detach().float().numpy().copy(), "timestep": t.numpy().copy(),
                "encoder_hidden_states": ehs.detach().float().numpy().copy()}
        added = kwargs.get("added_cond_kwargs") or None  # SDXL: named as the exported U-Net's inputs
        if added is not None:
            feed.update({k: added[k].detach().float().numpy().copy() for k in calibration_sdxl.ADDED_INPUTS})
        if kwargs.get("timestep_cond") is not None:
            feed["timestep_cond"] = kwargs["timestep_cond"].detach().float().numpy().copy()
        if "unet" in self.feeds:
            self.feeds["unet"].append(feed)
        if "unet_control" in self.feeds:
            self.feeds["unet_control"].append({**feed, **self._residuals(sample, t, ehs, n, added)})

    def _residuals(self, sample, t, ehs, n, added=None):
        import torch

        latents = sample[:, : self.info.latent_channels]
        if self.cn_model is None or self.cond is None:
            sizes = _residual_shapes(self.info, latents.shape[2], latents.shape[3])
            return {name: np.zeros((n, *shape), np.float32) for name, shape in zip(self.res_names, sizes)}
        with torch.no_grad():
            cond = self.cond.expand(n, -1, -1, -1)
            extra = {"added_cond_kwargs": added} if added is not None else {}  # an SDXL ControlNet's
            down, mid = self.cn_model(latents, t, ehs, controlnet_cond=cond, return_dict=False, **extra)
        return {name: r.float().numpy().copy() for name, r in zip(self.res_names, [*down, mid])}


def _generate(pipe, recorder: _UNetRecorder, i: int, prompt: str, negative: str, image, settings: CalibrationSettings,
              height: int, width: int, inpaint: bool, extra: Mapping[str, Any] | None = None, decode: bool = True):
    """One prompt through the reference pipeline (the hook records the U-Net calls): latents and pixels
    (None unless ``decode``: a full-size VAE decode costs as much as a few U-Net calls).
    ``image`` (the previous prompt's result, or a synthetic one) is the control image and the inpainting
    input; ``extra``: the family's own pipeline arguments (SDXL's)."""
    import torch

    if recorder.cn_model is not None:
        recorder.cond = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)[None]
    kwargs: dict[str, Any] = dict(prompt=prompt, negative_prompt=negative, height=height, width=width,
                                  num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                                  generator=torch.Generator().manual_seed(settings.seed + i), output_type="latent")
    if inpaint:
        kwargs.update(image=image, mask_image=_random_mask((height, width), settings.seed + i), strength=1.0)
    kwargs.update(extra or {})
    with torch.no_grad():
        latents = pipe(**kwargs).images
        pixels = _decode(pipe, latents) if decode else None
    return latents, pixels


def _record_text_and_vae(feeds: dict, pipe, texts: Sequence[str], latents, pixels) -> None:
    if "text_encoder" in feeds:
        for text in texts:
            ids = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="np").input_ids
            feeds["text_encoder"].append({"input_ids": ids.astype(np.int64)})
    if "vae_decoder" in feeds:
        feeds["vae_decoder"].append({"latent_sample": _unscale(pipe, latents).numpy().copy()})
    if "vae_encoder" in feeds:
        feeds["vae_encoder"].append({"sample": pixels.numpy().copy()})


def _residual_shapes(info, h: int, w: int) -> list[tuple[int, int, int]]:
    shapes = []
    for ch, s in info.control_residuals:
        hs, ws = h, w
        for _ in range(s.bit_length() - 1):
            hs, ws = (hs + 1) // 2, (ws + 1) // 2
        shapes.append((ch, hs, ws))
    return shapes


def _unscale(pipe, latents):
    z = latents / pipe.vae.config.scaling_factor
    shift = getattr(pipe.vae.config, "shift_factor", None)
    return z + shift if shift is not None else z


def _decode(pipe, latents):
    return pipe.vae.decode(_unscale(pipe, latents), return_dict=False)[0].clamp(-1, 1)


def _to_pil(pixels):
    from PIL import Image

    array = ((pixels[0].permute(1, 2, 0).float().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _bound(feeds: dict[str, list[dict[str, np.ndarray]]], max_bytes: int) -> int:
    """Thin the U-Net feeds evenly (they dominate) until everything fits in ``max_bytes``."""
    def size() -> int:
        return sum(a.nbytes for fs in feeds.values() for f in fs for a in f.values())

    dropped = 0
    for name in ("unet_control", "unet"):
        while size() > max_bytes and len(feeds.get(name, [])) > 1:
            before = len(feeds[name])
            feeds[name] = feeds[name][::2]
            dropped += before - len(feeds[name])
    if size() > max_bytes:
        raise ExportError(f"calibration data needs {size() / 2**20:.0f} MiB even when thinned; raise max_bytes "
                          f"(now {max_bytes / 2**20:.0f} MiB) or lower the resolution")
    return dropped
