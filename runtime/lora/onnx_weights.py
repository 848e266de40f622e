"""Initializers of an ONNX file read by name, without the onnx package: a small protobuf walk over a
memory map (ModelProto.graph -> GraphProto.initializer -> TensorProto), data inline (``raw_data``) or
in the external-data file beside the model. Only the fields needed to find and read a float tensor are
decoded; the rest is skipped by its length, so a 3 GB U-Net is walked without being loaded.

Field numbers (onnx.proto3): ModelProto.graph 7; GraphProto.initializer 5; TensorProto dims 1,
data_type 2, name 8, raw_data 9, external_data 13 (StringStringEntryProto key 1, value 2),
data_location 14.
"""

from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path

import numpy as np

from runtime.files import ArtifactFileError, inside

_DTYPES = {1: np.dtype("<f4"), 10: np.dtype("<f2")}  # TensorProto.FLOAT, FLOAT16


class OnnxWeightError(ValueError):
    """The file does not hold a weight as the manifest says."""


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise OnnxWeightError("malformed protobuf (varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of one message, in order."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise OnnxWeightError("malformed protobuf (a field runs past its message)")
            yield number, wire, (pos, length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise OnnxWeightError(f"malformed protobuf (wire type {wire})")


@dataclasses.dataclass
class _Tensor:
    dims: list[int]
    data_type: int
    raw: tuple[int, int] | None  # (offset, length) in the model file
    external: dict[str, str]


def _tensor(buf, start: int, length: int) -> tuple[str, _Tensor]:
    name, tensor = "", _Tensor([], 0, None, {})
    for number, wire, value in _fields(buf, start, start + length):
        if number == 1 and wire == 0:
            tensor.dims.append(value)
        elif number == 1 and wire == 2:  # packed dims
            pos, end = value[0], value[0] + value[1]
            while pos < end:
                dim, pos = _varint(buf, pos)
                tensor.dims.append(dim)
        elif number == 2 and wire == 0:
            tensor.data_type = value
        elif number == 8 and wire == 2:
            name = bytes(buf[value[0]:value[0] + value[1]]).decode("utf-8", "replace")
        elif number == 9 and wire == 2:
            tensor.raw = value
        elif number == 13 and wire == 2:
            entry = {n: bytes(buf[v[0]:v[0] + v[1]]).decode("utf-8", "replace")
                     for n, w, v in _fields(buf, value[0], value[0] + value[1]) if w == 2}
            tensor.external[entry.get(1, "")] = entry.get(2, "")
    return name, tensor


class OnnxWeights:
    """``weights[name]`` -> the initializer as a read-only numpy array (a view of the memory map)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._external: dict[str, mmap.mmap] = {}
        self._index: dict[str, _Tensor] = {}
        buf = memoryview(self._map)
        try:
            for number, wire, value in _fields(buf, 0, len(buf)):
                if number == 7 and wire == 2:
                    for n, w, v in _fields(buf, value[0], value[0] + value[1]):
                        if n == 5 and w == 2:
                            name, tensor = _tensor(buf, *v)
                            self._index[name] = tensor
        finally:
            buf.release()

    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._index.get(name)
        if tensor is None:
            raise OnnxWeightError(f"{self.path}: no initializer {name!r}")
        dtype = _DTYPES.get(tensor.data_type)
        if dtype is None:
            raise OnnxWeightError(f"{self.path}: initializer {name!r} is not float32 or float16")
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.external:
            source, offset = self._external_map(tensor, name), int(tensor.external.get("offset", 0) or 0)
        elif tensor.raw is not None:
            source, offset = self._map, tensor.raw[0]
            if tensor.raw[1] != count * dtype.itemsize:
                raise OnnxWeightError(f"{self.path}: initializer {name!r} has {tensor.raw[1]} bytes for {tensor.dims}")
        else:
            raise OnnxWeightError(f"{self.path}: initializer {name!r} is not stored as raw data")
        if offset + count * dtype.itemsize > len(source):
            raise OnnxWeightError(f"{self.path}: initializer {name!r} runs past the end of its file")
        return np.frombuffer(source, dtype, count, offset).reshape(tensor.dims)

    def _external_map(self, tensor: _Tensor, name: str) -> mmap.mmap:
        location = tensor.external.get("location", "")
        if location not in self._external:
            try:  # an untrusted model never makes us read outside its folder
                path = inside(self.path.parent, location, f"external data of {name!r}")
            except ArtifactFileError as e:
                raise OnnxWeightError(str(e)) from None
            with open(path, "rb") as f:
                self._external[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._external[location]

    def close(self) -> None:
        for m in [self._map, *self._external.values()]:
            try:
                m.close()
            except BufferError:  # an array still views it; the map closes when that array goes
                pass

    def __enter__(self) -> "OnnxWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass
class PatchedModel:
    """What ONNX Runtime opens: the model file's bytes with the inline weights patched (None: the file
    as it is), and the patched external-data weights (``SessionOptions.add_external_initializers``)."""

    model: bytes | None
    external: dict[str, np.ndarray]


def patched_model(model_path: Path, patches: dict) -> PatchedModel:
    """The model with each patched weight's bytes replaced where they are stored.

    Not ``SessionOptions.add_initializer``: ONNX Runtime's layout optimizations (the default level,
    ORT_ENABLE_ALL) read the file's values and the override was lost (tiny U-Net: max error 0.6
    against torch with the LoRA, 1.7e-6 at ORT_ENABLE_EXTENDED); weights patched in the model
    itself go through every optimization as the stored ones do. ``patches``: graph name ->
    :class:`runtime.lora.resolve.WeightPatch`."""
    inline: dict[int, bytes] = {}
    external: dict[str, np.ndarray] = {}
    with OnnxWeights(model_path) as weights:
        for name, patch in patches.items():
            if name not in weights:
                raise OnnxWeightError(f"{model_path}: no initializer {name!r}, which the manifest's weight map names")
            base = weights[name]
            if tuple(base.shape) != patch.ref.shape or str(base.dtype) != patch.ref.dtype:
                raise OnnxWeightError(f"{model_path}: initializer {name!r} is {base.dtype}{list(base.shape)}, the "
                                      f"manifest says {patch.ref.dtype}{list(patch.ref.shape)}")
            new = np.ascontiguousarray(patch.patched(base))
            tensor = weights._index[name]
            if tensor.external:
                external[name] = new
            else:
                inline[tensor.raw[0]] = new.tobytes()
            del base
    if not inline:
        return PatchedModel(None, external)
    with open(model_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        parts, position = [], 0
        for offset in sorted(inline):  # one copy of the file: the unchanged runs and the new weights
            parts += [data[position:offset], inline[offset]]
            position = offset + len(inline[offset])
        parts.append(data[position:])
    return PatchedModel(b"".join(parts), external)
