"""Image conversion at the edges of the pipeline, numerically as diffusers' VaeImageProcessor does it."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from runtime.files import write_file_atomic

__all__ = [
    "ImageInputError",
    "load_image",
    "default_size",
    "resize",
    "to_model_input",
    "mask_to_array",
    "control_to_array",
    "nearest_downsample",
    "decode_to_images",
    "save_png",
    "png_bytes",
]


class ImageInputError(ValueError):
    """An input image or mask cannot be used; the message names it and says why."""


def load_image(source: str | Path | Image.Image, what: str = "image") -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    if path.is_dir():
        raise ImageInputError(f"{what} {path}: is a directory, not an image file")
    if not path.is_file():
        raise ImageInputError(f"{what} {path}: no such file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; the size decides here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img, what, path)
                img.load()
                return img.copy()
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"{what} {path}: too many pixels to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageInputError(f"{what} {path}: cannot read it as an image ({e})") from None


def _check_pixels(img: Image.Image, what: str, path: Path) -> None:
    """Refused from the header, before decoding: a few KB of PNG can expand to gigabytes. The limit is
    the one where Pillow starts warning of a decompression bomb (it refuses only at twice that)."""
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    if img.width * img.height > limit:
        raise ImageInputError(f"{what} {path}: {img.width}x{img.height} has too many pixels to decode safely "
                              f"(at most {limit} pixels)")


def default_size(image: Image.Image, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """Missing sizes come from the image, rounded down to a multiple of the VAE factor (diffusers' rule)."""
    for label, size, given in (("height", image.height, height), ("width", image.width, width)):
        if given is None and size < multiple:
            raise ImageInputError(f"input image is {image.width}x{image.height}, smaller than the minimum {label} "
                                  f"of {multiple} pixels; use a larger image or give --height and --width")
    height = image.height if height is None else height
    width = image.width if width is None else width
    return height - height % multiple, width - width % multiple


def resize(image: Image.Image, height: int, width: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.LANCZOS)


def _to_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float32) / 255.0


def to_model_input(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB image -> float32 [1, 3, H, W] in [-1, 1] (the VAE encoder's input)."""
    array = _to_float(resize(image, height, width).convert("RGB"))
    return (2.0 * array.transpose(2, 0, 1)[None] - 1.0).astype(np.float32)


def mask_to_array(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """Mask -> float32 [1, 1, H, W] of 0/1 (white = repaint), binarised at 0.5 after resizing."""
    array = _to_float(resize(mask, height, width).convert("L"))[None, None]
    return np.where(array < 0.5, 0.0, 1.0).astype(np.float32)


def control_to_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Control image -> float32 [1, 3, H, W] in [0, 1] (ControlNets take it unnormalised)."""
    return _to_float(resize(image, height, width).convert("RGB")).transpose(2, 0, 1)[None].copy()


def nearest_downsample(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch.nn.functional.interpolate(x, size=(height, width)) with its default 'nearest' mode."""
    in_h, in_w = x.shape[-2:]
    rows = np.minimum(np.floor(np.arange(height) * np.float32(in_h / height)).astype(int), in_h - 1)
    cols = np.minimum(np.floor(np.arange(width) * np.float32(in_w / width)).astype(int), in_w - 1)
    return x[..., rows[:, None], cols[None, :]]


def decode_to_images(sample: np.ndarray) -> list[Image.Image]:
    """VAE output [B, 3, H, W] in [-1, 1] -> 8-bit RGB images, rounding as diffusers does."""
    x = np.clip(sample.astype(np.float32) * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
    x = (x.transpose(0, 2, 3, 1) * np.float32(255)).round().astype(np.uint8)
    return [Image.fromarray(img) for img in x]


def save_png(image: Image.Image, path: str | Path, metadata: Mapping[str, object] | None = None) -> None:
    """Write a PNG with text chunks (prompt, seed, ...), atomically."""
    write_file_atomic(path, png_bytes(image, metadata))


def png_bytes(image: Image.Image, metadata: Mapping[str, object] | None = None) -> bytes:
    """The PNG file's bytes, with text chunks (prompt, seed, ...)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_itxt(str(key), "" if value is None else str(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
