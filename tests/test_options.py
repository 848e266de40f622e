"""Typed options: every profile setting declared once, accepted where it is read, read where it is
accepted; flags and their choices from the declarations; the manifest's typed runtime section."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sdexport import profile
from sdexport.cli import build_parser, main
from tests.test_cli_errors import assert_one_line_error, run_cli

# One value per declared setting, none of them its default. The keys must be exactly the declared
# ones: a new setting needs a value here and a reader below.
EVERY_SETTING = {
    "": {"description": "every setting set", "target": "openvino", "precision": "fp16"},
    "shapes": {"static": True, "height": 64, "width": 64, "batch": 1, "sizes": {"sdxl": [1024, 1024]}},
    "cfg": {"mode": "sequential"},
    "backend": {"device": "cpu", "providers": ["CPUExecutionProvider"], "threads": 2, "precision_hint": "f32",
                "performance_hint": "THROUGHPUT", "winograd": "off",
                "compute_units": "cpu-only", "device_loop": "off"},
    "coreml": {"attention": "original", "compress": "palettize6", "minimum_deployment_target": "macOS15",
               "weight_threshold": 4096},
    "tensorrt": {"optimization_level": 4, "timing_cache": "t.cache", "refittable": True, "builder_batch": [1, 1, 2],
                 "builder_size": [64, 128, 256], "hardware_compatibility": "ampere_plus", "qdq_onnx": "qdq-dir",
                 "workspace_mb": 512},
    "onnx": {"optimize": "gpu"},
    "openvino": {"frontend": "onnx", "int4_group_size": 32, "winograd": "f2"},
    "quantize": {"min_psnr": 30.5, "calibration_prompts": 3, "calibration_steps": 5, "activations": "uint8",
                 "eval_samples": 3},
    "validation": {"min_psnr_fp32": 55.0, "min_psnr_reduced": 25.0},
}


def _toml(tables: dict) -> str:
    def value(v):  # JSON scalars and arrays are TOML too; tables are written inline
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in tables[""].items()]
    for name, table in tables.items():
        if name:
            lines += [f"[{name}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _readers():
    """(section, field) -> what the export or the runtime reads for it, from the resolved options and
    the written manifest, through the code that reads it."""
    from runtime.backends.base import SessionOptions
    from sdexport.options import ShapesOptions
    from sdexport.sources.family import ModelFamily
    from sdexport.export.targets.coreml import CoreMLSettings
    from sdexport.export.targets.onnx import optimize_mode
    from sdexport.export.targets.tensorrt import EngineSettings
    from sdexport.quantize.onnx import calibration_settings, min_psnr, static_recipe

    session = lambda m: SessionOptions.from_mapping(m.runtime.backend_options)  # noqa: E731
    readers = {
        ("", "description"): lambda o, m: m.profile["description"],
        ("", "target"): lambda o, m: m.exporter["target"],
        ("", "precision"): lambda o, m: m.component("unet").precision,
        ("shapes", "static"): lambda o, m: m.runtime.static_shape is not None,
        ("shapes", "height"): lambda o, m: m.runtime.static_shape.height,
        ("shapes", "width"): lambda o, m: m.runtime.static_shape.width,
        ("shapes", "batch"): lambda o, m: m.runtime.static_shape.batch,
        # per family: what an SDXL model would get (the tiny SD 1.x model gets height and width)
        ("shapes", "sizes"): lambda o, m: {"sdxl": list(ShapesOptions.from_table(EVERY_SETTING["shapes"]).size_for(
            ModelFamily("sdxl", 1024, 1024)))},
        ("cfg", "mode"): lambda o, m: m.runtime.cfg,
        ("backend", "device_loop"): lambda o, m: m.runtime.device_loop,
        ("backend", "providers"): lambda o, m: list(session(m).providers),
        ("onnx", "optimize"): lambda o, m: optimize_mode(o),
        ("quantize", "min_psnr"): lambda o, m: min_psnr(o),
        ("quantize", "calibration_prompts"): lambda o, m: calibration_settings(o).prompts,
        ("quantize", "calibration_steps"): lambda o, m: calibration_settings(o).steps,
        ("quantize", "activations"): lambda o, m: static_recipe(o).activations,
        ("quantize", "eval_samples"): lambda o, m: o.quantize.eval_samples,  # quantize_component's eval subset
        ("validation", "min_psnr_fp32"): lambda o, m: o.min_psnr_fp32,  # what validate.gate reads
        ("validation", "min_psnr_reduced"): lambda o, m: o.min_psnr_reduced,
    }
    for name in ("device", "threads", "precision_hint", "performance_hint", "winograd", "compute_units"):
        readers[("backend", name)] = lambda o, m, name=name: getattr(session(m), name)
    for name in EVERY_SETTING["coreml"]:
        readers[("coreml", name)] = lambda o, m, name=name: getattr(CoreMLSettings.from_options(o), name)
    for name in EVERY_SETTING["tensorrt"]:
        readers[("tensorrt", name)] = lambda o, m, name=name: _plain(getattr(EngineSettings.from_options(o), name))
    for name in EVERY_SETTING["openvino"]:  # the target's settings are this section
        readers[("openvino", name)] = lambda o, m, name=name: getattr(o.openvino, name)
    return readers


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_every_setting_accepted_is_read_and_every_setting_read_is_accepted(tmp_path, tiny_sd1):
    path = tmp_path / "every.toml"
    path.write_text(_toml(EVERY_SETTING))
    p = profile.load(str(path))  # accepted: [quantize] activations / eval_samples, [backend] device_loop ...
    from sdexport.options import SECTIONS

    declared = {(name, f.name) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    given = {(name, key) for name, table in EVERY_SETTING.items() for key in table}
    assert given == declared
    options = profile.resolve(str(path))
    out = tmp_path / "plan"
    assert main(["export", str(tiny_sd1), "--profile", str(path), "--out", str(out), "--dry-run", "--quiet"]) == 0
    from runtime.manifest import Manifest

    manifest = Manifest.load(out, check_files=False)
    readers = _readers()
    assert set(readers) == declared
    got = {key: readers[key](options, manifest) for key in sorted(declared)}
    assert got == {(s, k): EVERY_SETTING[s][k] for s, k in sorted(declared)}
    assert p.data["quantize"]["activations"] == "uint8"


def test_export_flags_come_from_the_declarations():
    from sdexport import options as declared
    from sdexport.export.targets import coreml

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    export_flags = {s: a for a in sub["export"]._actions for s in a.option_strings}
    for cls, f in declared.flag_fields():
        action = export_flags[f.metadata["flag"]]
        assert action.choices == (f.metadata["choices"] if f.metadata["flag_choices"] else None), f.name
    assert export_flags["--winograd"].choices == declared.WINOGRAD_MODES == ("auto", "off", "f2", "f4")
    assert export_flags["--compress"].choices == declared.COMPRESS_MODES
    assert export_flags["--attention"].choices == declared.ATTENTION_MODES
    assert export_flags["--compute-units"].choices == declared.COMPUTE_UNITS
    assert export_flags["--cfg"].choices == declared.CFG_MODES
    generate_flags = {s: a for a in sub["generate"]._actions for s in a.option_strings}
    assert generate_flags["--winograd"].choices == declared.WINOGRAD_RUN_MODES == ("auto", "off")
    assert generate_flags["--compute-units"].choices == declared.COMPUTE_UNITS
    # the targets' tables follow the declared names
    from sdexport.export.targets import TARGETS

    assert tuple(TARGETS) == declared.TARGETS
    assert set(coreml.COMPRESSION) == set(declared.COMPRESS_MODES) - {"none"}
    assert coreml.COMPRESSION["palettize6"] == ("palettize", 6) and coreml.COMPUTE_UNITS["cpu-and-ne"] == "CPU_AND_NE"


def test_bench_and_quality_share_their_arguments():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    flags = {name: {s for a in sub[name]._actions for s in a.option_strings} for name in ("bench", "quality")}
    shared = {"--reference", "--out", "--prompt", "--seeds", "--scheduler", "--steps", "--height", "--width",
              "--threads", "--device", "--quiet"}
    assert shared <= flags["bench"] & flags["quality"]
    bench = sub["bench"].parse_args(["d", "--reference", "r"])
    quality = sub["quality"].parse_args(["d", "--reference", "r"])
    assert (bench.out, bench.seeds, quality.out, quality.seeds) == ("bench", "1,2", "quality", "1")


def test_flag_checks_name_the_flag(capsys, tmp_path, tiny_sd1):
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", tmp_path / "o", "--calibration-steps", "0")
    assert_one_line_error(code, err, "--calibration-steps must be at least 1")
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", tmp_path / "o", "--min-psnr", "-3")
    assert_one_line_error(code, err, "--min-psnr -3: expected a PSNR in dB")
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", tmp_path / "o", "--attention", "original",
                        "--compute-units", "all")
    assert_one_line_error(code, err, "--compute-units, --attention apply to --target coreml, not onnx")
    assert not (tmp_path / "o").exists()


def test_sections_check_values_built_in_code():
    from sdexport.errors import OptionError
    from sdexport.options import BackendOptions, QuantizeOptions

    with pytest.raises(OptionError, match=r"^quantize.activations: 'int4' is not one of int8, uint8$"):
        QuantizeOptions(activations="int4")
    with pytest.raises(OptionError, match=r"^backend.threads: expected int, got str '2'$"):
        BackendOptions(threads="2")
    assert BackendOptions(providers=["A", "B"]).providers == ("A", "B")


# --- the manifest's typed runtime section --------------------------------------------------------


def _manifest_json():
    from runtime.manifest import Component, FileRef, Manifest, ModelInfo, RunSettings, StaticShape, TensorSpec

    info = ModelInfo(family="sd1", prediction_type="epsilon", latent_channels=4, unet_in_channels=4,
                     vae_scale_factor=8, vae_scaling_factor=0.18215, vae_shift_factor=None, text_hidden_size=32,
                     max_length=77, default_height=64, default_width=64)
    unet = Component(name="unet", role="unet", backend="onnxruntime", files=(FileRef("unet/model.onnx", "0", 1),),
                     precision="fp32", inputs=(TensorSpec("sample", "float32", ("N", 4, 8, 8)),),
                     outputs=(TensorSpec("out_sample", "float32", ("N", 4, 8, 8)),))
    run = RunSettings(cfg="sequential", backend_options={"device": "cpu", "threads": 2}, device_loop="off",
                      static_shape=StaticShape(64, 64, 1), guess_mode_scales=(0.1, 1.0))
    return Manifest(model=info, components={"unet": unet}, exporter={"name": "sdexport"}, runtime=run).to_json()


def test_version_1_manifest_is_read():
    from runtime.manifest import SCHEMA_VERSION, Manifest

    current = _manifest_json()
    assert current["schema_version"] == SCHEMA_VERSION == 2
    v1 = {k: v for k, v in current.items() if k != "runtime"}
    v1["schema_version"] = 1
    v1["exporter"] = {"name": "sdexport", "static_shape": {"height": 64, "width": 64, "batch": 1},
                      "controlnet": {"guess_mode_scales": [0.1, 1.0]}}
    v1["profile"] = {"name": "custom", "cfg": "sequential",
                     "backend_options": {"device": "cpu", "threads": 2, "device_loop": "off"}}
    old, new = Manifest.from_json(v1), Manifest.from_json(current)
    assert old.runtime == new.runtime
    assert old.to_json()["runtime"] == current["runtime"]


def test_newer_manifest_is_refused_in_one_line(capsys, tmp_path):
    data = _manifest_json()
    data["schema_version"] = 999
    (tmp_path / "sdexport.json").write_text(json.dumps(data))
    code, err = run_cli(capsys, "inspect", tmp_path)
    assert_one_line_error(code, err, "schema version 999", "(2)")
