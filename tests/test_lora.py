"""LoRA fusion against diffusers (load_lora_weights + set_adapters / fuse_lora), for diffusers/PEFT, kohya and
old diffusers files; the export with two LoRAs at 0.7 and 0.5 against diffusers' images; LoRA merging;
refit sets; LoRAs that do not fit failing with one clear message.

The LoRAs are made here with PEFT on the tiny U-Net and text encoder (attention, feed-forward, projections
and the resnets' 3x3 convolutions, LoCon-style), with random non-zero up (B) matrices, saved with diffusers'
``save_lora_weights`` (PEFT config in the file's metadata) and converted to kohya names.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.metrics import psnr
from sdexport.errors import SourceError
from sdexport.sources.lora import LoraRef, merge_loras, read_lora, refit_set, write_refit_set
from sdexport.sources.base import Source
from sdexport.sources.open import open_source
from tests.test_sources import MIN_PSNR, diffusers_txt2img, run_export, runtime_image, write_single_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SCALES = (0.7, 0.5)
PROMPT = "a red circle in the top left on a blue background"


# --- making LoRAs ------------------------------------------------------------------------------


def make_lora(model_dir: Path, out: Path, seed: int, rank: int, alpha: float) -> Path:
    """A diffusers/PEFT LoRA file for the tiny pipeline: U-Net and text encoder, random A and B."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    text = CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder")
    configs = {"unet": LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS),
               "text_encoder": LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS)}
    unet.add_adapter(configs["unet"])
    text.add_adapter(configs["text_encoder"])
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, model in (("unet", unet), ("text_encoder", text)):
        state = get_peft_model_state_dict(model)
        for k, v in state.items():  # B != 0: a freshly initialised LoRA is the identity and proves nothing
            std = 0.05 if ".lora_B." in k else 1.0 / math.sqrt(math.prod(v.shape[1:]))
            state[k] = torch.randn(v.shape, generator=gen) * std
        layers[name] = state
    StableDiffusionPipeline.save_lora_weights(
        str(out.parent), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(), weight_name=out.name)
    return out


def to_kohya(peft_file: Path, out: Path, alpha: float) -> Path:
    """The same LoRA under kohya / A1111 names (underscored module paths, lora_down/lora_up, .alpha)."""
    kohya = {}
    for key, value in load_file(str(peft_file)).items():
        component, _, rest = key.partition(".")
        module, _, which = rest.rpartition(".lora_")
        if component == "unet":
            flat = "lora_unet_" + module.replace(".", "_")
        else:
            flat = "lora_te_" + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")
        kohya[f"{flat}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
        kohya[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(kohya, str(out))
    return out


def to_old_diffusers(peft_file: Path, out: Path) -> Path:
    """The pre-PEFT diffusers layout: ``.lora.down.weight`` (U-Net), ``.lora_linear_layer.down.weight`` (text)."""
    old = {}
    for key, value in load_file(str(peft_file)).items():
        module, _, which = key.rpartition(".lora_")
        direction = "down" if which.startswith("A") else "up"
        if key.startswith("unet."):
            old[f"{module}.lora.{direction}.weight"] = value
        else:
            old[f"{module}.lora_linear_layer.{direction}.weight"] = value
    save_file(old, str(out))
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_sd1) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    a = make_lora(tiny_sd1, root / "a.safetensors", seed=1, rank=4, alpha=8.0)
    b = make_lora(tiny_sd1, root / "b.safetensors", seed=2, rank=2, alpha=2.0)
    return {"a": a, "b": b, "a-kohya": to_kohya(a, root / "a-kohya.safetensors", 8.0),
            "b-kohya": to_kohya(b, root / "b-kohya.safetensors", 2.0), "b-old": to_old_diffusers(b, root / "b-old.safetensors")}


def diffusers_with_loras(model_dir: Path, files, scales, fuse: bool = True):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    names = []
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f), adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    pipe.set_adapters(names, adapter_weights=list(scales))
    if fuse:
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
    return pipe


