"""Depth estimators as sources: transformers' DPTForDepthEstimation with its DPTImageProcessor config.

Two layouts are read: a depth-to-image model folder (diffusers' ``depth_estimator/`` and
``feature_extractor/`` subfolders), and a transformers DPT folder (``config.json``, the weights and
``preprocessor_config.json`` side by side, as ``save_pretrained`` of the model and processor writes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from runtime.depth import DepthInputError, DptProcessorConfig
from sdexport.errors import SourceError

MODEL_PART, PROCESSOR_PART = "depth_estimator", "feature_extractor"
PROCESSOR_FILE = "preprocessor_config.json"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


@dataclasses.dataclass(frozen=True)
class DepthEstimatorSource:
    model_dir: Path  # holds config.json and the weights
    processor_file: Path  # preprocessor_config.json

    @classmethod
    def find(cls, path: str | Path) -> "DepthEstimatorSource | None":
        """The depth estimator of a depth-to-image folder or a DPT folder, or None when ``path`` has none."""
        path = Path(path)
        if (path / MODEL_PART / "config.json").is_file():
            return cls(path / MODEL_PART, path / PROCESSOR_PART / PROCESSOR_FILE)
        if (path / "config.json").is_file() and (path / PROCESSOR_FILE).is_file():
            return cls(path, path / PROCESSOR_FILE)
        return None

    @classmethod
    def open(cls, path: str | Path) -> "DepthEstimatorSource":
        """``--depth-estimator DIR``: refused in one line unless DIR holds a DPT depth estimator."""
        path = Path(path)
        if not path.is_dir():
            raise SourceError(f"--depth-estimator {path}: not a directory")
        found = cls.find(path)
        if found is None:
            raise SourceError(f"--depth-estimator {path}: neither a depth-to-image model ({MODEL_PART}/config.json) "
                              f"nor a DPT folder (config.json and {PROCESSOR_FILE})")
        found.check()
        return found

    @functools.cached_property
    def config(self) -> dict:
        return _read_json(self.model_dir / "config.json")

    @functools.cached_property
    def processor(self) -> DptProcessorConfig:
        try:
            return DptProcessorConfig.from_preprocessor_config(_read_json(self.processor_file))
        except (DepthInputError, TypeError, ValueError) as e:
            raise SourceError(f"{self.processor_file}: {e}") from None

    def check(self) -> None:
        model_type = self.config.get("model_type")
        if model_type != "dpt":
            raise SourceError(f"{self.model_dir}: a {model_type!r} model; the depth estimator must be DPT "
                              f"(transformers' DPTForDepthEstimation)")
        self.processor  # noqa: B018 - parsed here so a bad processor config fails before any export

    def load(self):
        from transformers import DPTForDepthEstimation

        try:
            return DPTForDepthEstimation.from_pretrained(str(self.model_dir)).eval()
        except Exception as e:  # transformers raises many types for bad weights
            raise SourceError(f"{self.model_dir}: cannot load the depth estimator "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    def describe(self) -> dict:
        return {"path": str(self.model_dir), "processor": str(self.processor_file)}
