"""What every benchmark shares: machine description, robust timing, result files (JSON, markdown, PNG)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from sdexport.measure.machine import machine_info  # noqa: F401  (re-exported for the scripts)
from sdexport.measure.timing import timeit  # noqa: F401  (re-exported for the scripts)
from sdexport.demo.tiny import save_sd15_random, save_tiny_pipeline

RESULTS = Path(__file__).resolve().parent / "results"


def prepare_model(kind: str, work: Path) -> Path:
    """The benchmark's diffusers folder under ``work``: the SD 1.5 architecture (random weights) or the tiny pipeline."""
    src = work / f"{kind}-diffusers"
    if not (src / "model_index.json").exists():
        print(f"building {kind} model in {src}", file=sys.stderr)
        save_sd15_random(src) if kind == "sd15" else save_tiny_pipeline(src, "sd1")
    return src


def unet_feeds(info, size: int, with_control: bool = False) -> dict[str, np.ndarray]:
    """One U-Net call's inputs at ``size`` pixels, batch 2 (CFG), seeded; with ControlNet residuals on request."""
    h = size // info.vae_scale_factor
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, info.unet_in_channels, h, h), np.float32),
        "timestep": np.full((2,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, info.max_length, info.text_hidden_size), np.float32),
    }
    if with_control:
        from sdexport.export.components import Shape, _residual_sizes, residual_names

        sizes = _residual_sizes(Shape(1, size, size), info)
        for name, (ch, s) in zip(residual_names(info), info.control_residuals):
            hs = sizes["h"] if s == 1 else sizes[f"h_{s}"]
            feeds[name] = rng.standard_normal((2, ch, hs, hs), np.float32)
    return feeds


def write_results(name: str, data: dict, markdown: str, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    return out_dir


def bar_chart(path: Path, title: str, labels: list[str], values: list[float], unit: str = "ms") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(labels)))
    bars = ax.barh(labels[::-1], values[::-1], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values[::-1]], padding=3, fontsize=8)
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