def fused(source) -> dict[str, dict[str, torch.Tensor]]:
    return {part: getattr(source, f"load_{part}")().state_dict() for part in ("unet", "text_encoder")}


def _pair(loras, kind):
    suffix = "" if kind == "peft" else "-kohya"
    return [loras["a" + suffix], loras["b" + suffix]]


# --- fusion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_fused_weights_equal_diffusers(loras, tiny_sd1, kind):
    files = _pair(loras, kind)
    ours = fused(open_source(tiny_sd1, loras=list(zip(files, SCALES))))
    pipe = diffusers_with_loras(tiny_sd1, files, SCALES)
    base = fused(open_source(tiny_sd1))
    for part in ours:
        theirs = getattr(pipe, part).state_dict()
        assert ours[part].keys() == theirs.keys()
        for k in ours[part]:
            torch.testing.assert_close(ours[part][k], theirs[k], rtol=0, atol=1e-6, msg=f"{part} {k}")
        changed = [k for k in ours[part] if not torch.equal(ours[part][k], base[part][k])]
        assert len(changed) >= (60 if part == "unet" else 12), (part, len(changed))


def test_peft_kohya_and_old_layouts_fuse_identically(loras, tiny_sd1):
    peft = fused(open_source(tiny_sd1, loras=[(loras["a"], 0.7), (loras["b"], 0.5)]))
    kohya = fused(open_source(tiny_sd1, loras=[(loras["a-kohya"], 0.7), (loras["b-kohya"], 0.5)]))
    peft_b = fused(open_source(tiny_sd1, loras=[(loras["b"], 0.5)]))
    old_b = fused(open_source(tiny_sd1, loras=[f"{loras['b-old']}:0.5"]))  # no alpha in the file: alpha = r = 2
    for part in peft:
        for k in peft[part]:
            assert torch.equal(kohya[part][k], peft[part][k]), k
            assert torch.equal(old_b[part][k], peft_b[part][k]), k
    source = open_source(tiny_sd1, loras=[loras["a-kohya"], loras["b-old"]])
    assert isinstance(source, Source) and [f.layout for f in source.lora_files] == ["kohya", "diffusers-old"]


