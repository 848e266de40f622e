"""Checkpoint merging: exactly the tensor-wise formulas, the inpainting recipe, bad inputs refused with
nothing written, and memory that stays near a few tensors (a small version of benchmarks/bench_merge.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdexport.errors import SdexportError
from sdexport.sources.merge import merge_checkpoints
from sdexport.sources.open import open_source
from sdexport.sources.single_file import write_single_file

ALPHA = 0.3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_sd1, tiny_sd2v, tiny_inpaint) -> dict[str, Path]:
    from sdexport.demo.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("merge")
    other = save_tiny_pipeline(root / "other", "sd1", seed=5)
    base = save_tiny_pipeline(root / "base", "sd1", seed=9)
    return {
        "a": write_single_file(open_source(tiny_sd1), root / "a.safetensors"),
        "b": write_single_file(open_source(other), root / "b.safetensors"),
        "c": write_single_file(open_source(base), root / "c.safetensors"),
        "b.ckpt": write_single_file(open_source(other), root / "b.ckpt"),
        "a16": write_single_file(open_source(tiny_sd1), root / "a16.safetensors", dtype=torch.float16),
        "b16": write_single_file(open_source(other), root / "b16.safetensors", dtype=torch.float16),
        "inpaint": write_single_file(open_source(tiny_inpaint), root / "inpaint.safetensors"),
        "sd2v": write_single_file(open_source(tiny_sd2v), root / "sd2v.safetensors"),
        "other_dir": other,
    }


def test_weighted_merge_is_the_formula_exactly(tmp_path, checkpoints):
    out = merge_checkpoints(checkpoints["a"], checkpoints["b"], ALPHA, tmp_path / "m.safetensors")
    merged, a, b = (load_file(str(p)) for p in (tmp_path / "m.safetensors", checkpoints["a"], checkpoints["b"]))
    assert list(merged) == list(a)  # same tensors, same order
    for k in a:
        if a[k].is_floating_point():
            assert torch.equal(merged[k], (1 - ALPHA) * a[k] + ALPHA * b[k]), k
        else:
            assert torch.equal(merged[k], a[k]), k
    assert out["tensors"]["merged"] > 400 and out["tensors"]["copied"] == 1  # CLIP's position ids
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["sdexport_merge"])
    assert (meta["method"], meta["alpha"]) == ("weighted", ALPHA)


def test_add_difference_is_the_formula_exactly(tmp_path, checkpoints):
    merge_checkpoints(checkpoints["a"], checkpoints["b.ckpt"], ALPHA, tmp_path / "m.safetensors",
                      method="add-difference", base=checkpoints["c"])
    merged, a, b, c = (load_file(str(p)) for p in (tmp_path / "m.safetensors", checkpoints["a"], checkpoints["b"],
                                                   checkpoints["c"]))
    for k in a:
        expected = a[k] + ALPHA * (b[k] - c[k]) if a[k].is_floating_point() else a[k]
        assert torch.equal(merged[k], expected), k


def test_fp16_merges_in_fp32(tmp_path, checkpoints):
    merge_checkpoints(checkpoints["a16"], checkpoints["b16"], ALPHA, tmp_path / "m.safetensors")
    merged, a, b = (load_file(str(p)) for p in (tmp_path / "m.safetensors", checkpoints["a16"], checkpoints["b16"]))
    for k in a:
        if a[k].is_floating_point():
            assert merged[k].dtype == torch.float16
            assert torch.equal(merged[k], ((1 - ALPHA) * a[k].float() + ALPHA * b[k].float()).half()), k


def test_merged_checkpoint_is_a_source(tmp_path, checkpoints, tiny_sd1):
    """The merged file opens like any checkpoint; its U-Net is the formula applied to the two U-Nets."""
    merge_checkpoints(checkpoints["a"], checkpoints["b"], ALPHA, tmp_path / "m.safetensors")
    ua = open_source(tiny_sd1).load_unet().state_dict()
    ub = open_source(checkpoints["other_dir"]).load_unet().state_dict()
    merged = open_source(tmp_path / "m.safetensors", config=tiny_sd1).load_unet().state_dict()
    for k in ua:
        assert torch.equal(merged[k], (1 - ALPHA) * ua[k] + ALPHA * ub[k]), k


def test_inpainting_recipe_merges_shared_channels(tmp_path, checkpoints):
    """inpainting A + (fine-tune B - its base C): conv_in's 4 latent channels merge, A's 5 mask channels stay."""
    merge_checkpoints(checkpoints["inpaint"], checkpoints["b"], 1.0, tmp_path / "m.safetensors",
                      method="add-difference", base=checkpoints["c"])
    merged, a, b, c = (load_file(str(p)) for p in (tmp_path / "m.safetensors", checkpoints["inpaint"],
                                                   checkpoints["b"], checkpoints["c"]))
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert merged[k].shape == a[k].shape == (32, 9, 3, 3)
    assert torch.equal(merged[k][:, :4], a[k][:, :4] + 1.0 * (b[k] - c[k]))
    assert torch.equal(merged[k][:, 4:], a[k][:, 4:])


def _lora(tmp_path: Path) -> Path:
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 2)}, str(path))
    return path


def _truncated(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "cut.safetensors"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return path


@pytest.mark.parametrize("case, needle", [
    ("family", r"does not have the layout of .*a\.safetensors: \d+ tensors missing, e\.g\. cond_stage_model\.transformer"),
    ("shape", r"model\.diffusion_model\.out\.2\.bias is \[4\] in .* but \[3\] in"),
    ("lora", "this is a LoRA, not a model"),
    ("truncated", "truncated file"),
    ("no-base", "add-difference needs --base C"),
    ("method", "merge method 'average'"),
    ("exists", "already exists; pass --overwrite"),
    ("self", "the output would overwrite an input"),
    ("suffix", r"written as \.safetensors"),
])
def test_bad_merges_write_nothing(tmp_path, checkpoints, case, needle):
    a, b, out = checkpoints["a"], checkpoints["b"], tmp_path / "m.safetensors"
    kwargs = {}
    if case == "family":
        b = checkpoints["sd2v"]
    elif case == "shape":
        tensors = load_file(str(b))
        tensors["model.diffusion_model.out.2.bias"] = torch.zeros(3)
        save_file(tensors, str(tmp_path / "b.safetensors"))
        b = tmp_path / "b.safetensors"
    elif case == "lora":
        b = _lora(tmp_path)
    elif case == "truncated":
        b = _truncated(tmp_path, b)
    elif case == "no-base":
        kwargs["method"] = "add-difference"
    elif case == "method":
        kwargs["method"] = "average"
    elif case == "exists":
        out.write_text("precious")
    elif case == "self":
        out = a
    elif case == "suffix":
        out = tmp_path / "m.ckpt"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SdexportError, match=needle) as e:
        merge_checkpoints(a, b, ALPHA, out, **kwargs)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no partial file left
    if case == "exists":
        assert out.read_text() == "precious"


def test_failure_midway_leaves_nothing(tmp_path, checkpoints, monkeypatch):
    from sdexport.sources.checkpoint import SafetensorsWriter

    calls = {"n": 0}
    real = SafetensorsWriter._append

    def failing(self, tensor):  # every tensor and block of rows is written through _append
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError("disk full")
        return real(self, tensor)

    monkeypatch.setattr(SafetensorsWriter, "_append", failing)
    with pytest.raises(OSError):
        merge_checkpoints(checkpoints["a"], checkpoints["b"], ALPHA, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_merge_memory_stays_near_a_few_tensors(tmp_path):
    """Two ~100 MB checkpoints merged in a child process: merging adds far less than one checkpoint to its RSS
    (benchmarks/bench_merge.py measures the same on SD 1.5-sized files)."""
    from benchmarks.bench_merge import measure, write_random_checkpoint

    plan = {  # just enough of the SD layout to be recognised, plus 24 large tensors
        "model.diffusion_model.input_blocks.0.0.weight": (torch.float32, (32, 4, 3, 3)),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (torch.float32, (32,)),
        "first_stage_model.quant_conv.weight": (torch.float32, (8, 8, 1, 1)),
        **{f"model.diffusion_model.block{i}.weight": (torch.float32, (1024, 1024)) for i in range(24)},
    }
    a = write_random_checkpoint(tmp_path / "a.safetensors", plan, seed=1)
    b = write_random_checkpoint(tmp_path / "b.safetensors", plan, seed=2)
    size = a.stat().st_size
    result = measure("sdexport", a, b, tmp_path / "m.safetensors")
    assert abs((tmp_path / "m.safetensors").stat().st_size - size) < 4096  # the same tensors, another header
    increment = result["peak_rss"] - result["baseline_rss"]
    assert increment < 0.4 * size, f"merging added {increment / 1e6:.0f} MB for {size / 1e6:.0f} MB checkpoints"


def _cli_has(command: str) -> bool:
    from sdexport.cli import build_parser

    return command in build_parser()._subparsers._group_actions[0].choices


@pytest.mark.skipif(not _cli_has("merge"), reason="cli.py has no merge command yet")
def test_cli_merge(tmp_path, capsys, checkpoints):
    from sdexport.cli import main

    out = tmp_path / "m.safetensors"
    assert main(["merge", str(checkpoints["a"]), str(checkpoints["b"]), "--alpha", "0.3", "--out", str(out), "--quiet"]) == 0
    merged, a, b = (load_file(str(p)) for p in (out, checkpoints["a"], checkpoints["b"]))
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(merged[k], (1 - ALPHA) * a[k] + ALPHA * b[k])
    for argv, needle in (
        (["merge", str(checkpoints["a"]), str(checkpoints["sd2v"]), "--alpha", "0.3", "--out", str(tmp_path / "x.safetensors")],
         "does not have the layout of"),
        (["merge", str(checkpoints["a"]), str(_truncated(tmp_path, checkpoints["b"])), "--alpha", "0.3",
          "--out", str(tmp_path / "y.safetensors")], "truncated file"),
        (["merge", str(checkpoints["a"]), str(checkpoints["b"]), "--alpha", "0.3", "--method", "add-difference",
          "--out", str(tmp_path / "z.safetensors")], "needs --base C"),
    ):
        before = sorted(p.name for p in tmp_path.iterdir())
        code = main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("sdexport: error: ") and needle in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == before
