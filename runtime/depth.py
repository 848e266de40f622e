"""Depth: DPT's image processor, torch's bicubic interpolation and the two depth post-processings, in numpy.

- :class:`DptProcessorConfig` is transformers' ``DPTImageProcessor`` configuration as the export
  records it (``preprocessor_config.json``'s resize, rescale and normalize settings), and
  :func:`dpt_pixel_values` its preprocessing: the image resized with Pillow (what transformers'
  Pillow backend calls, with the configured filter, ``keep_aspect_ratio`` and ``ensure_multiple_of``),
  rescaled in float64 then cast to float32, normalized in float32, channels first.
- :func:`bicubic_resize` is ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``
  (Keys' cubic with A = -0.75, source index ``scale * (i + 0.5) - 0.5``, borders replicated).
- :func:`depth_condition` is diffusers' ``StableDiffusionDepth2ImgPipeline.prepare_depth_map`` after
  the estimator: bicubic to the latent size, then ``2 (d - min) / (max - min) - 1`` per image.
- :func:`depth_control_image` is transformers' ``depth-estimation`` pipeline output, the control image
  of diffusers' depth ControlNet example: bicubic to the image size, ``(d - min) / (max - min)``,
  times 255 truncated to uint8, the gray map replicated to three channels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DptProcessorConfig",
    "DepthInputError",
    "dpt_resize_size",
    "dpt_pixel_values",
    "bicubic_resize",
    "depth_condition",
    "depth_control_image",
    "depth_map_array",
]

F32 = np.float32

# PIL resample codes transformers writes (PILImageResampling); Pillow's resize takes the same numbers.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_CUBIC_A = -0.75  # torch's bicubic (upsample_bicubic2d) uses Keys' cubic with A = -0.75


class DepthInputError(ValueError):
    """A depth map or depth setting cannot be used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class DptProcessorConfig:
    """What ``DPTImageProcessor`` does to an image before the depth estimator, as recorded in the artifact."""

    height: int
    width: int
    do_resize: bool = True
    resample: int = 3  # PIL code: 3 bicubic, 2 bilinear, ...
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        for name in ("height", "width", "ensure_multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DepthInputError(f"depth image processor {name} {value!r}: expected a positive integer")
        if self.resample not in _RESAMPLE:
            raise DepthInputError(f"depth image processor resample {self.resample!r}: expected a PIL filter code 0-5")
        numbers = (self.rescale_factor, *self.image_mean, *self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise DepthInputError("depth image processor image_mean/image_std: expected three values each")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise DepthInputError("depth image processor: rescale_factor, image_mean and image_std must be finite numbers")
        if any(s == 0 for s in self.image_std):
            raise DepthInputError("depth image processor image_std: a zero would divide by zero")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_mean"], data["image_std"] = list(self.image_mean), list(self.image_std)
        return data

    @classmethod
    def from_json(cls, data: Any) -> "DptProcessorConfig":
        if not isinstance(data, dict):
            raise DepthInputError("depth image processor: expected an object")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise DepthInputError(f"depth image processor has unknown keys: {', '.join(sorted(unknown))}")
        data = dict(data)
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(data[key]) if isinstance(data[key], list) else data[key]
        return cls(**data)

    @classmethod
    def from_preprocessor_config(cls, data: dict) -> "DptProcessorConfig":
        """From transformers' ``preprocessor_config.json`` (DPTImageProcessor / DPTFeatureExtractor)."""
        if data.get("do_pad"):
            raise DepthInputError("depth image processor with do_pad: padding to size_divisor is not supported")
        size = data.get("size", {"height": 384, "width": 384})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if not isinstance(size, dict) or "height" not in size or "width" not in size:
            raise DepthInputError(f"depth image processor size {size!r}: expected a height and a width")

        def triple(value):
            return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))

        return cls(
            height=size["height"], width=size["width"], do_resize=bool(data.get("do_resize", True)),
            resample=int(data.get("resample", 3)), keep_aspect_ratio=bool(data.get("keep_aspect_ratio", False)),
            ensure_multiple_of=int(data.get("ensure_multiple_of", 1) or 1), do_rescale=bool(data.get("do_rescale", True)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)), do_normalize=bool(data.get("do_normalize", True)),
            image_mean=triple(data.get("image_mean", 0.5)), image_std=triple(data.get("image_std", 0.5)),
        )


def _to_multiple(value: float, multiple: int, min_val: int = 0, max_val: int | None = None) -> int:
    x = round(value / multiple) * multiple
    if max_val is not None and x > max_val:
        x = math.floor(value / multiple) * multiple
    if x < min_val:
        x = math.ceil(value / multiple) * multiple
    return int(x)


def dpt_resize_size(height: int, width: int, config: DptProcessorConfig) -> tuple[int, int]:
    """(height, width) DPTImageProcessor resizes an image of this size to (its get_resize_output_image_size)."""
    scale_h, scale_w = config.height / height, config.width / width
    if config.keep_aspect_ratio:
        if abs(1 - scale_w) < abs(1 - scale_h):  # scale as little as possible
            scale_h = scale_w
        else:
            scale_w = scale_h
    return _to_multiple(scale_h * height, config.ensure_multiple_of), _to_multiple(scale_w * width, config.ensure_multiple_of)


