"""Does an image show what its caption asks for? A geometric measurement, no trained classifier.

For the single-shape scenes of :mod:`sdexport.demo.data`:

1. background colour: the per-channel median of the image border (a shape covers well under half of it);
2. foreground: pixels far from that colour (more than half the way to the most distant ones), the
   largest 4-connected blob, holes filled; a soft coverage map (distance / shape contrast) beside it;
3. shape colour: the median of the blob's inner pixels, named by the nearest colour centre;
4. shape class: each shape's template is drawn (anti-aliased) into the blob's bounding box, also
   slightly blurred and enlarged (decoded images have soft edges, which hard templates would read
   as round), and compared with the soft coverage map (intersection over union): the best wins;
5. position: the bounding-box centre, named by the nearest anchor (four quadrants and the centre);
6. size: the bounding-box side, named by the nearest size.

Needs numpy and Pillow only, so it also runs where only the runtime is installed.

>>> score(image, "a small red circle in the top left on a blue background")["color_and_shape"]
True
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from sdexport.demo.data import COLORS, POSITIONS, SHAPES, SIZES, render_mask

__all__ = ["Analysis", "analyse", "parse_caption", "score", "accuracy", "ATTRIBUTES"]

ATTRIBUTES = ("color", "shape", "position", "size", "background")
MIN_CONTRAST = 40.0  # RGB distance: below this no shape is told apart from the background
# Images decoded from a 16x16 latent grid have soft edges; a template with hard edges would favour
# round shapes, so each template is also compared blurred (sigma in pixels) and in a slightly larger box.
TEMPLATE_BLURS = (0.0, 0.75, 1.25)
TEMPLATE_MARGINS = (0.0, 0.5, 1.0)
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[n] for n in _PALETTE_NAMES], np.float32)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What the measurement saw. ``shape`` etc. are None when no foreground was found."""

    background: str
    color: str | None
    shape: str | None
    position: str | None
    size: str | None
    box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (inclusive) in pixels
    shape_iou: dict[str, float]
    contrast: float  # RGB distance between shape and background colours

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    return arr.astype(np.float32)


def name_color(rgb: Sequence[float]) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, np.float32)) ** 2).sum(1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (breadth-first search; images are small)."""
    h, w = mask.shape
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels not connected to the image border become foreground."""
    padded = np.pad(~mask, 1, constant_values=True)
    outside = _largest_component(padded)  # the padding ring joins every border-connected region
    return mask | ~outside[1:-1, 1:-1]


def _nearest(value, anchors: dict) -> str:
    return min(anchors, key=lambda k: float(np.sum((np.asarray(anchors[k]) - value) ** 2)))


def analyse(image) -> Analysis:
    img = _as_array(image)
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = name_color(bg)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    far = float(np.percentile(dist, 99.5))
    if far < MIN_CONTRAST:
        return Analysis(background, None, None, None, None, None, {}, far)
    blob = _fill_holes(_largest_component(dist > far / 2))
    ys, xs = np.nonzero(blob)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())

    # colour: the inner pixels (clearly past the half-way edge), median per channel
    inner = blob & (dist > 0.75 * far)
    if inner.sum() < 4:
        inner = blob
    fg = np.median(img[inner], axis=0)
    contrast = float(np.sqrt(((fg - bg) ** 2).sum()))
    color = name_color(fg)

    # shape: soft coverage (each pixel's position on the line from the background colour to the shape
    # colour, so a halo of another colour does not count) against each template
    axis = (fg - bg) / max(contrast, 1e-6) ** 2
    coverage = np.clip(((img - bg) * axis).sum(-1), 0.0, 1.0)
    coverage = np.where(_dilate(blob, 2), coverage, 0.0)
    ious = {shape: _best_iou(coverage, shape, (x0, y0, x1 + 1, y1 + 1)) for shape in SHAPES}  # pixel x spans [x, x+1)
    shape = max(ious, key=ious.get)

    centre = np.array([(x0 + x1 + 1) / 2 / w, (y0 + y1 + 1) / 2 / h])
    position = _nearest(centre, POSITIONS)
    side = max(x1 - x0 + 1, y1 - y0 + 1) / max(h, w)
    size = _nearest(np.array([side]), {k: [v] for k, v in SIZES.items()})
    return Analysis(background, color, shape, position, size, (x0, y0, x1, y1), ious, contrast)


def _best_iou(coverage: np.ndarray, shape: str, box) -> float:
    """Soft intersection over union with the shape's template in ``box``, the best over a few edge
    softnesses and box margins (a thresholded soft edge puts the box a little inside the shape)."""
    h, w = coverage.shape
    best = 0.0
    for margin in TEMPLATE_MARGINS:
        grown = (box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin)
        template = render_mask(shape, grown, resolution=h) if h == w else _render_rect(shape, grown, h, w)
        for sigma in TEMPLATE_BLURS:
            soft = _blur(template, sigma)
            union = np.maximum(coverage, soft).sum()
            if union > 0:
                best = max(best, float(np.minimum(coverage, soft).sum() / union))
    return best


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur as two small matrix products (images are at most a few hundred pixels wide)."""
    if sigma <= 0:
        return x
    mats = []
    for n in x.shape:
        i = np.arange(n)
        k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
        mats.append(k / k.sum(1, keepdims=True))
    return mats[0] @ x @ mats[1].T


def _render_rect(shape: str, box, h: int, w: int) -> np.ndarray:
    side = max(h, w)
    return render_mask(shape, box, resolution=side)[:h, :w]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def parse_caption(caption: str) -> dict[str, str | None]:
    """The attributes a caption asks for (None where it says nothing)."""
    words = caption.lower().replace(",", " ").split()
    out: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    for i, word in enumerate(words):
        if word in SHAPES and out["shape"] is None:
            out["shape"] = word
            if i > 0 and words[i - 1] in COLORS:
                out["color"] = words[i - 1]
        elif word == "background" and i > 0 and words[i - 1] in COLORS:
            out["background"] = words[i - 1]
        elif word in SIZES and out["size"] is None:
            out["size"] = word
    text = " ".join(words)
    for position in sorted(POSITIONS, key=len, reverse=True):
        if f"in the {position}" in text:
            out["position"] = position
            break
    return out


def score(image, caption: str) -> dict:
    """Per attribute the caption names: whether the image shows it; plus ``color_and_shape``
    (the pass criterion) and what was measured."""
    wanted = parse_caption(caption)
    seen = analyse(image)
    result: dict = {"caption": caption}
    for attr in ATTRIBUTES:
        if wanted[attr] is not None:
            result[attr] = getattr(seen, attr) == wanted[attr]
    result["color_and_shape"] = bool(result.get("color") and result.get("shape"))
    result["seen"] = {a: getattr(seen, a) for a in ATTRIBUTES}
    result["shape_iou"] = seen.shape_iou.get(seen.shape) if seen.shape else None
    return result


def accuracy(scores: Iterable[dict]) -> dict:
    """Fraction correct per attribute (over the scores that name it) and for colour and shape together."""
    scores = list(scores)
    out = {"n": len(scores)}
    for key in ("color_and_shape", *ATTRIBUTES):
        values = [s[key] for s in scores if key in s]
        if values:
            out[key] = round(sum(values) / len(values), 4)
    return out
