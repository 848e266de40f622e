"""runtime.preprocess: Canny pixel for pixel against OpenCV, the binary maps, fit, and the errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from runtime import preprocess as P
from runtime.preprocess import PREPROCESSORS, canny, fit, invert, preprocess, rgb_to_gray, scribble, threshold

THRESHOLDS = [(100, 200), (50, 150), (10, 30), (200, 200), (0, 0), (99.5, 199.9)]


# ---------------------------------------------------------------------------------------------
# test images, drawn with Pillow and numpy from fixed seeds


def _shapes(h, w, seed, blur=0.0):
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, x1 = sorted(rng.integers(-w // 4, w + w // 4, 2).tolist())
        y0, y1 = sorted(rng.integers(-h // 4, h + h // 4, 2).tolist())
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 2:
            points = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(5)]
            draw.polygon(points, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 6)))
    return img.filter(ImageFilter.GaussianBlur(blur)) if blur else img


def _noise(h, w, seed, blur=0.0):
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.filter(ImageFilter.GaussianBlur(blur)) if blur else img


def _gradient(h, w, angle, radial=False, periods=1):
    """A linear or radial ramp, wrapped around ``periods`` times (hard edges at every wrap)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if radial:
        field = np.hypot(yy - h / 3, xx - w / 2) / np.hypot(h, w) * 2
    else:
        field = (np.cos(angle) * xx + np.sin(angle) * yy) / (w + h) + 0.5
    field = (field * periods) % 1.0
    rgb = np.stack([field, field**2, 1 - field], axis=-1) * 255
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _smooth_field(h, w, seed, noise=0.0):
    """A 'photo-like' field: a few smooth waves per channel, sharp boundaries from a quantised band."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = []
    for _ in range(3):
        waves = []
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 6)
            waves.append(rng.uniform(0.2, 1) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))
        channels.append(sum(waves))
    rgb = (np.stack(channels, -1) - np.min(channels)) / np.ptp(channels) * 255
    rgb[(rgb[..., 0] > 150) & (rgb[..., 1] < 120)] *= 0.5  # a few hard-edged regions
    rgb += rng.normal(0, noise, rgb.shape)
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def _text(h, w, seed):
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), (240, 235, 220))
    draw = ImageDraw.Draw(img)
    for row, size in enumerate((10, 14, 22, 31)):
        font = ImageFont.load_default(size)
        colour = tuple(int(v) for v in rng.integers(0, 120, 3))
        draw.text((int(rng.integers(0, 20)), 5 + row * 34), "Canny edges: sdexport 0123 AaBbQq", fill=colour, font=font)
    return img


def _steps(h, w, heights):
    """Vertical and diagonal steps whose Sobel magnitudes hit 4 x the step height: thresholds exactly."""
    a = np.full((h, w), 60, dtype=np.int32)
    for k, d in enumerate(heights):
        a[:, (k + 1) * w // (len(heights) + 1) :] += d
    yy, xx = np.mgrid[0:h, 0:w]
    a[(yy + xx) % 41 < 20] += heights[0] // 2
    a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a, mode="L").convert("RGB")


def _isoluminant(h, w):
    """Colour boundaries of (nearly) equal gray level: the RGB and the gray Canny differ here."""
    img = Image.new("RGB", (w, h), (200, 60, 60))
    draw = ImageDraw.Draw(img)
    draw.rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(60, 129, 120))
    draw.ellipse((w // 3, h // 3, w // 2, h // 2), fill=(150, 93, 80))
    return img


def _checker(h, w, cell):
    yy, xx = np.mgrid[0:h, 0:w]
    a = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    a[::7, ::5] = 128  # isolated dots
    return Image.fromarray(a, mode="L").convert("RGB")


def _sector_boundaries(h, w, seed):
    """Random ground with planted 3x3 patches whose centre has Sobel (dx, dy) = (239, 99), in all
    sign and transposed variants: 99 / 239 is within 3e-5 of tan(22.5 deg), where only OpenCV's
    exact fixed-point constant TG22 = 13573 decides between the horizontal and diagonal sectors."""
    rng = np.random.default_rng(seed)
    a = rng.integers(40, 200, (h, w)).astype(np.int32)
    patch = np.array([[0, 0, 59], [0, 0, 60], [0, 49, 60]])
    variants = [patch, patch[:, ::-1], patch[::-1], patch[::-1, ::-1]]
    variants += [v.T for v in variants]
    k = 0
    for y in range(1, h - 2, 4):
        for x in range(1, w - 2, 4):
            block = variants[k % len(variants)] + int(rng.integers(0, 140))
            block[1, 1] = int(rng.integers(0, 256))
            a[y : y + 3, x : x + 3] = block
            k += 1
    return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")


IMAGES = {
    "shapes-97x131": lambda: _shapes(97, 131, 0),
    "shapes-blur1-203x157": lambda: _shapes(203, 157, 1, blur=1.0),
    "shapes-blur2.5-150x301": lambda: _shapes(150, 301, 2, blur=2.5),
    "shapes-large-781x1037": lambda: _shapes(781, 1037, 3, blur=0.8),  # several OpenCV worker stripes
    "noise-65x67": lambda: _noise(65, 67, 4),
    "noise-blur1-129x255": lambda: _noise(129, 255, 5, blur=1.0),
    "noise-blur3-257x100": lambda: _noise(257, 100, 6, blur=3.0),
    "gradient-linear-121x83": lambda: _gradient(121, 83, 0.3),
    "gradient-wrapped-99x99": lambda: _gradient(99, 99, 2.2, periods=4),
    "gradient-wrapped-45deg-130x70": lambda: _gradient(130, 70, np.pi / 4, periods=5),
    "gradient-radial-180x133": lambda: _gradient(180, 133, 0, radial=True, periods=3),
    "field-smooth-241x173": lambda: _smooth_field(241, 173, 7),
    "field-noisy-190x310": lambda: _smooth_field(190, 310, 8, noise=6.0),
    "field-quantised-111x222": lambda: _smooth_field(111, 222, 9).quantize(12).convert("RGB"),
    "text-140x389": lambda: _text(140, 389, 10),
    "text-blur-140x389": lambda: _text(140, 389, 11).filter(ImageFilter.GaussianBlur(0.7)),
    "steps-exact-73x120": lambda: _steps(73, 120, [25, 50, 30, 75]),
    "steps-exact-odd-61x93": lambda: _steps(61, 93, [50, 25, 7]),
    "sector-boundaries-93x118": lambda: _sector_boundaries(93, 118, 17),
    "isoluminant-101x149": lambda: _isoluminant(101, 149),
    "checker-77x91": lambda: _checker(77, 91, 3),
    "checker-1px-40x33": lambda: _checker(40, 33, 1),
    "constant-31x29": lambda: Image.new("RGB", (29, 31), (90, 140, 200)),
    "single-dot-9x9": lambda: Image.fromarray(np.pad(np.full((1, 1, 3), 255, np.uint8), ((4, 4), (4, 4), (0, 0)))),
    "tiny-1x1": lambda: _noise(1, 1, 12),
    "tiny-1x17": lambda: _noise(1, 17, 13),
    "tiny-13x2": lambda: _noise(13, 2, 14),
    "tiny-3x3": lambda: _noise(3, 3, 15),
    "tiny-4x5": lambda: _noise(4, 5, 16),
}


@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) is the reference for canny")


@pytest.fixture(scope="module")
def images():
    return {name: make() for name, make in IMAGES.items()}


def _ours(image, low, high, gray):
    out = np.asarray(canny(image, low, high, gray=gray))
    assert out.shape == (image.height, image.width, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    return out[..., 0]


def _mismatch(expected, got):
    diff = np.argwhere(expected != got)
    first = diff[0].tolist()
    return f"{len(diff)} pixels differ (first at row, col {first}); OpenCV has {np.count_nonzero(expected)} edge pixels"


# ---------------------------------------------------------------------------------------------
# Canny against OpenCV


@pytest.mark.parametrize("name", list(IMAGES))
def test_canny_rgb_equals_opencv(cv2, images, name):
    """canny(image) == cv2.Canny(np.array(image), low, high): the diffusers docs' call."""
    image = images[name]
    rgb = np.array(image)
    for low, high in THRESHOLDS:
        expected = cv2.Canny(rgb, low, high)
        got = _ours(image, low, high, gray=False)
        assert np.array_equal(got, expected), f"{name} ({low}, {high}): {_mismatch(expected, got)}"


