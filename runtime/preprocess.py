"""Control-image preprocessors for ControlNet, in numpy and Pillow (no model download, no OpenCV).

Each preprocessor takes a PIL image and returns an 8-bit RGB PIL image; the pipeline then resizes
it with ``runtime.image.control_to_array``. Inputs are read as ``image.convert("RGB")`` (an alpha
channel is dropped, as ``control_to_array`` drops it).

- ``canny``: OpenCV's ``cv2.Canny`` (3x3 Sobel, L1 magnitude), pixel for pixel. By default on the
  RGB array, as the diffusers ControlNet docs, controlnet_aux and ControlNet's own annotator call it
  (``cv2.Canny(np.array(image), low, high)``: per pixel, the channel with the largest gradient wins);
  ``gray=True`` first converts as ``cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)`` does.
- ``threshold``: gray level > ``level`` becomes white, the rest black (``invert`` swaps them).
- ``scribble``: a drawing binarised at 127 so that strokes end up white on black, whichever way
  round they were drawn (the rule is in ``scribble``'s docstring).
- ``invert``: 255 - value, per channel.
- ``none``: the image as it is. Pose (OpenPose skeletons), normal and segmentation maps are
  produced by models that sdexport does not ship: users hand them in ready-made, and they go
  through ``none`` (and ``fit`` when their aspect ratio differs from the output's). Depth maps
  too, or ``--preprocess depth`` computes them with an exported DPT (a model, so not here:
  ``runtime.pipeline.Pipeline.depth_control_image`` and ``runtime.depth``).

``fit`` brings any of these to the output size by stretching, cropping or padding.
"""

from __future__ import annotations

import inspect
import math
from numbers import Real
from typing import Callable

import numpy as np
from PIL import Image

__all__ = [
    "canny",
    "threshold",
    "invert",
    "scribble",
    "none",
    "fit",
    "FIT_MODES",
    "PREPROCESSORS",
    "preprocess",
    "rgb_to_gray",
]

FIT_MODES = ("resize", "crop", "pad")

# cv2.cvtColor(COLOR_RGB2GRAY) on 8-bit data: 0.299 R + 0.587 G + 0.114 B in 15-bit fixed point
# (the three weights sum to exactly 1 << 15), rounded half up.
_GRAY_SHIFT = 15
_GRAY_WEIGHTS = (9798, 19235, 3735)

# Canny's direction sectors, as OpenCV tests them: tan(22.5 deg) in 15-bit fixed point.
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)  # 13573


# ---------------------------------------------------------------------------------------------
# small helpers


