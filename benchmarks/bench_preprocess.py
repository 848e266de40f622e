"""Time per 512x512 image of each control-image preprocessor (runtime.preprocess), on the CPU.

    python benchmarks/bench_preprocess.py [--repeats N] [--out benchmarks/results/preprocess-cpu.json]

Prints a markdown table (median and best of N runs, in ms) and writes the same numbers as JSON.
Where OpenCV is installed, cv2.Canny on the same input is timed too, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import preprocess as P  # noqa: E402


def test_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Shapes, lines and a little noise, softened: a photo-like control source with real edges."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (128, 120, 110))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        draw.line((x0, y1, x1, y0), fill=(0, 0, 0), width=int(rng.integers(1, 5)))
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))


def time_ms(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1000)
    return statistics.median(runs), min(runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/preprocess-cpu.json"))
    args = parser.parse_args(argv)

    image = test_image(512, 512)
    photo = test_image(768, 1024, seed=1)
    cases = {
        "canny (100, 200)": lambda: P.canny(image, 100, 200),
        "canny (10, 30)": lambda: P.canny(image, 10, 30),
        "canny gray (100, 200)": lambda: P.canny(image, 100, 200, gray=True),
        "threshold": lambda: P.threshold(image),
        "scribble": lambda: P.scribble(image),
        "invert": lambda: P.invert(image),
        "none": lambda: P.preprocess(image, "none"),
        "fit resize 1024x768 -> 512x512": lambda: P.fit(photo, 512, 512, "resize"),
        "fit crop 1024x768 -> 512x512": lambda: P.fit(photo, 512, 512, "crop"),
        "fit pad 1024x768 -> 512x512": lambda: P.fit(photo, 512, 512, "pad"),
    }
    try:
        import cv2

        rgb = np.asarray(image)
        cases["reference: cv2.Canny (100, 200)"] = lambda: cv2.Canny(rgb, 100, 200)
    except ImportError:
        cv2 = None

    rows = []
    for name, fn in cases.items():
        median, best = time_ms(fn, args.repeats)
        rows.append({"case": name, "median_ms": round(median, 3), "best_ms": round(best, 3)})

    print("| case (512x512 RGB) | median ms | best ms |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['case']} | {row['median_ms']:.2f} | {row['best_ms']:.2f} |")

    result = {
        "benchmark": "preprocess",
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": Image.__version__,
            "opencv": cv2.__version__ if cv2 else None,
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