@pytest.mark.parametrize("name", list(IMAGES))
def test_canny_gray_equals_opencv(cv2, images, name):
    """canny(image, gray=True) == cv2.Canny(cv2.cvtColor(rgb, COLOR_RGB2GRAY), low, high)."""
    image = images[name]
    gray = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2GRAY)
    for low, high in THRESHOLDS:
        expected = cv2.Canny(gray, low, high)
        got = _ours(image, low, high, gray=True)
        assert np.array_equal(got, expected), f"{name} ({low}, {high}): {_mismatch(expected, got)}"


def test_canny_equals_opencv_without_ipp_and_threads(cv2, images):
    """OpenCV's plain C++ path (no IPP, one thread) gives the same edges too."""
    use_ipp, threads = cv2.ipp.useIPP(), cv2.getNumThreads()
    cv2.ipp.setUseIPP(False)
    cv2.setNumThreads(1)
    try:
        for name in ("shapes-blur1-203x157", "noise-blur1-129x255", "text-140x389", "steps-exact-73x120"):
            rgb = np.array(images[name])
            for low, high in ((100, 200), (10, 30)):
                assert np.array_equal(_ours(images[name], low, high, False), cv2.Canny(rgb, low, high)), name
                gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
                assert np.array_equal(_ours(images[name], low, high, True), cv2.Canny(gray, low, high)), name
    finally:
        cv2.ipp.setUseIPP(use_ipp)
        cv2.setNumThreads(threads)


