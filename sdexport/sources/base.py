"""What every model source is (:class:`Source`), and the message helper the source modules share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Source(Protocol):
    """A Stable Diffusion model to export: a diffusers folder, a single-file checkpoint, or either
    with LoRAs fused or a few-step scheduler laid over it (``sdexport.sources.open.open_source``).

    ``path`` is a folder holding ``model_index.json`` and ``scheduler/scheduler_config.json`` (the
    files an export copies); the configs are diffusers' ``config.json`` dicts; the loaders return
    float32 modules in eval mode; ``describe()`` is a JSON-able dict for the manifest.
    """

    @property
    def path(self) -> Path: ...

    @property
    def unet_config(self) -> dict: ...

    @property
    def vae_config(self) -> dict: ...

    @property
    def text_encoder_config(self) -> dict: ...

    @property
    def scheduler_config(self) -> dict: ...

    @property
    def tokenizer_dir(self) -> Path: ...

    @property
    def pipeline_class(self) -> str: ...

    def load_unet(self) -> "torch.nn.Module": ...

    def load_vae(self) -> "torch.nn.Module": ...

    def load_text_encoder(self) -> "torch.nn.Module": ...

    def describe(self) -> dict: ...


def sample_names(names: Iterable[str], n: int = 3) -> str:
    """The first ``n`` names and how many more, for one-line messages."""
    names = list(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def model_index(source) -> dict:
    """A folder source's model_index.json (the pipeline's own config): {} where there is none, as for a
    single file; SourceError naming the file when it is not valid JSON."""
    from sdexport.errors import SourceError

    path = Path(source.path) / "model_index.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
