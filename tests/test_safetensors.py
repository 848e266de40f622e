"""runtime.safetensors against the ``safetensors`` package's own writer: every dtype numpy holds and
bfloat16 round trip, rows read on their own, and damaged headers refused with one line naming the file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from runtime.safetensors import ITEMSIZE, SafetensorsError, SafetensorsFile, load

TENSORS = {
    "f32": torch.randn(3, 4),
    "f16": torch.randn(5, 2).half(),
    "bf16": torch.randn(4, 3).bfloat16(),
    "f64": torch.randn(2, 2).double(),
    "i64": torch.arange(-6, 6).reshape(3, 4),
    "i32": torch.arange(8, dtype=torch.int32),
    "i8": torch.tensor([-3, 0, 7], dtype=torch.int8),
    "u8": torch.tensor([[1, 255]], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
}


def _expected(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "set.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt", "note": "x"})
    return path


def test_round_trip_every_dtype(written):
    got = load(written)
    assert set(got) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert got[name].shape == tuple(tensor.shape), name
        assert got[name].dtype == _expected(tensor).dtype, name
        np.testing.assert_array_equal(got[name], _expected(tensor), err_msg=name)
    with SafetensorsFile(written) as f:
        assert f.metadata == {"format": "pt", "note": "x"}
        assert f.tensors["bf16"].dtype == "BF16" and f.tensors["i64"].shape == (3, 4)


def test_rows_are_read_on_their_own(written):
    with SafetensorsFile(written) as f:
        for name in ("f32", "bf16", "i64", "f16"):
            whole = _expected(TENSORS[name])
            np.testing.assert_array_equal(f.array(name, 1, 3), whole[1:3], err_msg=name)
            np.testing.assert_array_equal(f.array(name, 2), whole[2:], err_msg=name)
        buffer = bytearray(64)
        raw = f.read_bytes("i64", 1, 2, into=buffer)
        assert raw.obj is buffer and np.frombuffer(raw, np.int64).tolist() == [-2, -1, 0, 1]
        assert f.array("empty", 0, 0).shape == (0, 3)
        with pytest.raises(IndexError):
            f.array("f32", 2, 5)
        with pytest.raises(ValueError, match="need 64 bytes, the buffer has 8"):
            f.read_bytes("i64", 0, 2, into=bytearray(8))


def test_itemsizes_agree_with_torch():
    from sdexport.sources.checkpoint import DTYPES

    assert set(DTYPES) == set(ITEMSIZE)
    for name, dtype in DTYPES.items():
        assert torch.empty((), dtype=dtype).element_size() == ITEMSIZE[name], name


def _file(tmp_path, header, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD = [
    ("short", None, "too short for a header"),
    ("length", ({}, b"", 1 << 40), "header length .* out of range"),
    ("beyond", ({"a": ENTRY}, b"", 500), "truncated file"),
    ("not-json", (b"{nope", b""), "corrupt safetensors header"),
    ("not-utf8", (b'{"\xff": 1}', b""), "not UTF-8"),
    ("list", ([1, 2], b""), "not an object"),
    ("nested", (b"[" * 100_000 + b"]" * 100_000, b""), "nested too deeply"),
    ("dtype", ({"a": {**ENTRY, "dtype": "F7"}}, b"\0" * 8), "unknown dtype"),
    ("shape", ({"a": {**ENTRY, "shape": [-2]}}, b"\0" * 8), "not a list of sizes"),
    ("bool-shape", ({"a": {**ENTRY, "shape": [True, 2]}}, b"\0" * 8), "not a list of sizes"),
    ("offsets", ({"a": {**ENTRY, "data_offsets": [8, 0]}}, b"\0" * 8), "not a byte range"),
    ("size", ({"a": {**ENTRY, "shape": [3]}}, b"\0" * 8), r"\[3\] F32 does not fill 8 bytes"),
    ("data", ({"a": ENTRY}, b"\0" * 4), "truncated file .*'a' ends at byte 8 of a data section of 4"),
    ("overlap", ({"a": ENTRY, "b": {**ENTRY, "data_offsets": [4, 12]}}, b"\0" * 12), "'a' and 'b' overlap"),
    ("metadata", ({"__metadata__": {"a": 1}}, b""), "__metadata__ must map strings to strings"),
    ("metadata-list", ({"__metadata__": ["a"]}, b""), "__metadata__ must map strings to strings"),
    ("entry", ({"a": [1]}, b""), "expected dtype, shape and data_offsets"),
    ("duplicate", (b'{"a": ' + json.dumps(ENTRY).encode() + b', "a": ' + json.dumps(ENTRY).encode() + b"}",
                   b"\0" * 8), "'a' appears twice"),
]


@pytest.mark.parametrize("case,spec,message", BAD, ids=[b[0] for b in BAD])
def test_bad_headers_are_one_line(tmp_path, case, spec, message):
    if spec is None:
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"xx")
    else:
        header, data, *length = spec
        path = _file(tmp_path, header, data, *length)
    with pytest.raises(SafetensorsError, match=message) as info:
        load(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "\n" not in text and len(text) < 300, text
    assert isinstance(info.value, ValueError)


def test_cut_short_after_the_header_is_checked(written, tmp_path):
    data = written.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-4])
    with pytest.raises(SafetensorsError, match="truncated file"):
        SafetensorsFile(cut)


def test_missing_file(tmp_path):
    with pytest.raises(SafetensorsError, match="missing.safetensors: cannot read"):
        load(tmp_path / "missing.safetensors")


def test_zero_size_tensors_may_share_an_offset(tmp_path):
    path = _file(tmp_path, {"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "b": ENTRY,
                            "c": {"dtype": "I8", "shape": [0, 4], "data_offsets": [8, 8]}}, b"\0" * 8)
    got = load(path)
    assert got["a"].shape == (0,) and got["c"].shape == (0, 4) and got["b"].tolist() == [0.0, 0.0]


def test_torch_free():
    import subprocess
    import sys

    code = ("import sys, runtime.safetensors; "
            "bad = [m for m in ('torch', 'safetensors', 'sdexport') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