def dpt_pixel_values(image: Image.Image, config: DptProcessorConfig) -> np.ndarray:
    """RGB image -> float32 [1, 3, H, W], the depth estimator's ``pixel_values``."""
    image = image.convert("RGB")
    if config.do_resize:
        height, width = dpt_resize_size(image.height, image.width, config)
        image = image.resize((width, height), resample=config.resample)
    array = np.asarray(image)  # uint8 [H, W, 3]
    if config.do_rescale:
        array = (array.astype(np.float64) * config.rescale_factor).astype(F32)
    else:
        array = array.astype(F32)
    if config.do_normalize:
        array = (array - np.asarray(config.image_mean, F32)) / np.asarray(config.image_std, F32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None], dtype=F32)


# ---------------------------------------------------------------------------------------------
# torch's bicubic interpolation


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [out, 4] (clamped to the border) and weights [out, 4] of one axis, in float32 as
    torch computes them for a float32 tensor (scale = in / out; source = scale * (i + 0.5) - 0.5)."""
    scale = F32(in_size) / F32(out_size)
    real = scale * (np.arange(out_size, dtype=F32) + F32(0.5)) - F32(0.5)
    floor = np.floor(real)
    t = (real - floor).astype(F32)
    a = F32(_CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + F32(2)) * x - (a + F32(3))) * x * x + F32(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - F32(5) * a) * x + F32(8) * a) * x - F32(4) * a

    opposite = (F32(1) - t).astype(F32)
    weights = np.stack([far(t + F32(1)), near(t), near(opposite), far(opposite + F32(1))], axis=1).astype(F32)
    index = floor.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(index, 0, in_size - 1), weights


def _interp_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    index, weights = _cubic_taps(x.shape[axis], out_size)
    moved = np.moveaxis(x, axis, -1)
    out = np.zeros(moved.shape[:-1] + (out_size,), F32)
    for k in range(4):  # the four taps summed in order, in float32
        out += moved[..., index[:, k]] * weights[:, k]
    return np.moveaxis(out, -1, axis)


def bicubic_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)``
    for float32 x [..., H, W]; an axis already at its size is left as it is (torch copies it too)."""
    x = np.asarray(x, F32)
    if x.shape[-2] != height:
        x = _interp_axis(x, x.ndim - 2, height)
    if x.shape[-1] != width:
        x = _interp_axis(x, x.ndim - 1, width)
    return x


# ---------------------------------------------------------------------------------------------
# post-processing


def _check_range(depth: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    low = depth.min(axis=(-2, -1), keepdims=True)
    high = depth.max(axis=(-2, -1), keepdims=True)
    if not np.isfinite(depth).all():
        raise DepthInputError(f"{what} has values that are not finite numbers")
    if (high == low).any():
        raise DepthInputError(f"{what} is constant: a depth map needs near and far parts to normalize")
    return low, high


def depth_condition(depth: np.ndarray, latent_height: int, latent_width: int, what: str = "depth map") -> np.ndarray:
    """Depth [B, H, W] (estimated or given) -> the U-Net's depth channel [B, 1, h, w] in [-1, 1]."""
    d = bicubic_resize(np.asarray(depth, F32)[:, None], latent_height, latent_width)
    low, high = _check_range(d, what)
    return (F32(2.0) * (d - low) / (high - low) - F32(1.0)).astype(F32)


def depth_control_image(depth: np.ndarray, height: int, width: int) -> Image.Image:
    """One estimated depth [H', W'] -> the 8-bit RGB control image of ``height`` x ``width`` (near = bright)."""
    d = bicubic_resize(np.asarray(depth, F32)[None, None], height, width)[0, 0]
    low, high = _check_range(d, "estimated depth")
    gray = ((d - low) / (high - low) * F32(255)).astype(np.uint8)  # truncated, as transformers does
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")


_DEPTH_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "I": np.int32, "F": F32}


def depth_map_array(image: Image.Image, height: int, width: int, what: str = "depth map") -> np.ndarray:
    """A user's depth map (a single-channel image: 8- or 16-bit gray, 32-bit integer or float) -> float32
    [1, H, W]. It must be the size of the input image it describes (``width`` x ``height``)."""
    if image.mode not in _DEPTH_MODES:
        raise DepthInputError(f"{what}: mode {image.mode} has {len(image.getbands())} channel(s); a depth map is "
                              f"one channel (8- or 16-bit gray, or 32-bit integer/float)")
    if image.size != (width, height):
        raise DepthInputError(f"{what} is {image.width}x{image.height} but the image is {width}x{height}; "
                              f"give the depth map of this image, at its size")
    return np.asarray(image).astype(F32)[None]


def processor_config(details: dict) -> DptProcessorConfig:
    """The image processor an export recorded with its depth estimator (ManifestError-worthy when bad)."""
    if "image_processor" not in details:
        raise DepthInputError("the depth_estimator component records no image_processor settings")
    return DptProcessorConfig.from_json(details["image_processor"])