def test_kohya_with_ldm_block_names(tmp_path, loras, tiny_sd1):
    """Some trainers name U-Net modules after the original LDM blocks (lora_unet_input_blocks_1_1_proj_in)."""
    from sdexport.sources.convert import unet_name_to_ldm

    unet_config = open_source(tiny_sd1).unet_config
    renamed = {}
    for key, value in load_file(str(loras["a"])).items():
        component, _, rest = key.partition(".")
        module, _, which = rest.rpartition(".lora_")
        if component == "unet":
            flat = "lora_unet_" + unet_name_to_ldm(module + ".weight", unet_config)[: -len(".weight")].replace(".", "_")
        else:
            flat = "lora_te_" + ("text_model." + module).replace(".", "_")
        renamed[f"{flat}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
        renamed[f"{flat}.alpha"] = torch.tensor(8.0)
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in renamed
    path = tmp_path / "ldm-names.safetensors"
    save_file(renamed, str(path))
    ours = fused(open_source(tiny_sd1, loras=[(path, 0.7)]))
    peft = fused(open_source(tiny_sd1, loras=[(loras["a"], 0.7)]))
    for part in ours:
        assert all(torch.equal(ours[part][k], peft[part][k]) for k in ours[part])


def test_lora_on_single_file_source(tmp_path, loras, tiny_sd1):
    file = write_single_file(open_source(tiny_sd1), tmp_path / "model.safetensors")
    specs = [(loras["a-kohya"], 0.7), (loras["b"], 0.5)]
    ours = fused(open_source(file, config=tiny_sd1, loras=specs))
    folder = fused(open_source(tiny_sd1, loras=specs))
    for part in ours:
        assert all(torch.equal(ours[part][k], folder[part][k]) for k in ours[part])


def test_export_with_two_loras_matches_diffusers(tmp_path, loras, tiny_sd1):
    files = _pair(loras, "peft")
    manifest = run_export(tiny_sd1, tmp_path / "onnx", loras=list(zip(files, SCALES)), validate=False)
    ours = runtime_image(manifest.root, PROMPT, negative_prompt="blurry")
    for kind, fuse in (("peft", True), ("kohya", False)):  # fuse_lora, and adapters left active
        pipe = diffusers_with_loras(tiny_sd1, _pair(loras, kind), SCALES, fuse=fuse)
        theirs = diffusers_txt2img(pipe, PROMPT, negative_prompt="blurry")
        value = psnr(theirs, ours, peak=255.0)
        print(f"LoRAs 0.7 + 0.5, ONNX export vs diffusers ({kind}): PSNR {value:.1f} dB")
        assert value >= MIN_PSNR, f"{kind}: PSNR {value:.1f} dB"
    from diffusers import StableDiffusionPipeline

    plain = diffusers_txt2img(StableDiffusionPipeline.from_pretrained(str(tiny_sd1), safety_checker=None),
                              PROMPT, negative_prompt="blurry")
    print(f"without the LoRAs: PSNR {psnr(plain, ours, peak=255.0):.1f} dB")
    assert psnr(plain, ours, peak=255.0) < 35.0, "the LoRAs should change the image"
    details = manifest.exporter.get("source_details")  # recorded once export.py writes source.describe()
    if details is not None:
        assert [entry["scale"] for entry in details["loras"]] == list(SCALES)


# --- merging LoRAs, refit sets -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_merged_lora_equals_both(tmp_path, loras, tiny_sd1, layout):
    merged = merge_loras([f"{loras['a']}:0.7", (loras["b-kohya"], 0.5)], tmp_path / "ab.safetensors", layout=layout,
                         model=open_source(tiny_sd1))
    lora = read_lora(merged)
    assert lora.layout == ("peft" if layout == "diffusers" else "kohya")
    assert {m.rank for m in lora.modules} == {6}  # 4 + 2: every module is in both inputs
    together = fused(open_source(tiny_sd1, loras=[(merged, 1.0)]))
    separate = fused(open_source(tiny_sd1, loras=[(loras["a"], 0.7), (loras["b-kohya"], 0.5)]))
    for part in together:
        for k in together[part]:
            torch.testing.assert_close(together[part][k], separate[part][k], rtol=0, atol=1e-5)
    if layout == "kohya":
        return
    # diffusers reads the merged file and gets the same model
    pipe = diffusers_with_loras(tiny_sd1, [merged], [1.0])
    for part in together:
        theirs = getattr(pipe, part).state_dict()
        for k in together[part]:
            torch.testing.assert_close(together[part][k], theirs[k], rtol=0, atol=1e-5)


def test_merge_lora_without_model_resolves_sd_names(tmp_path, loras):
    merged = merge_loras([loras["a-kohya"], loras["b-kohya"]], tmp_path / "ab.safetensors")
    keys = load_file(str(merged)).keys()
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys


def test_refit_set(tmp_path, loras, tiny_sd1):
    source = open_source(tiny_sd1, loras=[(loras["a"], 0.7), (loras["b"], 0.5)])
    path = write_refit_set(source, tmp_path / "refit.safetensors")
    refit = load_file(str(path))
    model = fused(source)
    base = fused(open_source(tiny_sd1))
    changed = {f"{part}.{k}" for part in model for k in model[part] if not torch.equal(model[part][k], base[part][k])}
    assert set(refit) == changed
    for key, value in refit.items():
        part, _, name = key.partition(".")
        assert torch.equal(value, model[part][name])
    assert refit_set(open_source(tiny_sd1, loras=[(loras["b"], 0.0)])).keys() == refit.keys()


# --- LoRAs that do not fit --------------------------------------------------------------------


def _write(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _bad_loras(root: Path, good: Path) -> dict[str, Path]:
    peft = load_file(str(good))
    first = sorted(k for k in peft if k.startswith("unet.") and "lora_A" in k)[0]
    r = peft[first].shape[0]
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return {
        "nothing": _write(root / "nothing.safetensors", {f"lora_unet_foo_{i}_bar.lora_down.weight": torch.ones(2, 8) for i in range(4)}
                          | {f"lora_unet_foo_{i}_bar.lora_up.weight": torch.ones(8, 2) for i in range(4)}),
        "partial": _write(root / "partial.safetensors", {**peft, "unet.not_a_block.to_q.lora_A.weight": torch.ones(r, 32),
                                                         "unet.not_a_block.to_q.lora_B.weight": torch.ones(32, r)}),
        "sdxl": _write(root / "sdxl.safetensors", {
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(1280, 4)}),
        "sd2": _write(root / "sd2.safetensors", {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(4, 1024),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(32, 4)}),
        "loha": _write(root / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.ones(2, 2)}),
        "half": _write(root / "half.safetensors", {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 32)}),
        "truncated": root / "truncated.safetensors",
    }


