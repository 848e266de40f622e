"""Checkpoint files read and written tensor by tensor: safetensors (through ``runtime.safetensors``,
as torch tensors) and ``.ckpt`` pickles (weights-only, without running pickled code).

Reading: :class:`Checkpoint` gives names, shapes and dtypes up front and each tensor, or a block of its
rows, on demand with a plain file read, so reading a whole model keeps only what the caller keeps (no
memory map pins the file's pages). Writing: :class:`SafetensorsWriter` fixes the header from names,
dtypes and shapes, then appends tensors (or blocks of rows) in that order, and the file appears under
its name only once complete.

``.ckpt`` files are loaded with ``torch.load(weights_only=True)``. Training artifacts that the
weights-only unpickler refuses (PyTorch Lightning callbacks, numpy scalars) are replaced by inert
stubs; a pickle that calls anything able to run code (``os.system``, ``eval``, ...) is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from runtime.safetensors import MAX_HEADER, SafetensorsError, SafetensorsFile
from sdexport.errors import SourceError

# torch's dtype for each of the format's names (runtime.safetensors.ITEMSIZE has the same keys).
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def meta(self) -> torch.Tensor:
        """A tensor of this shape and dtype that holds no data (for shape-only conversions)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


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


class Checkpoint:
    """A checkpoint file opened for reading: names, shapes and dtypes up front, tensors one at a time."""

    def __init__(self, path: Path, kind: str, tensors: dict[str, TensorInfo], metadata: dict[str, str],
                 file: SafetensorsFile | None = None, state: dict[str, torch.Tensor] | None = None):
        self.path, self.kind, self.tensors, self.metadata = path, kind, tensors, metadata
        self._file, self._state = file, state

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if not path.exists():
            raise SourceError(f"{path}: no such file or directory")
        if path.is_dir():
            raise SourceError(f"{path}: is a directory, not a checkpoint file")
        if sniff(path) == "safetensors":
            try:
                file = SafetensorsFile(path)
            except SafetensorsError as e:
                raise SourceError(str(e)) from None
            infos = {k: TensorInfo(e.shape, DTYPES[e.dtype]) for k, e in file.tensors.items()}
            return cls(path, "safetensors", infos, file.metadata, file=file)
        state = load_pickle_checkpoint(path)
        infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}
        return cls(path, "ckpt", infos, {}, state=state)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.get_rows(name, 0, info.shape[0] if info.shape else 1)

    def get_rows(self, name: str, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along its first dimension; a scalar is one row), read on
        their own; into the front of ``into`` (a flat uint8 tensor large enough) when given, else into a
        new buffer."""
        info = self.tensors[name]
        if self._state is not None:
            return self._state[name][start:stop] if info.shape else self._state[name]
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        try:
            data = self._file.read_bytes(name, start, stop, None if into is None else into.numpy())
        except SafetensorsError as e:
            raise SourceError(str(e)) from None
        if into is not None:
            return into[:len(data)].view(info.dtype).reshape(shape)
        if not len(data):
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(data, dtype=info.dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

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
            nbytes = math.prod(shape) * dtype.itemsize
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
        "__module__": "sdexport.sources.checkpoint.stubs",
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
