"""Pipeline.generate in named stages, as diffusers splits ``__call__``: inputs, timesteps, latents,
the choice of loop (which returns the loop and why), denoise, decode. The stages' results are the
end-to-end tests' business (test_onnx_pipeline, test_device_loop); here: their contracts."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from runtime.pipeline import PipelineInputError

pytest.importorskip("onnxruntime")

from tests.test_device_loop import tiny_onnx_export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_sd1):
    return tiny_onnx_export(tmp_path_factory, tiny_sd1)


def _pipe(artifact, device_loop: str):
    from runtime import Pipeline

    return Pipeline.from_dir(artifact, options={"device": "cpu", "device_loop": device_loop})


def _planned(pipe, scheduler: str, steps: int = 3, **config):
    pipe.scheduler_config = {**pipe.scheduler_config, **config}
    sched = pipe.make_scheduler(scheduler)
    sched.set_timesteps(steps)
    return sched, np.asarray(sched.timesteps)


def test_choose_loop_returns_the_loop_and_why(artifact):
    from runtime.device_loop import DeviceLoop

    pipe = _pipe(artifact, "on")
    sched, timesteps = _planned(pipe, "dpmpp-2m")
    loop, reason = pipe.choose_loop(sched, timesteps, None, None)
    assert isinstance(loop, DeviceLoop) and isinstance(reason, str) and reason

    assert pipe.choose_loop(sched, timesteps, {"nets": []}, None) == (None, "ControlNet runs use the numpy loop")
    # DDIM with x0 clipping is not linear in the sample: planned, refused, and said so.
    sched, timesteps = _planned(pipe, "ddim", clip_sample=True)
    loop, reason = pipe.choose_loop(sched, timesteps, None, None)
    assert loop is None and reason.startswith("numpy loop:")

    off = _pipe(artifact, "off")
    loop, reason = off.choose_loop(*_planned(off, "dpmpp-2m"), None, None)
    assert loop is None and "off" in reason
    assert not hasattr(off, "loop_note")  # the reason travels with the loop, not beside it


def test_result_carries_the_loop_and_its_reason(artifact):
    pipe = _pipe(artifact, "off")
    result = pipe.generate("a cat", steps=2, seed=1, height=64, width=64)
    assert result.settings["loop"] == "numpy" and "off" in result.loop_reason


def test_stages_run_one_after_another(artifact):
    """The stages generate is made of, called in its order, give generate's latents."""
    from runtime.rng import make_rng

    pipe = _pipe(artifact, "off")
    expected = pipe.generate("a cat", "blurry", steps=3, seed=4, height=64, width=64, return_latents=True).latents
    run = pipe.check_inputs("a cat", "blurry", steps=3, guidance_scale=None, rng="numpy", height=64, width=64,
                            image=None, strength=None, mask=None)
    rng, sched = make_rng(4, "numpy"), pipe.make_scheduler(None)
    embeddings = pipe.text_embeddings(run)
    timesteps = pipe.prepare_timesteps(sched, run)
    state = pipe.prepare_latents(run, sched, timesteps, rng)
    loop, _ = pipe.choose_loop(sched, timesteps, None, None)
    latents = pipe.denoise(loop, run, sched, timesteps, state, embeddings, None, rng)
    np.testing.assert_array_equal(latents, expected)


def test_check_inputs_refuses_before_any_model_runs(artifact):
    pipe = _pipe(artifact, "off")
    with pytest.raises(PipelineInputError, match="steps"):
        pipe.generate("a cat", steps=0)
    with pytest.raises(PipelineInputError, match="negative prompts"):
        pipe.generate(["a", "b"], ["c"])
    assert pipe._sessions == {}


def test_no_function_in_the_pipeline_is_over_80_lines():
    tree = ast.parse((ROOT / "runtime" / "pipeline.py").read_text(encoding="utf-8"))
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80}
    assert not long, long
