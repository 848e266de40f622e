"""Issue 16: untrusted artifacts stay inside their folder, caches never serve stale models, bad input
gets one clear line. Each test reproduces a defect found by probing the CLI with tampered artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdexport.cli import main

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def ov_artifact(tmp_path_factory):
    from sdexport.demo.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("ov")
    model = save_tiny_pipeline(root / "model", "sd1")
    assert main(["export", str(model), "--target", "openvino", "--out", str(root / "ov"), "--quiet"]) == 0
    return root / "ov"


def _scale_largest_f32_constant(xml: Path, bin_path: Path, factor: float) -> None:
    """Edit weights in place: the .xml (graph, offsets) stays byte for byte the same."""
    import xml.etree.ElementTree as ET

    consts = [d for d in ET.parse(xml).iter("data") if d.get("element_type") == "f32" and d.get("offset")]
    largest = max(consts, key=lambda d: int(d.get("size")))
    offset, size = int(largest.get("offset")), int(largest.get("size"))
    with open(bin_path, "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(size), np.float32) * np.float32(factor)
        f.seek(offset)
        f.write(values.tobytes())


def _generate(artifact: Path, out: Path, *extra: str) -> np.ndarray:
    code = main(["generate", str(artifact), "--prompt", "a red circle", "--steps", "2", "--seed", "3",
                 "--output", str(out), "--quiet", *extra])
    assert code == 0
    return np.asarray(Image.open(out))


def test_openvino_cache_is_keyed_on_content(ov_artifact, tmp_path):
    """A .bin edited in place (same .xml, manifest hash updated) must not be served from the old blob."""
    from runtime.manifest import sha256_file

    copy = tmp_path / "copy"
    shutil.copytree(ov_artifact, copy)
    before = _generate(copy, tmp_path / "a.png")  # compiles and fills the cache
    _scale_largest_f32_constant(copy / "unet" / "model.xml", copy / "unet" / "model.bin", 1.5)
    manifest = json.loads((copy / "sdexport.json").read_text())
    for ref in manifest["components"]["unet"]["files"]:
        ref["sha256"] = sha256_file(copy / ref["path"])
    (copy / "sdexport.json").write_text(json.dumps(manifest))
    fresh = tmp_path / "fresh"
    shutil.copytree(copy, fresh)  # a new path: OpenVINO's own cache key cannot match
    expected = _generate(fresh, tmp_path / "c.png")
    after = _generate(copy, tmp_path / "b.png")
    assert not np.array_equal(before, expected)  # the edit changes the image
    assert np.array_equal(after, expected)
