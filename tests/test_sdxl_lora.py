"""SDXL LoRAs fused at export: diffusers/PEFT files and kohya files (``lora_te1_``, ``lora_te2_``,
``lora_unet_`` with the original SGM block names) against diffusers' ``load_lora_weights`` + ``fuse_lora`` on
the same tiny SDXL pipeline, for the U-Net and both text encoders; LoRAs of the other family refused
with one line (SDXL onto SD 1.x and the reverse).

The LoRAs are made with PEFT on the tiny SDXL modules (attention, feed-forward, projections and the
resnets' 3x3 convolutions), with random non-zero up matrices, saved with diffusers' ``save_lora_weights``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdexport.errors import SourceError
from sdexport.sources.convert import unet_name_to_ldm
from sdexport.sources.open import open_source
from sdexport.sources.single_file import write_single_file
from tests.sdxl_tiny import PipelineSource, build_tiny_sdxl

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PARTS = ("unet", "text_encoder", "text_encoder_2")
SCALES = (0.7, 0.5)
MAX_RELATIVE = 1e-5


def make_sdxl_lora(pipe, out: Path, seed: int, rank: int, alpha: float) -> Path:
    """A diffusers/PEFT LoRA for the tiny SDXL pipeline: U-Net and both text encoders, random A and B."""
    import copy

    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    configs = {"unet": LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS),
               "text_encoder": LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS),
               "text_encoder_2": LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS)}
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for part, config in configs.items():
        model = copy.deepcopy(getattr(pipe, part))
        model.add_adapter(config)
        state = get_peft_model_state_dict(model)
        for k, v in state.items():  # B != 0: a freshly initialised LoRA is the identity and proves nothing
            std = 0.05 if ".lora_B." in k else 1.0 / math.sqrt(math.prod(v.shape[1:]))
            state[k] = torch.randn(v.shape, generator=gen) * std
        layers[part] = state
    StableDiffusionXLPipeline.save_lora_weights(
        str(out.parent), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name=out.name,
        **{f"{part}_lora_adapter_metadata": config.to_dict() for part, config in configs.items()})
    return out


def to_kohya_sdxl(peft_file: Path, out: Path, alpha: float, unet_config: dict) -> Path:
    """The same LoRA as kohya's sd-scripts writes SDXL LoRAs: U-Net modules under the original (SGM)
    block names, ``lora_te1_`` / ``lora_te2_`` text encoder modules, lora_down/lora_up and .alpha."""
    kohya = {}
    for key, value in load_file(str(peft_file)).items():
        component, _, rest = key.partition(".")
        module, _, which = rest.rpartition(".lora_")
        if component == "unet":
            flat = "lora_unet_" + unet_name_to_ldm(module + ".weight", unet_config)[: -len(".weight")].replace(".", "_")
        else:
            te = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
            flat = te + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")
        kohya[f"{flat}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
        kohya[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(kohya, str(out))
    return out


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sdxl-lora")
    pipe = build_tiny_sdxl()
    pipe.save_pretrained(str(root / "model"), safe_serialization=True)
    file = write_single_file(PipelineSource(pipe), root / "model.safetensors")
    a = make_sdxl_lora(pipe, root / "a.safetensors", seed=1, rank=4, alpha=8.0)
    b = make_sdxl_lora(pipe, root / "b.safetensors", seed=2, rank=2, alpha=2.0)
    unet_config = dict(pipe.unet.config)
    return {"folder": root / "model", "file": file, "a": a, "b": b,
            "a-kohya": to_kohya_sdxl(a, root / "a-kohya.safetensors", 8.0, unet_config),
            "b-kohya": to_kohya_sdxl(b, root / "b-kohya.safetensors", 2.0, unet_config)}


def _fused(source) -> dict[str, dict[str, torch.Tensor]]:
    return {part: getattr(source, f"load_{part}")().state_dict() for part in PARTS}


def _diffusers_fused(folder: Path, files, scales) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    names = [f"lora{i}" for i in range(len(files))]
    for name, f in zip(names, files):
        pipe.load_lora_weights(str(f), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=list(scales))
    pipe.fuse_lora(components=list(PARTS), adapter_names=names)
    pipe.unload_lora_weights()
    return {part: getattr(pipe, part).state_dict() for part in PARTS}


@pytest.mark.slow  # about 16 s on the shared 2-core machine (diffusers loads the pipeline and both LoRAs)
def test_sdxl_fused_weights_equal_diffusers(sdxl_model):
    """A PEFT file at 0.7 then a kohya file at 0.5, fused by us and by diffusers (its kohya converter)."""
    files = [sdxl_model["a"], sdxl_model["b-kohya"]]
    ours = _fused(open_source(sdxl_model["file"], config=sdxl_model["folder"], loras=list(zip(files, SCALES))))
    theirs = _diffusers_fused(sdxl_model["folder"], files, SCALES)
    base = _fused(open_source(sdxl_model["file"], config=sdxl_model["folder"]))
    for part in PARTS:
        assert ours[part].keys() == theirs[part].keys(), part
        for k in ours[part]:
            scale = float(theirs[part][k].abs().max()) or 1.0
            error = float((ours[part][k] - theirs[part][k]).abs().max()) / scale
            assert error <= MAX_RELATIVE, (part, k, error)
        changed = [k for k in ours[part] if not torch.equal(ours[part][k], base[part][k])]
        assert len(changed) >= (60 if part == "unet" else 12), (part, len(changed))


def test_sdxl_kohya_and_peft_fuse_identically(sdxl_model):
    from sdexport.sources.lora import read_lora

    kohya = read_lora(sdxl_model["a-kohya"])
    components = {m.component for m in kohya.modules}
    assert components == set(PARTS) and kohya.layout == "kohya"
    assert any(m.name.startswith("input_blocks_4_1_transformer_blocks_1_") for m in kohya.modules)
    source = open_source(sdxl_model["file"], config=sdxl_model["folder"], loras=[sdxl_model["a-kohya"]])
    peft = open_source(sdxl_model["file"], config=sdxl_model["folder"], loras=[sdxl_model["a"]])
    assert sorted((a.component, a.target) for a in source.applied) == sorted((a.component, a.target) for a in peft.applied)
    ours, reference = _fused(source), _fused(peft)
    for part in PARTS:
        assert all(torch.equal(ours[part][k], reference[part][k]) for k in ours[part]), part


@pytest.mark.parametrize("lora, model", [("sdxl", "sd1"), ("sd1", "sdxl")])
def test_lora_of_the_other_family_is_one_line(tmp_path, sdxl_model, tiny_sd1, lora, model):
    from tests.test_lora import make_lora

    sd1_lora = make_lora(tiny_sd1, tmp_path / "sd1.safetensors", seed=3, rank=2, alpha=2.0)
    files = {"sdxl": sdxl_model["a-kohya"], "sd1": sd1_lora}
    target = {"sd1": {"path": tiny_sd1}, "sdxl": {"path": sdxl_model["file"], "config": sdxl_model["folder"]}}[model]
    expected = "SDXL, but the model is SD 1.x/2.x" if lora == "sdxl" else "SD 1.x/2.x, but the model is SDXL"
    with pytest.raises(SourceError, match=f"a LoRA for {expected}") as e:
        open_source(target["path"], config=target.get("config"), loras=[files[lora]])
    assert "\n" not in str(e.value)


@pytest.mark.slow  # about 26 s on the shared 2-core machine under load
def test_sdxl_merged_lora_equals_both(tmp_path, sdxl_model):
    """merge-lora on an SDXL model, written in both layouts (text_encoder_2. / lora_te2_ keys), fuses as its inputs."""
    from sdexport.sources.lora import merge_loras

    model = open_source(sdxl_model["file"], config=sdxl_model["folder"])
    both = _fused(open_source(sdxl_model["file"], config=sdxl_model["folder"],
                              loras=[(sdxl_model["a"], 0.7), (sdxl_model["b-kohya"], 0.5)]))
    for layout, prefix in (("diffusers", "text_encoder_2."), ("kohya", "lora_te2_")):
        merged = merge_loras([f"{sdxl_model['a']}:0.7", f"{sdxl_model['b-kohya']}:0.5"],
                             tmp_path / f"ab-{layout}.safetensors", layout=layout, model=model)
        assert any(k.startswith(prefix) for k in load_file(str(merged)))
        ours = _fused(open_source(sdxl_model["file"], config=sdxl_model["folder"], loras=[merged]))
        for part in PARTS:
            for k in ours[part]:
                torch.testing.assert_close(ours[part][k], both[part][k], rtol=0, atol=1e-6, msg=f"{layout} {part} {k}")