def test_canny_input_modes_equal_opencv_on_rgb(cv2, images):
    """Gray, palette and RGBA inputs are read as image.convert('RGB')."""
    base = images["shapes-blur1-203x157"]
    for image in (base.convert("L"), base.quantize(16), base.convert("RGBA")):
        expected = cv2.Canny(np.array(image.convert("RGB")), 100, 200)
        assert np.array_equal(_ours(image, 100, 200, False), expected), image.mode


def test_canny_thresholds_are_strict_on_exact_magnitudes(images):
    """A vertical step of height d has Sobel magnitude 4d: d = 25 at low = 100 is no edge, 26 is."""
    for d, expect_edge in ((25, False), (26, True)):
        a = np.full((20, 20), 100, np.uint8)
        a[:, 10:] += d
        edges = np.asarray(canny(Image.fromarray(a).convert("RGB"), 100, 100))[..., 0]
        assert edges.any() == expect_edge, d


def test_rgb_to_gray_equals_opencv_on_every_colour(cv2):
    v = np.arange(1 << 24, dtype=np.uint32)
    every = np.stack([v >> 16, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    assert np.array_equal(rgb_to_gray(every), cv2.cvtColor(every, cv2.COLOR_RGB2GRAY))


def test_hysteresis_follows_long_weak_chains():
    """A 1-pixel spiral of weak pixels joined to one strong pixel at its centre: all of it is kept;
    a second, unconnected spiral arm without a strong pixel is dropped."""
    image = Image.new("L", (257, 263))
    draw = ImageDraw.Draw(image)
    t = np.linspace(0, 60 * np.pi, 100_000)
    r = 120 * t / t[-1]
    draw.line(list(zip(128 + r * np.cos(t), 131 + r * np.sin(t))), fill=255, width=1)
    candidates = np.asarray(image) > 0
    seeds = np.zeros_like(candidates)
    y, x = np.argwhere(candidates)[np.argmin(np.hypot(*(np.argwhere(candidates) - [131, 128]).T))]
    seeds[y, x] = True
    kept = P._connected_to(candidates, seeds)
    assert np.array_equal(kept, candidates)
    assert not P._connected_to(candidates, np.zeros_like(candidates)).any()


def test_hysteresis_matches_connected_components(cv2):
    rng = np.random.default_rng(0)
    for density in (0.05, 0.4, 0.6):
        candidates = rng.random((211, 307)) < density
        seeds = candidates & (rng.random(candidates.shape) < 0.002)
        count, labels = cv2.connectedComponents(candidates.astype(np.uint8), connectivity=8)
        keep = np.zeros(count, bool)
        keep[np.unique(labels[seeds])] = True
        keep[0] = False
        assert np.array_equal(P._connected_to(candidates, seeds), keep[labels]), density


# ---------------------------------------------------------------------------------------------
# threshold, invert, scribble, none


def _gray_image(values):
    a = np.asarray(values, dtype=np.uint8)
    return Image.fromarray(a, mode="L")


def _channel(image):
    a = np.asarray(image)
    assert image.mode == "RGB" and a.dtype == np.uint8
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    return a[..., 0]


def test_threshold_exact_values():
    image = _gray_image([[0, 127, 128], [255, 126, 200]])
    assert threshold(image).size == (3, 2)
    assert _channel(threshold(image)).tolist() == [[0, 0, 255], [255, 0, 255]]
    assert _channel(threshold(image, invert=True)).tolist() == [[255, 255, 0], [0, 255, 0]]
    assert _channel(threshold(image, level=0)).tolist() == [[0, 255, 255], [255, 255, 255]]
    assert _channel(threshold(image, level=255)).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert _channel(threshold(image, level=127.5)).tolist() == [[0, 0, 255], [255, 0, 255]]


def test_threshold_uses_opencv_gray_weights():
    # (255, 0, 0) -> 76, (0, 255, 0) -> 150, (0, 0, 255) -> 29, (2, 0, 0) -> 1 (rounded half up)
    rgb = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [2, 0, 0]]], np.uint8))
    assert _channel(threshold(rgb, level=75)).tolist() == [[255, 255, 0, 0]]
    assert _channel(threshold(rgb, level=76)).tolist() == [[0, 255, 0, 0]]
    assert _channel(threshold(rgb, level=0)).tolist() == [[255, 255, 255, 255]]


