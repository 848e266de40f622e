"""Run-time LoRAs: the export's weight map, LoRAs patched into ONNX Runtime / OpenVINO sessions against
diffusers' ``load_lora_weights`` + ``set_adapters``, switching without reloading what did not change,
fp16 exports, quantized exports refused, and LoRAs that do not fit refused in one line.

The LoRAs are tests/test_lora.py's: PEFT-made on the tiny U-Net (attention, feed-forward, proj_in /
proj_out, resnet convolutions) and text encoder, random non-zero up matrices, and their kohya renaming.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime import Pipeline
from runtime.manifest import Manifest
from runtime.metrics import psnr
from runtime.pipeline import PipelineInputError
from tests.test_lora import diffusers_with_loras, make_lora, to_kohya
from tests.test_sources import diffusers_txt2img, run_export

MIN_PSNR = 45.0  # the project's image parity floor against diffusers
PROMPT = "a red circle in the top left on a blue background"
NEGATIVE = "blurry"
STEPS = 4


def _export(model: Path, out: Path, target: str, precision: str = "fp32") -> Path:
    from sdexport.export.run import export
    from sdexport.export.targets.base import ExportOptions

    export(model, out, ExportOptions(target=target, precision=precision, validate=False), progress=False)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_sd1) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-lora")
    return {"onnx": _export(tiny_sd1, root / "onnx", "onnx"), "openvino": _export(tiny_sd1, root / "openvino", "openvino")}


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_sd1) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-lora-files")
    a = make_lora(tiny_sd1, root / "a.safetensors", seed=1, rank=4, alpha=8.0)
    b = make_lora(tiny_sd1, root / "b.safetensors", seed=2, rank=2, alpha=2.0)
    unet_only = root / "a-unet.safetensors"
    save_file({k: v for k, v in load_file(str(a)).items() if k.startswith("unet.")}, str(unet_only))
    return {"a": a, "b": b, "a-kohya": to_kohya(a, root / "a-kohya.safetensors", 8.0),
            "b-kohya": to_kohya(b, root / "b-kohya.safetensors", 2.0), "a-unet": unet_only}


_REFERENCES: dict = {}


def reference(model: Path, files: list[Path], scales: list[float]) -> np.ndarray:
    """diffusers with the LoRAs as adapters (not fused), once per combination."""
    key = (tuple(map(str, files)), tuple(scales))
    if key not in _REFERENCES:
        pipe = diffusers_with_loras(model, files, scales, fuse=False)
        _REFERENCES[key] = diffusers_txt2img(pipe, PROMPT, steps=STEPS, negative_prompt=NEGATIVE)
    return _REFERENCES[key]


def image(pipe: Pipeline) -> np.ndarray:
    result = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, height=64, width=64, seed=3, rng="torch")
    return np.asarray(result.images[0].convert("RGB"), np.float64)


# --- the weight map ------------------------------------------------------------------------------


def test_weight_map_covers_every_linear_and_conv(exports, tiny_sd1):
    """Every Linear / Conv2d weight of the U-Net and the text encoder (attention, MLP, proj_in/out,
    resnets) is in the manifest, with the stored tensor's name, layout, shape and dtype."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from runtime.lora.onnx_weights import OnnxWeights

    models = {"unet": UNet2DConditionModel.from_pretrained(str(tiny_sd1), subfolder="unet"),
              "text_encoder": CLIPTextModel.from_pretrained(str(tiny_sd1), subfolder="text_encoder")}
    for target, artifact in exports.items():
        manifest = Manifest.load(artifact)
        for name, model in models.items():
            layers = {n: m.weight.detach().numpy() for n, m in model.named_modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
            if name == "text_encoder":
                layers = {"text_model." + n.removeprefix("text_model."): w for n, w in layers.items()}
            weights = manifest.component(name).weights
            assert set(weights) == set(layers), (target, name, sorted(set(layers) ^ set(weights))[:4])
            assert any(r.transposed for r in weights.values()) == (target == "onnx")  # MatMul initializers are [in, out]
            if target == "onnx":
                with OnnxWeights(artifact / name / "model.onnx") as stored:
                    for module, ref in weights.items():
                        expected = layers[module].T if ref.transposed else layers[module]
                        np.testing.assert_array_equal(stored[ref.name], expected, err_msg=module)
        assert manifest.component("unet").weights["down_blocks.0.attentions.0.proj_in"].ldm == "input_blocks.1.1.proj_in"
        assert not manifest.component("vae_decoder").weights


def test_old_manifest_without_weight_map_loads_and_refuses_loras(exports, tmp_path, loras):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(exports["onnx"], old)
    data = json.loads((old / "sdexport.json").read_text())
    for component in data["components"].values():
        component.pop("weights", None)
    (old / "sdexport.json").write_text(json.dumps(data))
    assert not Manifest.load(old).component("unet").weights
    with pytest.raises(PipelineInputError, match="no weight map for run-time LoRAs .* export it again"):
        Pipeline.from_dir(old, loras=[loras["a"]])


# --- parity with diffusers -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_runtime_loras_match_diffusers(exports, loras, tiny_sd1, target):
    """One LoRA, then two with scales (diffusers/PEFT and kohya files), on one pipeline: set_loras
    re-creates only the sessions whose weights change."""
    pipe = Pipeline.from_dir(exports[target])
    base = image(pipe)
    cases = [([loras["a"]], [0.8], [loras["a"]]),
             ([loras["a"], loras["b"]], [0.7, 0.5], [loras["a"], loras["b"]]),
             ([loras["a-kohya"], loras["b-kohya"]], [0.7, 0.5], [loras["a"], loras["b"]])]
    for files, scales, reference_files in cases[: 3 if target == "onnx" else 2]:
        pipe.set_loras(list(zip(files, scales)))
        ours = image(pipe)
        value = psnr(reference(tiny_sd1, reference_files, scales), ours, peak=255.0)
        print(f"{target} {[f.name for f in files]} {scales}: PSNR {value:.1f} dB vs diffusers set_adapters")
        assert value >= MIN_PSNR, f"{target} {files}: PSNR {value:.1f} dB"
        assert psnr(base, ours, peak=255.0) < 35.0, "the LoRAs should change the image"
    vae = pipe._sessions["vae_decoder"]
    assert pipe.set_loras([]) == {"unet", "text_encoder"}
    assert pipe._sessions["vae_decoder"] is vae
    assert np.array_equal(image(pipe), base), "no LoRA after a LoRA gives back the base image exactly"


def test_switching_keeps_unchanged_sessions(exports, loras):
    pipe = Pipeline.from_dir(exports["onnx"], loras=[(loras["a-unet"], 0.8)])
    pipe.warmup()
    kept = {name: pipe._sessions[name] for name in ("text_encoder", "vae_decoder")}
    assert pipe.set_loras([f"{loras['a-unet']}:0.8"]) == set()  # the same LoRAs: nothing reloads
    assert pipe.set_loras([(loras["a-unet"], 0.4)]) == {"unet"}  # the text encoder is untouched by this LoRA
    assert all(pipe._sessions[n] is s for n, s in kept.items())
    assert pipe.generate(PROMPT, steps=2, height=64, width=64).settings["loras"] == [[str(loras["a-unet"]), 0.4]]


# --- precisions ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp16_export_takes_loras(tmp_path, loras, tiny_sd1):
    """Patched in fp16 (the stored dtype); the image against diffusers' fp32 with the same LoRAs."""
    artifact = _export(tiny_sd1, tmp_path / "fp16", "onnx", "fp16")
    assert {r.dtype for r in Manifest.load(artifact).component("unet").weights.values()} == {"float16"}
    pipe = Pipeline.from_dir(artifact, loras=[(loras["a"], 0.7), (loras["b"], 0.5)])
    ours = image(pipe)
    value = psnr(reference(tiny_sd1, [loras["a"], loras["b"]], [0.7, 0.5]), ours, peak=255.0)
    print(f"onnx fp16 with two LoRAs: PSNR {value:.1f} dB vs diffusers fp32 set_adapters")
    assert value >= 35.0, f"PSNR {value:.1f} dB"


# --- LoRAs that do not fit -----------------------------------------------------------------------


def _bad(root: Path, good: Path) -> dict[str, Path]:
    peft = load_file(str(good))
    return {
        "unknown": _save(root / "unknown.safetensors", {**peft, "unet.not_a_block.to_q.lora_A.weight": torch.ones(4, 32),
                                                          "unet.not_a_block.to_q.lora_B.weight": torch.ones(32, 4)}),
        "shape": _save(root / "shape.safetensors", {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(4, 1024),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(32, 4)}),
        "loha": _save(root / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.ones(2, 2)}),
    }


