"""Single-file checkpoints (A1111 / ComfyUI / CompVis layout) as model sources, and their file format.

A single file holds the U-Net, the VAE and the text encoder under the original LDM names
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``) or, less often, under
diffusers names with a component prefix (``unet.*``, ``vae.*``, ``text_encoder.*``). Nothing in it says
which architecture it is, so :func:`detect` reads the tensor names and shapes:

- text encoder: ``cond_stage_model.transformer.*`` is OpenAI CLIP (SD 1.x), ``cond_stage_model.model.*``
  is OpenCLIP (SD 2.x), the U-Net's cross-attention width (768 or 1024) must agree;
- inpainting: the U-Net's ``conv_in`` takes 9 channels (latents + mask + masked-image latents);
- the prediction type (epsilon or v) is not in the weights: an explicit hint, then an A1111-style
  ``<checkpoint>.yaml`` beside the file (``parameterization: "v"``), then the family default
  (v for SD 2.x at 768 px, as diffusers and A1111 assume).

The architecture comes from a config folder shipped under ``sdexport/sources/configs/<family>`` (diffusers
``config.json`` files, no weights) or from ``config=`` (any diffusers folder: the tiny test models use
this). Tensors are renamed with diffusers' own conversion functions, which only move, slice and
reshape them, so a converted model is bitwise equal to its diffusers folder. Every check runs on
shapes at open time (tensors on the meta device), before any weight is read; weights are read one
component at a time, tensor by tensor, with plain file reads (no memory map that would keep the whole
file resident).

``.ckpt`` files are loaded with ``torch.load(weights_only=True)``. Training artifacts that the
weights-only unpickler refuses (PyTorch Lightning callbacks, numpy scalars) are replaced by inert
stubs; a pickle that calls anything able to run code (``os.system``, ``eval``, ...) is refused.

The reverse direction, :func:`write_single_file`, writes a diffusers pipeline in the original layout
(tests and benchmarks build their checkpoints with it); :class:`SafetensorsWriter` streams tensors
into a ``.safetensors`` file without holding them all in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from sdexport.errors import SourceError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
PARTS = ("unet", "vae", "text_encoder")

# ---------------------------------------------------------------------------------------------
# The safetensors format: 8-byte little-endian header size, a JSON header, then the raw tensor bytes.
# ---------------------------------------------------------------------------------------------

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, int] | None = None  # byte range in a safetensors data section

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    def meta(self) -> torch.Tensor:
        """A tensor of this shape and dtype that holds no data (for shape-only conversions)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sniff(path: Path) -> str:
    """'safetensors' or 'pickle' (a torch.save file), from the first bytes; SourceError otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise SourceError(f"{path}: empty file, not a checkpoint")
    if head[:4] == b"PK\x03\x04":
        return "pickle"  # torch.save's zip container
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # torch.save's legacy format (a pickle stream)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER and head[8:9] == b"{":
            return "safetensors"
    raise SourceError(f"{path}: neither a safetensors file nor a PyTorch checkpoint (it starts with {head[:8]!r})")


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Tensor names, shapes, dtypes and byte ranges, the ``__metadata__`` dict, and where the data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SourceError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise SourceError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: corrupt safetensors header (bad entry for {name!r}: {entry!r:.100})") from None
        info = TensorInfo(shape, dtype, (begin, stop))
        if min(shape, default=0) < 0 or stop - begin != info.nbytes:
            raise SourceError(f"{path}: corrupt safetensors header ({name!r}: {shape} {entry['dtype']} in {stop - begin} bytes)")
        tensors[name] = info
        end = max(end, stop)
    if 8 + n + end > size:
        raise SourceError(
            f"{path}: truncated file: its header describes {8 + n + end:,} bytes but the file has {size:,}"
        )
    return tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + n


class Checkpoint:
    """A checkpoint file opened for reading: names, shapes and dtypes up front, tensors one at a time.

    ``get`` returns a fresh tensor read with a plain ``readinto`` (safetensors), so reading a whole
    model tensor by tensor keeps only what the caller keeps; no memory map pins the file's pages.
    """

    def __init__(self, path: Path, kind: str, tensors: dict[str, TensorInfo], metadata: dict[str, str],
                 data_start: int = 0, state: dict[str, torch.Tensor] | None = None):
        self.path, self.kind, self.tensors, self.metadata = path, kind, tensors, metadata
        self._data_start, self._state = data_start, state
        self._file = None

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if not path.exists():
            raise SourceError(f"{path}: no such file or directory")
        if path.is_dir():
            raise SourceError(f"{path}: is a directory, not a checkpoint file")
        kind = sniff(path)
        if kind == "safetensors":
            tensors, metadata, start = read_safetensors_header(path)
            return cls(path, kind, tensors, metadata, data_start=start)
        state = load_pickle_checkpoint(path)
        infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}
        return cls(path, "ckpt", infos, {}, state=state)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.get_rows(name, 0, info.shape[0]) if info.shape else self._read(name, 0, info.nbytes, info.shape)

    def get_rows(self, name: str, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along its first dimension), read on their own; into the
        front of ``into`` (a flat uint8 tensor large enough) when given, else into a new buffer."""
        info = self.tensors[name]
        if self._state is not None:
            return self._state[name][start:stop] if info.shape else self._state[name]
        row = math.prod(info.shape[1:]) * _itemsize(info.dtype)
        return self._read(name, start * row, (stop - start) * row, (stop - start, *info.shape[1:]), into)

    def _read(self, name: str, offset: int, nbytes: int, shape: tuple[int, ...],
              into: torch.Tensor | None = None) -> torch.Tensor:
        info = self.tensors[name]
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        if self._file is None:
            self._file = open(self.path, "rb")
        buffer = bytearray(nbytes) if into is None else memoryview(into.numpy())[:nbytes]
        self._file.seek(self._data_start + info.offsets[0] + offset)
        if self._file.readinto(buffer) != nbytes:
            raise SourceError(f"{self.path}: truncated file (tensor {name!r} is cut short)")
        if into is not None:
            return into[:nbytes].view(info.dtype).reshape(shape)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsWriter:
    """Write a ``.safetensors`` file tensor by tensor: the header is fixed first from names, dtypes and
    shapes, then each tensor is appended in that order. The file appears under its name only once
    complete (written beside it and renamed), so an interrupted write leaves nothing that looks whole."""

    def __init__(self, path: str | Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._entries = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in entries]
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in self._entries:
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self._rows = 0  # rows of the current tensor written so far (write_rows)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self._entries[self._next] if self._next < len(self._entries) else (None, None, None)
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape or self._rows:
            raise ValueError(f"expected {expected} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self._append(tensor)
        self._next += 1

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """Append the next rows (first dimension) of the current tensor; it is complete after its last row."""
        expected, dtype, shape = self._entries[self._next] if self._next < len(self._entries) else (None, None, None)
        if name != expected or rows.dtype != dtype or not shape or tuple(rows.shape[1:]) != shape[1:] \
                or self._rows + rows.shape[0] > shape[0]:
            raise ValueError(f"expected rows of {expected} {dtype} {shape}, got {name} {rows.dtype} {tuple(rows.shape)}")
        self._append(rows)
        self._rows += rows.shape[0]
        if self._rows == shape[0]:
            self._next, self._rows = self._next + 1, 0

    def _append(self, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> Path:
        if self._next != len(self._entries):
            raise ValueError(f"{len(self._entries) - self._next} tensors were not written")
        self._file.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a dict of tensors (in its order), atomically."""
    with SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# .ckpt: weights-only unpickling, inert stubs for training artifacts, refusal of code.
# ---------------------------------------------------------------------------------------------

_CODE_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "runpy", "importlib", "builtins",
                 "__builtin__", "code", "pty", "webbrowser", "ctypes", "pickle", "marshal", "types", "operator",
                 "functools", "io", "pathlib", "urllib", "http", "requests", "signal", "multiprocessing", "threading"}
_HARMLESS_BUILTINS = {"builtins.set", "__builtin__.set", "builtins.frozenset", "builtins.slice", "builtins.complex"}


def _stub(name: str) -> type:
    """An inert class standing in for ``name``: constructing or restoring it runs no code of the original."""
    return type(name.rpartition(".")[2] or "Stub", (), {
        "__init__": lambda self, *args, **kwargs: None,
        "__setstate__": lambda self, state: None,
        "__module__": "sdexport.sources.single_file.stubs",
    })


def load_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch.save file (``state_dict`` nesting removed), without executing pickled code."""
    import pickle

    is_zip = zipfile.is_zipfile(path)
    load = functools.partial(torch.load, path, map_location="cpu", weights_only=True, mmap=is_zip)
    try:
        try:
            obj = load()
        except pickle.UnpicklingError:
            if not is_zip:
                raise
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            code = [n for n in names if n.split(".")[0] in _CODE_MODULES and n not in _HARMLESS_BUILTINS]
            if code:
                raise SourceError(
                    f"{path}: refusing to load: its pickle calls {', '.join(code[:3])}, which can run code; "
                    "convert it to .safetensors with a tool you trust"
                ) from None
            with torch.serialization.safe_globals([(_stub(n), n) for n in names]):
                obj = load()
    except SourceError:
        raise
    except pickle.UnpicklingError as e:
        raise SourceError(f"{path}: cannot load without running pickled code ({str(e).splitlines()[-1][:160]})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SourceError(f"{path}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {first})") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: a PyTorch file, but not a state dict ({type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise SourceError(f"{path}: a PyTorch file without tensors")
    return tensors


# ---------------------------------------------------------------------------------------------
# Detection: which layout and family a set of tensor names and shapes is.
# ---------------------------------------------------------------------------------------------

LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
DIFFUSERS_PREFIX = {"unet": "unet.", "vae": "vae.", "text_encoder": "text_encoder."}

FAMILY_DESCRIPTIONS = {
    "sd1": "SD 1.x",
    "sd1-inpainting": "SD 1.x inpainting",
    "sd2-base": "SD 2.x base (epsilon)",
    "sd2-v": "SD 2.x v-prediction",
    "sd2-inpainting": "SD 2.x inpainting",
}
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class Detected:
    layout: str  # "ldm" (A1111 / CompVis names) or "diffusers" (unet./vae./text_encoder. prefixes)
    text_encoder: str  # "clip" (SD 1.x) or "openclip" (SD 2.x)
    in_channels: int  # U-Net input channels: 4, or 9 for inpainting
    cross_attention_dim: int | None

    def family(self, prediction_type: str | None) -> str:
        sd = "sd1" if self.text_encoder == "clip" else "sd2"
        if self.in_channels == 9:
            return f"{sd}-inpainting"
        if sd == "sd1":
            return "sd1"
        return "sd2-base" if prediction_type == "epsilon" else "sd2-v"


def _sample(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _not_a_model(tensors: Mapping[str, TensorInfo]) -> str | None:
    """Why this file is something else than an SD 1.x/2.x model, if it is recognisably something else."""
    keys = list(tensors)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_A." in k or ".lora_down." in k
           or ".lora.down." in k or "lora_linear_layer" in k for k in keys):
        return "this is a LoRA, not a model: pass it to export with --lora FILE[:SCALE]"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint: sdexport exports SD 1.x and SD 2.x models"
    if any(k.startswith("control_model.") for k in keys) or "controlnet_cond_embedding.conv_in.weight" in tensors:
        return "a ControlNet checkpoint, not a full model: pass a diffusers ControlNet folder with --controlnet"
    if any("joint_blocks." in k or "double_blocks." in k for k in keys):
        return "an SD3 / Flux checkpoint: sdexport exports SD 1.x and SD 2.x models"
    if "encoder.down.0.block.0.conv1.weight" in tensors or "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors:
        return "a standalone VAE, not a full model"
    if "conv_in.weight" in tensors and "time_embedding.linear_1.weight" in tensors:
        return "a bare U-Net, not a full model (no VAE or text encoder)"
    return None


def detect(tensors: Mapping[str, TensorInfo], path: Path | str = "checkpoint") -> Detected:
    """The layout, text encoder kind and U-Net input channels of a single-file SD 1.x/2.x model."""
    if "model.diffusion_model.input_blocks.0.0.weight" in tensors:
        layout, conv_in = "ldm", "model.diffusion_model.input_blocks.0.0.weight"
        if any(k.startswith(CLIP_PREFIX) for k in tensors):
            text = "clip"
        elif any(k.startswith(OPENCLIP_PREFIX) for k in tensors):
            text = "openclip"
        else:
            reason = _not_a_model(tensors)
            raise SourceError(f"{path}: {reason}" if reason else
                              f"{path}: a U-Net without a known text encoder (no cond_stage_model.transformer.* "
                              f"or cond_stage_model.model.* tensors)")
        if not any(k.startswith(LDM_PREFIX["vae"]) for k in tensors):
            raise SourceError(f"{path}: the checkpoint has no VAE (first_stage_model.* tensors)")
        unet_prefix = LDM_PREFIX["unet"]
    elif "unet.conv_in.weight" in tensors and any(k.startswith("vae.") for k in tensors) and any(
            k.startswith("text_encoder.") for k in tensors):
        layout, conv_in, unet_prefix = "diffusers", "unet.conv_in.weight", "unet."
        # Names do not tell CLIP from OpenCLIP here; SD 2.x's cross-attention is 1024 wide.
        text = "openclip" if _cross_dim(tensors, unet_prefix) == 1024 else "clip"
    else:
        reason = _not_a_model(tensors)
        if reason:
            raise SourceError(f"{path}: {reason}")
        raise SourceError(
            f"{path}: unknown checkpoint layout: no Stable Diffusion U-Net (model.diffusion_model.* or unet.*) in "
            f"its {len(tensors)} tensors, e.g. {_sample(sorted(tensors))}"
        )
    in_channels = tensors[conv_in].shape[1]
    if in_channels == 5:
        raise SourceError(f"{path}: a depth-conditioned SD 2 model (5-channel U-Net input): not supported")
    if in_channels == 8:
        raise SourceError(f"{path}: an InstructPix2Pix-style model (8-channel U-Net input): not supported")
    if in_channels not in (4, 9):
        raise SourceError(f"{path}: U-Net with {in_channels} input channels: not an SD 1.x/2.x model this version knows")
    return Detected(layout, text, in_channels, _cross_dim(tensors, unet_prefix))


def _cross_dim(tensors: Mapping[str, TensorInfo], unet_prefix: str) -> int | None:
    for k, info in tensors.items():
        if k.startswith(unet_prefix) and k.endswith("attn2.to_k.weight"):
            return info.shape[1]
    return None


def sidecar_prediction_type(path: Path) -> str | None:
    """``parameterization`` from an A1111-style ``<name>.yaml`` beside the checkpoint (LDM config)."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        params = config.get("model", {}).get("params", {}) or {}
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as e:
        raise SourceError(f"{yaml_path}: cannot read this LDM config ({type(e).__name__})") from None
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


# ---------------------------------------------------------------------------------------------
# Conversion: original (LDM) names <-> diffusers names.
# Forward uses diffusers' functions; the reverse (for writing single files) is written out here
# and checked against the forward one in the tests.
# ---------------------------------------------------------------------------------------------


def _has_text_model_wrapper(model) -> bool:
    return hasattr(model, "text_model")


def to_diffusers(part: str, tensors: dict[str, torch.Tensor], layout: str, text_kind: str, config: dict,
                 text_model=None) -> dict[str, torch.Tensor]:
    """Rename one component's tensors (full checkpoint names in, diffusers names out). Works on meta tensors."""
    if layout == "diffusers":
        prefix = DIFFUSERS_PREFIX[part]
        out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        from diffusers.loaders import single_file_utils as sfu

        if part == "unet":
            out = sfu.convert_ldm_unet_checkpoint(tensors, config)
        elif part == "vae":
            out = sfu.convert_ldm_vae_checkpoint(tensors, config)
        elif text_kind == "clip":
            out = sfu.convert_ldm_clip_checkpoint(tensors)
        else:
            out = _openclip_to_diffusers(tensors, config, text_model)
    if part == "text_encoder":
        flat = text_model is None or not _has_text_model_wrapper(text_model)
        if flat:
            out = {k.removeprefix("text_model."): v for k, v in out.items()}
        out.pop("embeddings.position_ids", None)
        out.pop("text_model.embeddings.position_ids", None)
        # SD 2.x uses OpenCLIP's penultimate layer: diffusers keeps the first num_hidden_layers layers.
        n = int(config.get("num_hidden_layers", 0))
        layer = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")
        out = {k: v for k, v in out.items() if not ((m := layer.match(k)) and int(m.group(1)) >= n)}
    return out


def _openclip_to_diffusers(tensors: dict[str, torch.Tensor], config: dict, text_model) -> dict[str, torch.Tensor]:
    from diffusers.loaders import single_file_utils as sfu

    # diffusers drops the 24th layer of OpenCLIP-H by name; layers past num_hidden_layers are dropped
    # by to_diffusers for any depth. The q/k/v split width is the hidden size (text_projection's rows).
    hidden = int(config["hidden_size"])
    proj = OPENCLIP_PREFIX + "text_projection"
    tensors = dict(tensors)
    if proj not in tensors or tensors[proj].shape[0] != hidden:
        tensors[proj] = torch.empty((hidden, hidden), device="meta")
    return sfu.convert_open_clip_checkpoint(text_model, tensors, prefix=OPENCLIP_PREFIX)


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP_TO_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_rest(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_name_to_ldm(name: str, config: Mapping) -> str:
    """A diffusers U-Net parameter (or module) name -> its name under ``model.diffusion_model.``."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("per-block layer counts are not an SD 1.x/2.x U-Net")
    step = per_block + 1
    for src, dst in _UNET_TOP_TO_LDM.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", name)
    if m:
        kind, b, sub, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if sub == "resnets":
                return f"input_blocks.{1 + b * step + j}.0.{_resnet_rest(rest, _RESNET_TO_LDM)}"
            if sub == "attentions":
                return f"input_blocks.{1 + b * step + j}.1.{rest}"
            return f"input_blocks.{1 + b * step + per_block}.0.op.{rest.removeprefix('conv.')}"
        if sub == "resnets":
            return f"output_blocks.{b * step + j}.0.{_resnet_rest(rest, _RESNET_TO_LDM)}"
        if sub == "attentions":
            return f"output_blocks.{b * step + j}.1.{rest}"
        has_attention = str(config["up_block_types"][b]).startswith("CrossAttn")
        return f"output_blocks.{b * step + per_block}.{2 if has_attention else 1}.conv.{rest.removeprefix('conv.')}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        sub, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if sub == "resnets":
            return f"middle_block.{2 * j}.{_resnet_rest(rest, _RESNET_TO_LDM)}"
        return f"middle_block.1.{rest}"
    raise KeyError(name)


_VAE_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_name_to_ldm(name: str, config: Mapping) -> str:
    """A diffusers VAE parameter name -> its name under ``first_stage_model.``."""
    n_blocks = len(config["block_out_channels"])
    side, _, rest = name.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return name
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return name
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", rest)
    if m:
        kind, i, sub, j, tail = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if sub == "resnets":
                return f"{side}.down.{i}.block.{j}.{_resnet_rest(tail, _VAE_RESNET_TO_LDM)}"
            return f"{side}.down.{i}.downsample.{tail}"
        level = n_blocks - 1 - i
        if sub == "resnets":
            return f"{side}.up.{level}.block.{j}.{_resnet_rest(tail, _VAE_RESNET_TO_LDM)}"
        return f"{side}.up.{level}.upsample.{tail}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", rest)
    if m:
        sub, j, tail = m.group(1), int(m.group(2)), m.group(3)
        if sub == "resnets":
            return f"{side}.mid.block_{j + 1}.{_resnet_rest(tail, _VAE_RESNET_TO_LDM)}"
        head, _, end = tail.partition(".")
        if head == "to_out":
            end = end.removeprefix("0.")
        return f"{side}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[head]}.{end}"
    raise KeyError(name)


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def to_original(part: str, state: Mapping[str, torch.Tensor], config: Mapping, text_kind: str = "clip",
                extra_openclip_layer: bool = True) -> dict[str, torch.Tensor]:
    """One component's diffusers state dict -> original (LDM) names and shapes. Works on meta tensors.

    OpenCLIP: q/k/v are stacked into ``in_proj``, and (like a real SD 2.x file) one more layer follows
    the ones diffusers keeps (here a copy of the last one: SD 2.x uses the penultimate layer, so it is
    never used), plus ``text_projection`` and ``logit_scale``.
    """
    out: dict[str, torch.Tensor] = {}
    if part == "unet":
        for k, v in state.items():
            out[LDM_PREFIX["unet"] + unet_name_to_ldm(k, config)] = v
        return out
    if part == "vae":
        for k, v in state.items():
            name = vae_name_to_ldm(k, config)
            if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2:
                v = v.reshape(*v.shape, 1, 1)  # LDM's attention uses 1x1 convolutions
            out[LDM_PREFIX["vae"] + name] = v
        return out
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if text_kind == "clip":
        for k, v in state.items():
            out[CLIP_PREFIX + "text_model." + k] = v
        n = state["embeddings.position_embedding.weight"].shape[0]
        device = state["embeddings.position_embedding.weight"].device
        out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(n, device=device).unsqueeze(0)
        return out
    p = OPENCLIP_PREFIX
    hidden = state["final_layer_norm.weight"].shape[0]
    device = state["final_layer_norm.weight"].device
    out[p + "positional_embedding"] = state["embeddings.position_embedding.weight"]
    out[p + "token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"^encoder\.layers\.(\d+)\.", k))})
    sources = [(i, i) for i in layers] + ([(len(layers), layers[-1])] if extra_openclip_layer and layers else [])
    for i, src in sources:
        s, d = f"encoder.layers.{src}.", f"transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            out[p + d + f"attn.in_proj_{suffix}"] = torch.cat(
                [state[s + f"self_attn.{q}_proj.{suffix}"] for q in ("q", "k", "v")], 0)
            for dn, ln in _OPENCLIP_LAYER.items():
                out[p + d + f"{ln}.{suffix}"] = state[s + f"{dn}.{suffix}"]
    out[p + "ln_final.weight"] = state["final_layer_norm.weight"]
    out[p + "ln_final.bias"] = state["final_layer_norm.bias"]
    out[p + "text_projection"] = torch.eye(hidden, device=device)
    out[p + "logit_scale"] = torch.tensor(4.6052, device=device)
    return out


# ---------------------------------------------------------------------------------------------
# Building empty models from configs, loading converted weights into them.
# ---------------------------------------------------------------------------------------------


def read_configs(folder: Path) -> dict[str, dict]:
    configs = {}
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("scheduler", "scheduler_config.json")):
        path = folder / part / name
        try:
            configs[part] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SourceError(f"{path}: missing (a config folder needs unet/, vae/, text_encoder/ and scheduler/ configs)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: not valid JSON ({e})") from None
    return configs


def empty_model(part: str, config: dict):
    """The component's module with parameters on the meta device (buffers real), from its config."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if part == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if part == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel

        fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
        return CLIPTextModel(CLIPTextConfig(**fields))


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fill_model(model, state: dict[str, torch.Tensor], where: str):
    """Load converted tensors (as float32 where floating) into an empty model; every parameter must come."""
    for k in list(state):  # one tensor at a time: an fp16 file never sits in memory twice
        if state[k].is_floating_point() and state[k].dtype != torch.float32:
            state[k] = state[k].float()
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise SourceError(f"{where}: weights do not fit the architecture (missing {_sample(result.missing_keys)}; "
                          f"unexpected {_sample(result.unexpected_keys)})")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The source.
# ---------------------------------------------------------------------------------------------


def family_config_dir(family: str) -> Path:
    return CONFIGS_DIR / family


def _copy_configs(src: Path, dst: Path, family: str) -> None:
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("scheduler", "scheduler_config.json")):
        (dst / part).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / part / name, dst / part / name)
    index = src / "model_index.json"
    if index.is_file():
        shutil.copyfile(index, dst / "model_index.json")
    else:
        inpaint = json.loads((src / "unet" / "config.json").read_text()).get("in_channels") == 9
        (dst / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"}))
    tokenizer = dst / "tokenizer"
    tokenizer.mkdir()
    src_tok = src / "tokenizer"
    has_vocab = (src_tok / "vocab.json").is_file() or (src_tok / "tokenizer.json").is_file()
    if src_tok.is_dir():
        for f in src_tok.iterdir():
            if f.is_file():
                shutil.copyfile(f, tokenizer / f.name)
    if not has_vocab:
        from sdexport.sources.clip_vocab import write_clip_vocab

        write_clip_vocab(tokenizer)
        if not (tokenizer / "tokenizer_config.json").is_file():
            shipped = family_config_dir(family) / "tokenizer" / "tokenizer_config.json"
            shutil.copyfile(shipped, tokenizer / "tokenizer_config.json")


class SingleFileSource:
    """A single-file checkpoint presented with DiffusersSource's interface.

    ``path`` is a temporary folder holding what the export copies (model_index.json, the configs,
    ``scheduler/scheduler_config.json``, ``tokenizer/``); the weights stay in the checkpoint and are
    converted when ``load_unet`` / ``load_vae`` / ``load_text_encoder`` is called.
    """

    def __init__(self, file: Path, checkpoint: Checkpoint, detected: Detected, family: str, folder: Path,
                 tmp: tempfile.TemporaryDirectory, config_origin: str, prediction: tuple[str, str]):
        self.file, self.checkpoint, self.detected, self.family = file, checkpoint, detected, family
        self.path, self._tmp, self.config_origin = folder, tmp, config_origin
        self.prediction_type, self.prediction_from = prediction
        self.few_step: str | None = None  # set by open_source: "lcm" / "turbo" sampler and defaults
        self.configs = read_configs(folder)
        self.index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, file: str | Path, config: str | Path | None = None, prediction_type: str | None = None,
             scheduler_overrides: Mapping | None = None) -> "SingleFileSource":
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise SourceError(f"prediction type {prediction_type!r}: use {' or '.join(PREDICTION_TYPES)}")
        return cls.from_checkpoint(Checkpoint.open(file), config, prediction_type, scheduler_overrides)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, config: str | Path | None = None,
                        prediction_type: str | None = None, scheduler_overrides: Mapping | None = None
                        ) -> "SingleFileSource":
        """As :meth:`open`, from an opened checkpoint (its shapes suffice until weights are loaded)."""
        tmp = None
        try:
            file = checkpoint.path
            detected = detect(checkpoint.tensors, file)
            config_dir = Path(config) if config is not None else None
            if config_dir is not None and not (config_dir / "unet" / "config.json").is_file():
                raise SourceError(f"{config_dir}: not a diffusers model or config folder (no unet/config.json)")
            if config_dir is not None and detected.layout == "diffusers":
                # diffusers names do not tell CLIP from OpenCLIP; the config does (tiny models have no telling widths).
                configs = read_configs(config_dir)
                detected = dataclasses.replace(detected, text_encoder=text_kind_of(configs["text_encoder"], configs["unet"]))

            # The prediction type: the hint, a .yaml beside the file, the config folder's, the family's default.
            prediction, origin = prediction_type, "hint"
            if prediction is None:
                prediction, origin = sidecar_prediction_type(file), "yaml"
            if prediction is None and config_dir is not None:
                prediction, origin = read_configs(config_dir)["scheduler"].get("prediction_type", "epsilon"), "config"
            family = detected.family(prediction)
            if prediction is None:
                prediction, origin = read_configs(family_config_dir(family))["scheduler"].get("prediction_type"), "default"

            tmp = tempfile.TemporaryDirectory(prefix="sdexport-single-file-")
            folder = Path(tmp.name)
            _copy_configs(config_dir or family_config_dir(family), folder, family)
            sched_path = folder / "scheduler" / "scheduler_config.json"
            sched = json.loads(sched_path.read_text(encoding="utf-8"))
            sched["prediction_type"] = prediction
            sched.update(scheduler_overrides or {})
            sched_path.write_text(json.dumps(sched, indent=2) + "\n", encoding="utf-8")
            source = cls(file, checkpoint, detected, family, folder, tmp,
                         str(config_dir) if config_dir else f"sdexport/sources/configs/{family}", (prediction, origin))
            source.check()
            return source
        except BaseException:
            if tmp is not None:
                tmp.cleanup()
            checkpoint.close()
            raise

    # -- configs, as DiffusersSource ------------------------------------------------------------

    @property
    def unet_config(self) -> dict:
        return self.configs["unet"]

    @property
    def vae_config(self) -> dict:
        return self.configs["vae"]

    @property
    def text_encoder_config(self) -> dict:
        return self.configs["text_encoder"]

    @property
    def scheduler_config(self) -> dict:
        return self.configs["scheduler"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", ""))

    def describe(self) -> dict:
        return {
            "format": self.checkpoint.kind,
            "file": str(self.file),
            "layout": self.detected.layout,
            "family": self.family,
            "text_encoder": self.detected.text_encoder,
            "config": self.config_origin,
            "prediction_type": self.prediction_type,
            "prediction_type_from": self.prediction_from,
        }

    # -- shapes, then weights -------------------------------------------------------------------

    def _part_names(self, part: str) -> list[str]:
        if self.detected.layout == "diffusers":
            prefix = DIFFUSERS_PREFIX[part]
        elif part == "text_encoder":
            prefix = CLIP_PREFIX if self.detected.text_encoder == "clip" else OPENCLIP_PREFIX
        else:
            prefix = LDM_PREFIX[part]
        return [k for k in self.checkpoint.keys() if k.startswith(prefix)]

    def _convert(self, part: str, tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
        try:
            return to_diffusers(part, tensors, self.detected.layout, self.detected.text_encoder, self.configs[part],
                                text_model=model if part == "text_encoder" else None)
        except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as e:
            raise SourceError(f"{self.file}: the {part} weights do not follow the {self._what()} layout "
                              f"({type(e).__name__}: {str(e)[:120]}){self._config_hint()}") from None

    def _what(self) -> str:
        return FAMILY_DESCRIPTIONS.get(self.family, self.family)

    def _config_hint(self) -> str:
        if self.config_origin.startswith("sdexport/sources/configs/"):
            return "; for a non-standard architecture pass --config DIR (a diffusers folder describing it)"
        return f" (config from {self.config_origin})"

    def check(self) -> None:
        """Convert every component on the meta device and compare with the architecture's shapes."""
        for part in PARTS:
            model = empty_model(part, self.configs[part])
            expected = expected_shapes(model)
            names = self._part_names(part)
            if not names:
                raise SourceError(f"{self.file}: no {part} weights in the checkpoint")
            converted = self._convert(part, {k: self.checkpoint.tensors[k].meta() for k in names}, model)
            missing = [k for k in expected if k not in converted]
            unexpected = [k for k in converted if k not in expected]
            wrong = [f"{k} is {list(converted[k].shape)} in the file but {list(expected[k])} in the model"
                     for k in expected if k in converted and tuple(converted[k].shape) != expected[k]]
            if missing or unexpected or wrong:
                details = "; ".join(filter(None, [
                    wrong[0] if wrong else "",
                    f"missing {_sample(missing)}" if missing else "",
                    f"unexpected {_sample(unexpected)}" if unexpected else "",
                ]))
                raise SourceError(f"{self.file}: detected {self._what()} but its {part} does not fit that "
                                  f"architecture ({details}){self._config_hint()}")

    def load_part(self, part: str):
        model = empty_model(part, self.configs[part])
        names = self._part_names(part)
        tensors = {k: self.checkpoint.get(k) for k in names}
        converted = self._convert(part, tensors, model)
        del tensors
        return fill_model(model, converted, f"{self.file} ({part})")

    def load_unet(self):
        return self.load_part("unet")

    def load_vae(self):
        return self.load_part("vae")

    def load_text_encoder(self):
        return self.load_part("text_encoder")

    def close(self) -> None:
        self.checkpoint.close()
        self._tmp.cleanup()


# ---------------------------------------------------------------------------------------------
# Writing single files from diffusers pipelines.
# ---------------------------------------------------------------------------------------------


def text_kind_of(text_encoder_config: Mapping, unet_config: Mapping) -> str:
    """OpenCLIP (SD 2.x) for gelu text encoders under linear-projection U-Nets, else CLIP (SD 1.x)."""
    if text_encoder_config.get("hidden_act") == "gelu" and unet_config.get("use_linear_projection"):
        return "openclip"
    return "clip"


def original_plan(configs: Mapping[str, dict], text_kind: str | None = None, layout: str = "ldm"
                  ) -> dict[str, torch.Tensor]:
    """Names and shapes (meta tensors) of a checkpoint file for these configs, without any weights."""
    text_kind = text_kind or text_kind_of(configs["text_encoder"], configs["unet"])
    out: dict[str, torch.Tensor] = {}
    for part in PARTS:
        state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                 for k, v in empty_model(part, configs[part]).state_dict().items()}
        if layout == "ldm":
            out.update(to_original(part, state, configs[part], text_kind))
        else:
            out.update({DIFFUSERS_PREFIX[part] + k: v for k, v in state.items()})
    return out


def write_single_file(source, out: str | Path, layout: str = "ldm", dtype: torch.dtype | None = None,
                      text_kind: str | None = None) -> Path:
    """Write a model source (a diffusers folder path or an object with load_unet/...) as one ``.safetensors``
    (``layout="ldm"``: A1111 / CompVis names; ``"diffusers"``: ``unet.``/``vae.``/``text_encoder.`` prefixes)
    or ``.ckpt`` file (by suffix; a plain ``torch.save`` of ``{"state_dict": ...}``). One component is in
    memory at a time for safetensors output."""
    from sdexport.sources.diffusers import open_source

    if layout not in ("ldm", "diffusers"):
        raise ValueError(f"layout {layout!r}: use 'ldm' or 'diffusers'")
    out = Path(out)
    src = open_source(source) if isinstance(source, (str, Path)) else source
    configs = {"unet": src.unet_config, "vae": src.vae_config, "text_encoder": src.text_encoder_config}
    text_kind = text_kind or text_kind_of(configs["text_encoder"], configs["unet"])

    def convert(part: str) -> dict[str, torch.Tensor]:
        module = getattr(src, f"load_{part}")()
        state = module.state_dict()
        if layout == "ldm":
            state = to_original(part, state, configs[part], text_kind)
        else:
            state = {DIFFUSERS_PREFIX[part] + k: v for k, v in state.items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        return state

    if out.suffix == ".ckpt":
        state = {}
        for part in PARTS:
            state.update({k: v.clone() for k, v in convert(part).items()})
        tmp = out.with_name(f".{out.name}.partial")
        torch.save({"state_dict": state}, tmp)
        os.replace(tmp, out)
        return out
    plan = original_plan(configs, text_kind, layout)
    if dtype is not None:
        plan = {k: v.to(dtype) if v.is_floating_point() else v for k, v in plan.items()}
    with SafetensorsWriter(out, [(k, v.dtype, tuple(v.shape)) for k, v in plan.items()], {"format": "pt"}) as w:
        done: dict[str, torch.Tensor] = {}
        for part in PARTS:
            done = convert(part)
            for k in [k for k in plan if k in done]:
                w.write(k, done[k])
            del done
    return out
