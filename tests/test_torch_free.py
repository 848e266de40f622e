"""The run side must import without PyTorch, diffusers or transformers."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "tokenizers", "sdexport")


def _loaded_after(statement: str) -> list[str]:
    code = f"{statement}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_import_runtime_loads_no_torch():
    assert _loaded_after("import runtime") == []


def test_runtime_core_modules_load_no_torch():
    assert _loaded_after("import runtime.tokenizer, runtime.rng, runtime.schedulers, runtime.preprocess, runtime.pipeline, runtime.image") == []


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'transformers', 'tokenizers', 'onnx', 'openvino'}:
            raise ImportError(f'{name} is not available in this environment')
        return None
sys.meta_path.insert(0, Block())
from sdexport.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_generate_and_inspect_run_without_torch(tmp_path_factory, tiny_sd1):
    """`sdexport generate` needs only runtime + onnxruntime + numpy + Pillow: torch and the other
    export-side packages are made unimportable in the child process."""
    from sdexport.cli import main

    artifact = tmp_path_factory.mktemp("torch-free") / "onnx"
    assert main(["export", str(tiny_sd1), "--out", str(artifact), "--quiet"]) == 0
    out = artifact.parent / "image.png"
    for argv in (
        ["generate", str(artifact), "--prompt", "a red circle", "--steps", "3", "--height", "64", "--width", "64",
         "--scheduler", "euler-a", "--rng", "torch", "--output", str(out), "--quiet"],
        ["inspect", str(artifact)],
    ):
        proc = subprocess.run([sys.executable, "-c", BLOCKER, *argv], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert out.is_file()
