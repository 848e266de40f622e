"""A synthetic captioned image set: one coloured shape on a plain background, described in words.

Every scene is a :class:`Scene` (shape, colour, size, position, background, plus small jitters) that
renders to a 64x64 RGB image with anti-aliased edges and has a caption such as
``"a small red circle in the top left on a blue background"``. Everything is deterministic for a
seed, and needs only numpy and Pillow (the semantic check in :mod:`sdexport.demo.semantic` reuses the
geometry here, in environments without torch).

The attribute combinations (5 shapes x 8 colours x 7 other background colours x 2 sizes x 5
positions = 2,800) are split once, with a fixed seed, into training and held-out combinations: a
held-out caption never appears in training, while each of its words does, in other combinations.

Edge maps for the ControlNet are ``runtime.preprocess.canny`` of the scene, the same preprocessor a
user runs with ``sdexport generate --preprocess canny``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "RESOLUTION",
    "SHAPES",
    "COLORS",
    "SIZES",
    "POSITIONS",
    "Scene",
    "shape_polygon",
    "render",
    "render_mask",
    "edge_map",
    "caption",
    "all_combinations",
    "held_out_combinations",
    "training_combinations",
    "random_scene",
    "scenes",
    "held_out_scenes",
    "CAPTION_VOCABULARY",
]

RESOLUTION = 64
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges, as a real image has

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Colour names and their RGB centres, far enough apart that the nearest centre names a colour safely.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 40),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 185),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
# Shape size as a fraction of the image side (side of the shape's bounding box).
SIZES: dict[str, float] = {"small": 0.34, "large": 0.50}
# Centre of the shape as fractions of (width, height).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.50, 0.50),
}
COLOR_JITTER = 14  # +- per channel
POSITION_JITTER = 0.025  # +- fraction of the side
SIZE_JITTER = 0.05  # +- relative

HELD_OUT_SEED = 20240611
HELD_OUT_FRACTION = 0.1

STAR_INNER_RADIUS = 0.5  # relative to the outer radius: arms wide enough to survive the 4x latent grid
CROSS_ARM = 0.40  # arm width relative to the side


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str
    background: str
    # jitters, in [-1, 1]: how far this instance is from the named values
    dx: float = 0.0
    dy: float = 0.0
    dsize: float = 0.0
    fg_jitter: tuple[int, int, int] = (0, 0, 0)
    bg_jitter: tuple[int, int, int] = (0, 0, 0)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.shape, self.color, self.size, self.position, self.background)

    @property
    def caption(self) -> str:
        return caption(self.shape, self.color, self.size, self.position, self.background)

    def box(self, resolution: int = RESOLUTION) -> tuple[float, float, float, float]:
        """The shape's bounding box (x0, y0, x1, y1) in pixels."""
        side = SIZES[self.size] * (1 + SIZE_JITTER * self.dsize) * resolution
        cx, cy = POSITIONS[self.position]
        cx = (cx + POSITION_JITTER * self.dx) * resolution
        cy = (cy + POSITION_JITTER * self.dy) * resolution
        return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)

    def rgb(self, which: str) -> tuple[int, int, int]:
        base, jitter = (COLORS[self.color], self.fg_jitter) if which == "fg" else (COLORS[self.background], self.bg_jitter)
        return tuple(int(np.clip(b + j, 0, 255)) for b, j in zip(base, jitter))  # type: ignore[return-value]


def caption(shape: str, color: str, size: str | None = None, position: str | None = None,
            background: str | None = None) -> str:
    """``a [size] colour shape [in the position] [on a background background]`` ("an" before a vowel)."""
    words = ([size] if size else []) + [color, shape]
    words = [_article(words[0])] + words
    if position:
        words += ["in", "the", position]
    if background:
        words += ["on", _article(background), background, "background"]
    return " ".join(words)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


CAPTION_VOCABULARY = sorted(
    {"a", "an", "in", "the", "on", "background"}
    | set(SHAPES) | set(COLORS) | set(SIZES) | {w for p in POSITIONS for w in p.split()}
)