def test_invert_exact_values():
    rgb = np.array([[[0, 10, 255], [128, 127, 1]]], np.uint8)
    out = invert(Image.fromarray(rgb))
    assert out.mode == "RGB" and np.asarray(out).tolist() == [[[255, 245, 0], [127, 128, 254]]]
    rgba = Image.fromarray(np.array([[[0, 10, 255, 0]]], np.uint8), mode="RGBA")
    assert np.asarray(invert(rgba)).tolist() == [[[255, 245, 0]]]  # alpha dropped
    assert np.asarray(invert(_gray_image([[3]]))).tolist() == [[[252, 252, 252]]]


def test_scribble_dark_strokes_on_white_paper_become_white_on_black():
    paper = np.full((5, 6), 250, np.uint8)
    paper[2, 1:5] = 10  # a stroke
    paper[0, 0] = 127  # darkish noise on the paper: at 127 it counts as dark, so as a stroke
    out = _channel(scribble(_gray_image(paper)))
    expected = np.zeros((5, 6), np.uint8)
    expected[2, 1:5] = 255
    expected[0, 0] = 255
    assert np.array_equal(out, expected)


def test_scribble_keeps_light_strokes_on_black():
    board = np.full((4, 4), 5, np.uint8)
    board[1:3, 2] = 240
    out = _channel(scribble(Image.fromarray(board).convert("RGB")))
    assert np.array_equal(out, np.where(board > 127, 255, 0))


def test_scribble_tie_counts_as_light_paper():
    half = np.array([[0, 0], [255, 255]], np.uint8)
    assert _channel(scribble(_gray_image(half))).tolist() == [[255, 255], [0, 0]]


def test_none_returns_rgb_unchanged():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    out = PREPROCESSORS["none"](Image.fromarray(rgb))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), rgb)
    assert PREPROCESSORS["none"](_gray_image([[9, 200]])).mode == "RGB"


def test_every_preprocessor_returns_rgb_of_the_input_size():
    image = _shapes(37, 53, 0).convert("RGBA")
    assert set(PREPROCESSORS) == {"none", "canny", "threshold", "scribble", "invert"}
    for name in PREPROCESSORS:
        out = preprocess(image, name)
        assert out.mode == "RGB" and out.size == (53, 37), name


def test_preprocess_passes_parameters():
    image = _noise(33, 47, 1, blur=1.0)
    def same(a, b):
        return np.array_equal(np.asarray(a), np.asarray(b))

    assert same(preprocess(image, "canny", low_threshold=10, high_threshold=30), canny(image, 10, 30))
    assert same(preprocess(image, "canny", gray=True), canny(image, gray=True))
    assert same(preprocess(image, "threshold", level=90, invert=True), threshold(image, 90, True))
    assert not same(canny(image, 10, 30), canny(image))


# ---------------------------------------------------------------------------------------------
# fit