@pytest.mark.parametrize("name, needle", [
    ("nothing", r"none of its 4 LoRA modules match this model \(cross-attention width 32\), e\.g\. lora_unet_foo_0_bar"),
    ("partial", r"1 of its \d+ LoRA modules match nothing .*unet\.not_a_block\.to_q"),
    ("sdxl", r"a LoRA for SDXL, but the model is SD 1.x/2.x \(this model \(cross-attention width 32\)\)"),
    ("sd2", r"a LoRA for another model family \(it looks like a LoRA for SD 2.x\): .*adapts a 1024->32 layer but "
            r"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k of .* is 32->32"),
    ("loha", "a LoHa \\(LyCORIS\\) file"),
    ("half", "has a lora down matrix but not its partner"),
    ("truncated", "truncated"),
])
def test_bad_loras(tmp_path, loras, tiny_sd1, name, needle):
    bad = _bad_loras(tmp_path, loras["a"])[name]
    with pytest.raises(SourceError, match=needle) as e:
        open_source(tiny_sd1, loras=[f"{bad}:0.7"])
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_lora_spec_parsing(tmp_path, tiny_sd1):
    assert LoraRef.parse("a/b.safetensors:0.7") == LoraRef(Path("a/b.safetensors"), 0.7)
    assert LoraRef.parse("b.safetensors") == LoraRef(Path("b.safetensors"), 1.0)
    assert LoraRef.parse("C:\\loras\\x.safetensors") == LoraRef(Path("C:\\loras\\x.safetensors"), 1.0)
    assert LoraRef.parse("x.safetensors:-1e-1").scale == -0.1
    with pytest.raises(SourceError, match="scale 'strong' is not a number"):
        LoraRef.parse("x.safetensors:strong")
    with pytest.raises(SourceError, match="missing.safetensors: no such LoRA file"):
        open_source(tiny_sd1, loras=[f"{tmp_path / 'missing.safetensors'}:0.5"])


# --- the command line (runs once cli.py takes --lora and merge-lora) ----------------------------


def _cli_has(command: str, flag: str | None = None) -> bool:
    from sdexport.cli import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    return command in choices and (flag is None or flag in choices[command].format_help())


@pytest.mark.skipif(not _cli_has("export", "--lora"), reason="cli.py has no --lora yet")
def test_cli_bad_lora_is_one_line_and_writes_nothing(tmp_path, capsys, loras, tiny_sd1):
    from sdexport.cli import main

    for name in ("nothing", "sd2", "truncated"):
        bad = _bad_loras(tmp_path, loras["a"])[name]
        out = tmp_path / f"out-{name}"
        code = main(["export", str(tiny_sd1), "--lora", f"{bad}:0.7", "--out", str(out), "--quiet"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("sdexport: error: ") and str(bad) in err[0], err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.skipif(not _cli_has("merge-lora"), reason="cli.py has no merge-lora yet")
def test_cli_merge_lora(tmp_path, capsys, loras):
    from sdexport.cli import main

    out = tmp_path / "ab.safetensors"
    assert main(["merge-lora", f"{loras['a']}:0.7", f"{loras['b-kohya']}:0.5", "--out", str(out)]) == 0
    assert {m.rank for m in read_lora(out).modules} == {6}
    code = main(["merge-lora", f"{loras['a']}:0.7", "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err