def _save(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("name, needle", [
    ("unknown", r"unknown.safetensors: unet.not_a_block.to_q.lora_A.weight: adapts not_a_block.to_q, which the unet"),
    ("shape", r"shape.safetensors: lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight: "
              r"adapts a 1024->32 layer but down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k of this export is 32->32"),
    ("loha", r"a LoHa \(LyCORIS\) file"),
])
def test_bad_loras_fail_in_one_line(exports, loras, tmp_path, name, needle):
    pipe = Pipeline.from_dir(exports["onnx"], loras=[loras["a"]])
    with pytest.raises(PipelineInputError, match=needle) as e:
        pipe.set_loras([loras["b"], _bad(tmp_path, loras["a"])[name]])
    assert "\n" not in str(e.value)
    assert pipe.loras == ((str(loras["a"]), 1.0),)  # nothing changed


def test_quantized_export_refuses_with_the_export_to_make(exports, tmp_path, loras, tiny_sd1):
    """An int8 text encoder, quantized as ``--precision int8`` does (onnxruntime's dynamic quantization,
    int8 per-channel MatMul weights): its weights are int8 codes with per-channel scales, not float
    matrices a delta could be added to (none of its MatMul weights is found as a float any more)."""
    import json
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import CLIPTextModel

    from runtime.manifest import FileRef
    from sdexport.export.weight_map import match, onnx_weights, torch_layers

    artifact = tmp_path / "int8"
    shutil.copytree(exports["onnx"], artifact)
    path = artifact / "text_encoder" / "model.onnx"
    quantize_dynamic(str(path), str(path), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    layers = torch_layers(CLIPTextModel.from_pretrained(str(tiny_sd1), subfolder="text_encoder"))
    assert match(layers, onnx_weights(path)) == {}, "a quantized MatMul weight still stored as floats"
    data = json.loads((artifact / "sdexport.json").read_text())
    entry = data["components"]["text_encoder"]
    entry.update(precision="int8", files=[FileRef.of(artifact, path).to_json()])
    entry.pop("weights")
    (artifact / "sdexport.json").write_text(json.dumps(data))
    with pytest.raises(PipelineInputError, match=r"^text_encoder of this export is int8: export with --precision fp16 "
                                                 r"or fp32 to use run-time LoRAs"):
        Pipeline.from_dir(artifact, loras=[loras["a"]])


def test_cli_generate_with_lora(exports, loras, tmp_path, capsys):
    from PIL import Image

    from sdexport.cli import main

    out = tmp_path / "x.png"
    args = ["generate", str(exports["onnx"]), "--prompt", PROMPT, "--steps", "2", "--height", "64", "--width", "64",
            "--quiet", "--lora", f"{loras['a']}:0.7", "--lora", str(loras["b-kohya"])]
    assert main(args + ["--output", str(out)]) == 0
    assert Image.open(out).text["loras"] == f'[["{loras["a"]}", 0.7], ["{loras["b-kohya"]}", 1.0]]'
    bad = _bad(tmp_path, loras["a"])["shape"]
    code = main(args[:-2] + ["--lora", f"{bad}:0.5", "--output", str(tmp_path / "y.png")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "attn2_to_k.lora_down.weight: adapts a 1024->32 layer" in err[0], err
    assert not (tmp_path / "y.png").exists()


def test_external_data_weights_are_patched_too(exports, loras, tmp_path):
    """Exports over 2 GB keep weights in model.onnx_data: those are replaced through
    add_external_initializers, the inline ones in the model bytes; the image is the inline export's."""
    import json
    import shutil

    import onnx

    from runtime.manifest import FileRef

    artifact = tmp_path / "external"
    shutil.copytree(exports["onnx"], artifact)
    path = artifact / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=5000)  # 3x3 convolutions external, the 32x32 MatMul weights inline
    data = json.loads((artifact / "sdexport.json").read_text())
    data["components"]["unet"]["files"] = [FileRef.of(artifact, p).to_json() for p in (path, path.with_name("model.onnx_data"))]
    (artifact / "sdexport.json").write_text(json.dumps(data))
    specs = [(loras["a"], 0.7), (loras["b"], 0.5)]
    assert np.array_equal(image(Pipeline.from_dir(artifact, loras=specs)), image(Pipeline.from_dir(exports["onnx"], loras=specs)))
