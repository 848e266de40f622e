"""Output directories and files: missing parents are created, the output appears whole or not at all,
and what is written follows the user's umask (mkstemp/mkdtemp alone would make it private)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from runtime.files import write_file_atomic
from runtime.image import save_png
from sdexport.errors import OptionError
from sdexport.export.artifacts import check_output_dir, staged_directory


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_missing_parents_are_created_and_the_output_appears_last(tmp_path):
    out = tmp_path / "out" / "deeper" / "ov"
    check_output_dir(out, overwrite=False)  # no longer refused
    with staged_directory(out) as stage:
        (stage / "sdexport.json").write_text("{}")
        assert not out.exists()
        assert stage.parent == out.parent
    assert (out / "sdexport.json").read_text() == "{}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["ov"]  # no temporary sibling left


def test_a_failed_export_leaves_no_output(tmp_path):
    out = tmp_path / "out" / "ov"
    with pytest.raises(RuntimeError):
        with staged_directory(out) as stage:
            (stage / "half.onnx").write_bytes(b"x")
            raise RuntimeError("conversion failed")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_a_file_in_the_way_of_a_parent_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(OptionError, match="not a directory"):
        check_output_dir(tmp_path / "out" / "ov", overwrite=False)


def test_outputs_follow_the_umask(tmp_path, umask):
    with staged_directory(tmp_path / "a" / "ov") as stage:
        write_file_atomic(stage / "bench.json", b"{}")
        save_png(Image.fromarray(np.zeros((4, 4, 3), np.uint8)), stage / "image.png", {"prompt": "x"})
    out = tmp_path / "a" / "ov"
    assert _mode(out) == 0o777 & ~umask
    assert _mode(out / "bench.json") == 0o666 & ~umask
    assert _mode(out / "image.png") == 0o666 & ~umask


def test_the_demo_output_is_in_gitignore():
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "sdexport-demo/" in lines or "/sdexport-demo/" in lines
