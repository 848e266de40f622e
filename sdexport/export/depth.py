"""The depth estimator as an exportable component (DPT), and which export gets one.

A depth-to-image model folder brings its own (``depth_estimator/`` + ``feature_extractor/``); any
other export takes one with ``--depth-estimator DIR`` (a depth-to-image folder or a transformers
DPT folder), for ``generate --preprocess depth`` with a depth ControlNet. The image processor's
settings go into the component's ``details["image_processor"]``, where the runtime reads them.
"""

from __future__ import annotations

import torch

from runtime.manifest import Component, TensorSpec
from sdexport.export.components import ComponentSpec, Shape
from sdexport.sources.depth import DepthEstimatorSource

NAME = "depth_estimator"


class DepthEstimator(torch.nn.Module):
    """DPTForDepthEstimation: normalized pixels [B, 3, H, W] -> predicted depth [B, H', W']."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values, return_dict=False)[0]


def _output_size(source: DepthEstimatorSource, height: int, width: int) -> tuple[int, int]:
    """DPT's depth map size for an input size, from the architecture run on the meta device (shapes
    only, no weights): ViT and hybrid DPTs scale differently, and the config does not say it in one field."""
    from transformers import DPTConfig, DPTForDepthEstimation

    with torch.device("meta"), torch.no_grad():
        model = DPTForDepthEstimation(DPTConfig.from_pretrained(str(source.model_dir))).eval()
        shape = model(torch.zeros((1, 3, height, width))).predicted_depth.shape
    return int(shape[-2]), int(shape[-1])


def depth_estimator_spec(source: DepthEstimatorSource) -> ComponentSpec:
    cfg = source.processor
    h, w = cfg.height, cfg.width
    # A processor that keeps the aspect ratio (or does not resize) feeds sizes that depend on the image.
    fixed = cfg.do_resize and not cfg.keep_aspect_ratio
    in_h, in_w = (h, w) if fixed else ("depth_in_h", "depth_in_w")
    out_h, out_w = _output_size(source, h, w)
    sizes = {"depth_in_h": h, "depth_in_w": w, "depth_h": out_h, "depth_w": out_w}

    def example(shape: Shape, gen: torch.Generator):
        return (torch.rand((shape.batch, 3, h, w), generator=gen) * 2 - 1,)  # normalized pixels

    return ComponentSpec(
        name=NAME,
        role=NAME,
        module=lambda: DepthEstimator(source.load()),
        inputs=(TensorSpec("pixel_values", "float32", ("B", 3, in_h, in_w)),),
        outputs=(TensorSpec("predicted_depth", "float32", ("B", "depth_h", "depth_w")),),
        example=example,
        sizes=lambda shape: {"B": shape.batch, **sizes},
    )


def depth_source(model_path, family: str, option: str | None) -> DepthEstimatorSource | None:
    """``--depth-estimator DIR`` when given, else a depth-to-image model's own estimator, else None."""
    if option:
        return DepthEstimatorSource.open(option)
    if family != "depth":
        return None
    found = DepthEstimatorSource.find(model_path)
    if found is not None:
        found.check()
    return found


def record_processor(components: dict[str, Component], source: DepthEstimatorSource | None) -> None:
    """The image processor's settings, next to the estimator they belong to."""
    if source is not None and NAME in components:
        components[NAME].details["image_processor"] = source.processor.to_json()
