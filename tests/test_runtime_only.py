"""A runtime-only install (numpy, Pillow, one backend; no torch): the commands that need the export side
say which extra to install, in one line with exit status 2, instead of an internal error."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Makes the export side's packages unimportable in the child, the way a missing package is (ModuleNotFoundError).
MISSING = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'transformers', 'safetensors', 'onnx', 'nncf'}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Missing())
from sdexport.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [
    ["export", "{tmp}/model", "--out", "{tmp}/out/ov"],
    ["bench", "{tmp}/ov", "--reference", "{tmp}/model"],
    ["quality", "{tmp}/ov", "--reference", "{tmp}/model"],
    ["demo", "--out", "{tmp}/demo"],
    ["merge", "{tmp}/a.safetensors", "{tmp}/b.safetensors", "--alpha", "0.5", "--out", "{tmp}/ab.safetensors"],
    ["merge-lora", "{tmp}/a.safetensors:1", "--out", "{tmp}/l.safetensors"],
], ids=lambda argv: argv[0])
def test_a_command_that_needs_torch_names_the_extra(tmp_path, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-c", MISSING, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "sdexport[export]" in lines[0] and "torch" in lines[0] and "internal error" not in lines[0]
    assert not (tmp_path / "out").exists()