# --- geometry ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def shape_polygon(shape: str) -> tuple[tuple[float, float], ...] | None:
    """Vertices in the unit box [0, 1]^2 (y down), filling it; None for the circle (an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif shape == "triangle":
        pts = [(0.5, 0), (1, 1), (0, 1)]
    elif shape == "star":
        raw = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else STAR_INNER_RADIUS
            angle = -math.pi / 2 + i * math.pi / 5
            raw.append((r * math.cos(angle), r * math.sin(angle)))
        xs, ys = [p[0] for p in raw], [p[1] for p in raw]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        pts = [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in raw]
    elif shape == "cross":
        a, b = 0.5 - CROSS_ARM / 2, 0.5 + CROSS_ARM / 2
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return tuple((float(x), float(y)) for x, y in pts)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], fill) -> None:
    x0, y0, x1, y1 = box
    poly = shape_polygon(shape)
    if poly is None:
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in poly], fill=fill)


def render_mask(shape: str, box: Sequence[float], resolution: int = RESOLUTION, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage in [0, 1] (float32 [H, W]) of ``shape`` drawn in ``box`` (pixels), anti-aliased."""
    s = supersample
    big = Image.new("L", (resolution * s, resolution * s), 0)
    # pixel centres: a box edge at x covers the supersampled pixels whose centres are past x
    _draw(ImageDraw.Draw(big), shape, [v * s - 0.5 for v in box], 255)
    small = big.resize((resolution, resolution), Image.BOX)
    return np.asarray(small, np.float32) / 255.0


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image."""
    coverage = render_mask(scene.shape, scene.box(resolution), resolution)[..., None]
    fg = np.asarray(scene.rgb("fg"), np.float32)
    bg = np.asarray(scene.rgb("bg"), np.float32)
    pixels = coverage * fg + (1 - coverage) * bg
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")


def edge_map(image: Image.Image) -> Image.Image:
    """The ControlNet conditioning image: Canny edges (white on black), as ``--preprocess canny`` makes them."""
    from runtime.preprocess import canny

    return canny(image, 100, 200)


# --- the split and sampling --------------------------------------------------------------------


def all_combinations() -> list[tuple[str, str, str, str, str]]:
    """(shape, colour, size, position, background) for every allowed scene (background != colour)."""
    return [
        (shape, color, size, position, background)
        for shape, color, size, position, background in itertools.product(SHAPES, COLORS, SIZES, POSITIONS, COLORS)
        if background != color
    ]


@functools.lru_cache(maxsize=None)
def _split() -> tuple[frozenset, tuple]:
    combos = all_combinations()
    order = np.random.default_rng(HELD_OUT_SEED).permutation(len(combos))
    n_held = int(round(HELD_OUT_FRACTION * len(combos)))
    held = tuple(combos[i] for i in sorted(order[:n_held]))
    return frozenset(held), held


def held_out_combinations() -> list[tuple[str, str, str, str, str]]:
    return list(_split()[1])


def training_combinations() -> list[tuple[str, str, str, str, str]]:
    held = _split()[0]
    return [c for c in all_combinations() if c not in held]


def random_scene(rng: np.random.Generator, combos: Sequence[tuple[str, str, str, str, str]]) -> Scene:
    shape, color, size, position, background = combos[int(rng.integers(len(combos)))]
    dx, dy, dsize = (float(v) for v in rng.uniform(-1, 1, 3))
    fg = tuple(int(v) for v in rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3))
    bg = tuple(int(v) for v in rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3))
    return Scene(shape, color, size, position, background, dx, dy, dsize, fg, bg)  # type: ignore[arg-type]


def scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """``n`` random scenes of a split ("train", "held_out" or "all"), deterministic for a seed."""
    combos = {"train": training_combinations, "held_out": held_out_combinations, "all": all_combinations}[split]()
    rng = np.random.default_rng(seed)
    return [random_scene(rng, combos) for _ in range(n)]


def held_out_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` distinct held-out combinations (spread over shapes and colours), without jitter."""
    held = held_out_combinations()
    order = np.random.default_rng(seed).permutation(len(held))
    picked = [held[i] for i in order[:n]]
    return [Scene(*combo) for combo in picked]


def training_caption(scene: Scene, rng: np.random.Generator, p_drop: float = 0.15) -> str:
    """The scene's caption with size, position and background each left out with probability ``p_drop``,
    so that shorter prompts ("a red circle on a blue background") work as well."""
    keep = rng.uniform(size=3) >= p_drop
    return caption(
        scene.shape, scene.color,
        scene.size if keep[0] else None,
        scene.position if keep[1] else None,
        scene.background if keep[2] else None,
    )
