"""The one safetensors reader: numpy arrays from ``.safetensors`` files, without torch or the
``safetensors`` package.

The format: an 8-byte little-endian header length n, n bytes of a JSON object
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data section that the offsets index. The header is checked before anything trusts it (a file from
the internet is input, not data): its length, that it is an object, known dtypes, shapes that match
the byte ranges, ranges inside the file that do not overlap. Every fault is one
:class:`SafetensorsError` (a ValueError) whose message names the file.

Tensors are read on demand with plain file reads, whole or a block of rows (first dimension): no
memory map, whose touched pages would stay resident until it closes, and no read of the whole file.
The export side (``sdexport.sources.checkpoint``) wraps :class:`SafetensorsFile` into torch tensors;
the TensorRT backend and the demo read arrays through :func:`load`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

__all__ = ["ITEMSIZE", "NUMPY_DTYPES", "SafetensorsError", "SafetensorsFile", "TensorEntry", "load"]

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

# Element sizes of every dtype the format defines; NUMPY_DTYPES those numpy holds natively.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
                "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: str  # the format's name: "F32", "BF16", ...
    shape: tuple[int, ...]
    begin: int  # byte range in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes of one index of the first dimension (the whole tensor for a scalar)."""
        return math.prod(self.shape[1:]) * ITEMSIZE[self.dtype]


# ---------------------------------------------------------------------------------------------
# The header
# ---------------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        name = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the name {name!r} appears twice")
    return out


def _parse_json(raw: bytes, where: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{where}: corrupt safetensors header (not UTF-8: {e.reason})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:  # the C decoder's own depth limit: a clean refusal, no crash
        raise SafetensorsError(f"{where}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as e:
        raise SafetensorsError(f"{where}: corrupt safetensors header ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    return header


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, value: object, where: str) -> TensorEntry:
    bad = f"{where}: corrupt safetensors header (tensor {name!r}: "
    if not isinstance(value, dict) or not {"dtype", "shape", "data_offsets"} <= set(value):
        raise SafetensorsError(bad + f"expected dtype, shape and data_offsets, got {str(value)[:80]})")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise SafetensorsError(bad + f"unknown dtype {str(dtype)[:20]!r})")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise SafetensorsError(bad + f"shape {str(shape)[:80]} is not a list of sizes)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise SafetensorsError(bad + f"data_offsets {str(offsets)[:80]} is not a byte range)")
    entry = TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
    if math.prod(entry.shape) * ITEMSIZE[dtype] != entry.nbytes:
        raise SafetensorsError(bad + f"{list(entry.shape)} {dtype} does not fill {entry.nbytes} bytes)")
    return entry


def _metadata(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise SafetensorsError(f"{where}: corrupt safetensors header (__metadata__ must map strings to strings)")
    return value


def _check_ranges(tensors: dict[str, TensorEntry], data_size: int, where: str) -> None:
    previous, previous_end = None, 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.end > data_size:
            raise SafetensorsError(f"{where}: truncated file (tensor {name!r} ends at byte "
                                   f"{entry.end:,} of a data section of {data_size:,})")
        if entry.nbytes and entry.begin < previous_end:
            raise SafetensorsError(f"{where}: corrupt safetensors header (tensors {previous!r} and {name!r} overlap)")
        if entry.nbytes:
            previous, previous_end = name, entry.end


def read_header(file: BinaryIO, size: int, where: str) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """The tensors, the ``__metadata__`` dict and the data section's start, all checked."""
    raw = file.read(8)
    if len(raw) < 8:
        raise SafetensorsError(f"{where}: not a safetensors file ({size} bytes, too short for a header)")
    (n,) = struct.unpack("<Q", raw)
    if n < 2 or n > MAX_HEADER:
        raise SafetensorsError(f"{where}: not a safetensors file (header length {n:,} is out of range)")
    if 8 + n > size:
        raise SafetensorsError(f"{where}: truncated file (header of {n:,} bytes, file of {size:,})")
    header = _parse_json(file.read(n), where)
    metadata = _metadata(header.pop("__metadata__", {}), where)
    tensors = {name: _entry(name, value, where) for name, value in header.items()}
    _check_ranges(tensors, size - 8 - n, where)
    return tensors, metadata, 8 + n


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class SafetensorsFile:
    """An opened ``.safetensors`` file: the checked header up front, tensor bytes read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
            size = self.path.stat().st_size
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            self.tensors, self.metadata, self._data_start = read_header(self._file, size, str(self.path))
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read_bytes(self, name: str, start: int = 0, stop: int | None = None, into=None) -> memoryview:
        """The bytes of rows ``start:stop`` of a tensor (all of a scalar), into the front of ``into``
        (a writable buffer large enough) when given, else into a new one."""
        entry = self.tensors[name]
        rows = entry.shape[0] if entry.shape else 1
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"{name}: rows {start}:{stop} of {rows}")
        nbytes = (stop - start) * entry.row_bytes
        buffer = memoryview(bytearray(nbytes) if into is None else into).cast("B")[:nbytes]
        if len(buffer) < nbytes:
            raise ValueError(f"{name}: rows {start}:{stop} need {nbytes} bytes, the buffer has {len(buffer)}")
        if nbytes:
            self._file.seek(self._data_start + entry.begin + start * entry.row_bytes)
            if self._file.readinto(buffer) != nbytes:
                raise SafetensorsError(f"{self.path}: truncated file (tensor {name!r} is cut short)")
        return buffer

    def array(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of a tensor as a new numpy array; bfloat16 is widened to float32 exactly."""
        entry = self.tensors[name]
        data = self.read_bytes(name, start, stop)
        shape = ((entry.shape[0] if stop is None else stop) - start, *entry.shape[1:]) if entry.shape else ()
        if entry.dtype == "BF16":
            return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if entry.dtype not in NUMPY_DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is {entry.dtype}, which numpy cannot hold")
        return np.frombuffer(data, NUMPY_DTYPES[entry.dtype]).reshape(shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.tensors:
            yield name, self.array(name)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a file as numpy arrays (bfloat16 widened to float32), in the file's order."""
    with SafetensorsFile(path) as f:
        return dict(f.items())