def _rgb_array(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    return np.asarray(image.convert("RGB"))


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> uint8 [H, W], exactly as ``cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)``."""
    r, g, b = (rgb[..., c].astype(np.int32) for c in range(3))
    wr, wg, wb = _GRAY_WEIGHTS
    return ((r * wr + g * wg + b * wb + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT).astype(np.uint8)


def _to_image(gray: np.ndarray) -> Image.Image:
    """uint8 [H, W] -> RGB image with the same value in all three channels."""
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")


def _number(value, what: str, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if high is None and value < low:
        raise ValueError(f"{what} must be at least {low:g}, got {value!r}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{what} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Canny


def _sobel(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, C] -> 3x3 Sobel derivatives (int16 [H, W, C]) with replicated borders, as
    cv2.Sobel(ksize=3, borderType=BORDER_REPLICATE); |values| <= 4 * 255 fit int16."""
    p = np.pad(channels.astype(np.int16), ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth_rows = p[:-2] + 2 * p[1:-1] + p[2:]  # [1, 2, 1] down the columns     [H, W + 2, C]
    smooth_cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # [1, 2, 1] along the rows  [H + 2, W, C]
    dx = smooth_rows[:, 2:] - smooth_rows[:, :-2]
    dy = smooth_cols[2:] - smooth_cols[:-2]
    return dx, dy


def _gradient(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [H, W, C] -> (dx, dy, L1 magnitude), each int32 [H, W]; per pixel, the channel with
    the largest magnitude wins, the first one on ties (OpenCV's multi-channel rule)."""
    dx, dy = _sobel(channels)
    mag = np.abs(dx) + np.abs(dy)  # <= 2040: still int16
    best_dx, best_dy, best = dx[..., 0], dy[..., 0], mag[..., 0]
    for c in range(1, channels.shape[2]):
        wins = mag[..., c] > best
        best_dx = np.where(wins, dx[..., c], best_dx)
        best_dy = np.where(wins, dy[..., c], best_dy)
        best = np.where(wins, mag[..., c], best)
    return best_dx.astype(np.int32), best_dy.astype(np.int32), best.astype(np.int32)


def _non_max_suppression(dx: np.ndarray, dy: np.ndarray, mag: np.ndarray, low: float) -> np.ndarray:
    """Pixels above ``low`` that are a maximum across the edge, with OpenCV's sector test and its
    mix of strict and non-strict comparisons; magnitudes outside the image count as 0."""
    h, w = mag.shape
    m = np.pad(mag, 1)  # zero border                                                [H + 2, W + 2]
    centre = m[1:-1, 1:-1]

    def at(di: int, dj: int) -> np.ndarray:  # neighbour magnitude at row offset di, column offset dj
        return m[1 + di : 1 + di + h, 1 + dj : 1 + dj + w]

    x = np.abs(dx)
    y = np.abs(dy) << _CANNY_SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_CANNY_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # gradient along the main diagonal: compare up-left with down-right

    peak = horizontal & (centre > at(0, -1)) & (centre >= at(0, 1))
    peak |= vertical & (centre > at(-1, 0)) & (centre >= at(1, 0))
    peak |= diagonal & same_sign & (centre > at(-1, -1)) & (centre > at(1, 1))
    peak |= diagonal & ~same_sign & (centre > at(-1, 1)) & (centre > at(1, -1))
    return peak & (mag > low)


def _connected_to(candidates: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Pixels of ``candidates`` 8-connected (through candidates) to a pixel of ``seeds``.

    Union-find over the candidate pixels, vectorised: every round hooks the larger root of each
    link onto the smallest root it touches, then flattens all trees; links inside one tree are
    dropped for good, so a few rounds suffice."""
    h, w = candidates.shape
    grid = np.zeros((h + 2, w + 2), dtype=bool)  # a false frame: no link wraps around a row end
    grid[1:-1, 1:-1] = candidates
    flat = grid.ravel()
    pixels = np.flatnonzero(flat)  # node k is the candidate pixel pixels[k]
    node = np.zeros(flat.size, dtype=np.intp)
    node[pixels] = np.arange(pixels.size)
    steps = (1, w + 1, w + 2, w + 3)  # to the right, down-left, down and down-right neighbours
    starts = [np.flatnonzero(flat[:-step] & flat[step:]) for step in steps]
    a = np.concatenate([node[k] for k in starts])  # the links, as node pairs (a, b)
    b = np.concatenate([node[k + step] for k, step in zip(starts, steps)])

    parent = np.arange(pixels.size)
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        if not a.size:
            break
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand

    row, col = np.divmod(pixels, w + 2)
    in_image = (row - 1) * w + (col - 1)  # the candidates' flat indices in the H x W image
    seeded = np.zeros(pixels.size, dtype=bool)
    seeded[parent[seeds.ravel()[in_image]]] = True
    kept = np.zeros(h * w, dtype=bool)
    kept[in_image] = seeded[parent]
    return kept.reshape(h, w)


def canny(
    image: Image.Image, low_threshold: float = 100, high_threshold: float = 200, gray: bool = False
) -> Image.Image:
    """Canny edges, white on black: ``cv2.Canny(np.array(image.convert("RGB")), low, high)``
    stacked to RGB, pixel for pixel (``gray=True``: of the ``COLOR_RGB2GRAY`` conversion instead).

    A pixel is an edge when its L1 gradient magnitude is a local maximum across the edge, exceeds
    ``low_threshold`` and is 8-connected through such pixels to one exceeding ``high_threshold``.
    Both tests are strict, as in OpenCV (which rounds the thresholds down first: for the integer
    magnitudes that changes nothing). OpenCV swaps thresholds given in the wrong order; this raises."""
    low = _number(low_threshold, "canny low_threshold", 0)
    high = _number(high_threshold, "canny high_threshold", 0)
    if low > high:
        raise ValueError(f"canny low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})")
    if not isinstance(gray, bool):
        raise ValueError(f"canny gray must be true or false, got {gray!r}")
    rgb = _rgb_array(image)
    channels = rgb_to_gray(rgb)[:, :, None] if gray else rgb
    dx, dy, mag = _gradient(channels)
    candidates = _non_max_suppression(dx, dy, mag, low)
    strong = candidates & (mag > high)
    edges = _connected_to(candidates, strong)
    return _to_image(np.where(edges, 255, 0).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# binary maps


def threshold(image: Image.Image, level: float = 127, invert: bool = False) -> Image.Image:
    """Gray level (``COLOR_RGB2GRAY``) above ``level`` -> white, the rest -> black; ``invert``
    swaps the two (gray level at or below ``level`` -> white)."""
    level = _number(level, "threshold level", 0, 255)
    if not isinstance(invert, bool):
        raise ValueError(f"threshold invert must be true or false, got {invert!r}")
    bright = rgb_to_gray(_rgb_array(image)) > level
    return _to_image(np.where(bright != invert, 255, 0).astype(np.uint8))


def scribble(image: Image.Image) -> Image.Image:
    """A drawing -> white strokes on black, as ControlNet's scribble models expect.

    The rule: binarise the gray level at 127 (above -> light); the paper is whichever of light and
    dark covers more than half of the image, light on a tie. Paper becomes black, strokes white,
    so dark strokes on white paper are inverted and light strokes on black stay as they are."""
    light = rgb_to_gray(_rgb_array(image)) > 127
    paper_is_light = 2 * np.count_nonzero(light) >= light.size
    return _to_image(np.where(light != paper_is_light, 255, 0).astype(np.uint8))


def invert(image: Image.Image) -> Image.Image:
    """255 - value in each RGB channel."""
    return Image.fromarray(255 - _rgb_array(image), mode="RGB")


def none(image: Image.Image) -> Image.Image:
    """The image unchanged (as RGB): for ready-made depth, pose, normal and segmentation maps."""
    return Image.fromarray(_rgb_array(image), mode="RGB")


# ---------------------------------------------------------------------------------------------
# geometry


def fit(image: Image.Image, height: int, width: int, mode: str = "resize") -> Image.Image:
    """Bring ``image`` to exactly ``height`` x ``width`` (LANCZOS throughout).

    - ``resize``: stretch to the size, aspect ratio not kept.
    - ``crop``: scale to cover the size, keeping the aspect ratio, and keep the middle. Only the
      kept region is resampled (PIL's ``resize(box=...)``), so extreme aspect ratios stay cheap.
    - ``pad``: scale to fit inside the size, keeping the aspect ratio, centred on black.
    Where the margin to crop or pad is odd, the extra pixel goes to the right / bottom."""
    for value, what in ((height, "height"), (width, "width")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fit {what} must be a positive integer, got {value!r}")
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode must be one of {', '.join(FIT_MODES)}, got {mode!r}")
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    src_w, src_h = image.size
    if (src_w, src_h) == (width, height):
        return image
    if mode == "resize":
        return image.resize((width, height), Image.LANCZOS)

    if mode == "crop":
        scale = max(width / src_w, height / src_h)
        box_w, box_h = min(src_w, width / scale), min(src_h, height / scale)  # the kept region, in source pixels
        left, top = (src_w - box_w) // 2, (src_h - box_h) // 2
        return image.resize((width, height), Image.LANCZOS, box=(left, top, left + box_w, top + box_h))

    scale = min(width / src_w, height / src_h)
    new_w = max(1, min(width, round(src_w * scale)))
    new_h = max(1, min(height, round(src_h * scale)))
    scaled = image if (new_w, new_h) == image.size else image.resize((new_w, new_h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(scaled, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


# ---------------------------------------------------------------------------------------------
# by name (the CLI's --control NAME=IMAGE)

PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {
    "none": none,
    "canny": canny,
    "threshold": threshold,
    "scribble": scribble,
    "invert": invert,
}


def preprocess(image: Image.Image, name: str, **params) -> Image.Image:
    """Run the preprocessor called ``name`` with keyword ``params``; ValueError with one clear
    message for an unknown name, an unknown parameter or a bad value."""
    function = PREPROCESSORS.get(name)
    if function is None:
        raise ValueError(f"unknown preprocessor {name!r}; choose one of: {', '.join(PREPROCESSORS)}")
    accepted = list(inspect.signature(function).parameters)[1:]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise ValueError(f"preprocessor {name!r} has no parameter {', '.join(map(repr, unknown))}; {takes}")
    return function(image, **params)
