"""The one ONNX Runtime session helper (runtime.backends.onnxruntime.create_session) and its users."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from runtime.backends.onnxruntime import create_session, cuda_provider, provider_entries, session_options, usable_cpus

ROOT = Path(__file__).resolve().parents[1]


def _add_one() -> onnx.ModelProto:
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "add_one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_session_from_path_and_from_bytes(tmp_path):
    model = _add_one()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for source in (path, str(path), model.SerializeToString()):
        session = create_session(source, threads=1)
        assert session.get_providers() == ["CPUExecutionProvider"]
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], x + 1)
    probe = create_session(path, optimization="none")
    np.testing.assert_array_equal(probe.run(None, {"x": x})[0], x + 1)


def test_threads_bounded_by_the_usable_cpus():
    assert session_options(10_000).intra_op_num_threads == usable_cpus()
    assert session_options(1).intra_op_num_threads == 1
    assert session_options(0).intra_op_num_threads == 0  # ONNX Runtime's default


def test_cuda_entry_names_device_id_only_off_the_default_device():
    # With "device_id" in its options, onnxruntime >= 1.26 looks the provider up among plugin EP devices
    # and warns on every session when none is registered (onnxruntime-gpu 1.31.1 on an H200).
    assert cuda_provider() == ("CUDAExecutionProvider", {})
    assert cuda_provider(0, cuda_graph=True) == ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})
    assert cuda_provider(1) == ("CUDAExecutionProvider", {"device_id": "1"})
    assert provider_entries(["CUDAExecutionProvider", "CPUExecutionProvider"], 0, True) == [
        ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert provider_entries([("CoreMLExecutionProvider", {"x": "1"}), "CPUExecutionProvider"]) == [
        ("CoreMLExecutionProvider", {"x": "1"}), "CPUExecutionProvider"]


def test_every_session_is_created_by_the_helper():
    """No other module builds ONNX Runtime SessionOptions or InferenceSession itself."""
    helper_file = ROOT / "runtime" / "backends" / "onnxruntime.py"
    pattern = re.compile(r"\bInferenceSession\(|\bort\.SessionOptions\(|_ort\.SessionOptions\(")
    offenders = []
    for folder in ("runtime", "sdexport", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == helper_file:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "ONNX Runtime sessions set up outside create_session:\n" + "\n".join(offenders)