def _bands(h, w):
    """Three vertical bands of equal width: red, green, blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3, 0] = 255
    a[:, w // 3 : 2 * w // 3, 1] = 255
    a[:, 2 * w // 3 :, 2] = 255
    return a


def test_fit_resize_stretches_with_lanczos():
    image = Image.fromarray(_bands(60, 150))
    out = fit(image, 64, 48, "resize")
    assert out.size == (48, 64) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((48, 64), Image.LANCZOS)))
    assert fit(image, 60, 150).tobytes() == image.tobytes()  # already the size: unchanged


def test_fit_crop_cuts_the_middle_at_scale_one():
    a = _bands(100, 300)
    out = fit(Image.fromarray(a), 100, 100, "crop")
    assert out.size == (100, 100)
    assert np.array_equal(np.asarray(out), a[:, 100:200])  # exactly the green band


def test_fit_crop_scales_to_cover_then_centres():
    wide = np.asarray(fit(Image.fromarray(_bands(100, 300)), 64, 64, "crop"))  # scale 0.64: the green band
    assert wide.shape == (64, 64, 3)
    assert (wide[:, 4:-4] == [0, 255, 0]).all()  # away from the band edges, where LANCZOS reaches no further
    rows = np.ascontiguousarray(_bands(40, 90).transpose(1, 0, 2))  # 90 rows x 40 columns, bands of 30 rows
    tall = np.asarray(fit(Image.fromarray(rows), 30, 80, "crop"))
    # scale 2: keeps source rows 37..52 (the extra half row goes below), LANCZOS reads 34..55: all green
    assert tall.shape == (30, 80, 3) and (tall == [0, 255, 0]).all()
    up = np.asarray(fit(Image.fromarray(_bands(10, 30)), 20, 20, "crop"))  # upscaling: scale 2
    assert up.shape == (20, 20, 3) and (up[:, 6:-6] == [0, 255, 0]).all()  # 3 source pixels = 6 output


def test_fit_pad_centres_on_black():
    white = Image.new("RGB", (200, 100), (255, 255, 255))
    out = np.asarray(fit(white, 100, 100, "pad"))  # scale 0.5: 100 x 50 at rows 25..74
    assert out.shape == (100, 100, 3)
    assert (out[:25] == 0).all() and (out[75:] == 0).all() and (out[25:75] == 255).all()
    odd = np.asarray(fit(white, 101, 100, "pad"))  # 51 rows of margin: 25 above, 26 below
    assert (odd[:25] == 0).all() and (odd[25:75] == 255).all() and (odd[75:] == 0).all()
    side = np.asarray(fit(Image.new("RGB", (50, 100), (255, 255, 255)), 64, 97, "pad"))  # 32 x 64 at cols 32..63
    assert side.shape == (64, 97, 3)
    assert (side[:, :32] == 0).all() and (side[:, 32:64] == 255).all() and (side[:, 64:] == 0).all()


@pytest.mark.parametrize("mode", ["resize", "crop", "pad"])
@pytest.mark.parametrize("src", [(1, 1), (1000, 1), (1, 1000), (333, 777), (512, 512)])
@pytest.mark.parametrize("dst", [(1, 1), (64, 64), (77, 513), (600, 8)])
def test_fit_is_exactly_the_size(mode, src, dst):
    out = fit(Image.new("L", src, 200), dst[0], dst[1], mode)
    assert out.mode == "RGB" and out.size == (dst[1], dst[0])


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda im: preprocess(im, "depth"),
            "unknown preprocessor 'depth'; choose one of: none, canny, threshold, scribble, invert",
        ),
        (
            lambda im: preprocess(im, "canny", low=1),
            "preprocessor 'canny' has no parameter 'low'; it takes low_threshold, high_threshold, gray",
        ),
        (lambda im: preprocess(im, "invert", level=3), "preprocessor 'invert' has no parameter 'level'; it takes none"),
        (lambda im: preprocess(im, "canny", low_threshold=-1), "canny low_threshold must be at least 0, got -1"),
        (lambda im: preprocess(im, "canny", high_threshold=-0.5), "canny high_threshold must be at least 0, got -0.5"),
        (lambda im: canny(im, 200, 100), "canny low_threshold (200) must not exceed high_threshold (100)"),
        (lambda im: canny(im, "100", 200), "canny low_threshold must be a finite number, got '100'"),
        (lambda im: canny(im, 100, float("nan")), "canny high_threshold must be a finite number, got nan"),
        (lambda im: canny(im, gray="yes"), "canny gray must be true or false, got 'yes'"),
        (lambda im: preprocess(im, "threshold", level=256), "threshold level must be between 0 and 255, got 256"),
        (lambda im: threshold(im, -1), "threshold level must be between 0 and 255, got -1"),
        (lambda im: threshold(im, True), "threshold level must be a finite number, got True"),
        (lambda im: threshold(im, 127, invert=1), "threshold invert must be true or false, got 1"),
        (lambda im: fit(im, 64, 64, "stretch"), "fit mode must be one of resize, crop, pad, got 'stretch'"),
        (lambda im: fit(im, 0, 64), "fit height must be a positive integer, got 0"),
        (lambda im: fit(im, 64, 64.0), "fit width must be a positive integer, got 64.0"),
        (lambda im: canny(np.zeros((4, 4), np.uint8)), "expected a PIL image, got ndarray"),
    ],
)
def test_errors_have_one_clear_message(call, message):
    with pytest.raises(ValueError) as info:
        call(Image.new("RGB", (8, 8)))
    assert str(info.value) == message


def test_import_loads_neither_torch_nor_opencv():
    heavy = ("torch", "cv2", "scipy", "skimage", "diffusers", "sdexport")
    code = f"import sys, runtime.preprocess\nprint(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == ""
