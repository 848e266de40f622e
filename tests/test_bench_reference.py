"""``sdexport bench --reference``: a diffusers folder, or the demo's bundled model as it ships (packed
weights in ``sdexport/demo/assets/small``), whose diffusers folder is built for the run."""

from __future__ import annotations

import json

from sdexport.demo.run import ASSETS
from sdexport.measure.bench import _diffusers_folder
from sdexport.sources.diffusers import DiffusersSource


def test_the_bundled_model_is_a_reference(tmp_path):
    with _diffusers_folder(ASSETS) as folder:
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
        DiffusersSource.open(folder)  # what bench then checks against the export
        built = folder
    assert not built.exists()  # built for the run only


def test_a_diffusers_folder_is_used_as_it_is(tmp_path):
    with _diffusers_folder(tmp_path) as folder:
        assert folder == tmp_path
