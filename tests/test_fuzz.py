"""Issue 16's fuzz test: seeded random mutations of a real manifest, profile and safetensors header.

Whatever the mutation, sdexport either succeeds or exits 2 with one line: never an internal error
(exit 1, "internal error", a traceback), and it writes nothing outside the output path."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

from sdexport.cli import _user_errors, main
from tests.test_cli_errors import assert_one_line_error

SEED = 16
ODD_VALUES = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**70, -2**70, 1e308, -1e-308, float("nan"),
              float("inf"), -float("inf"), 0.5, "", "x", "nan", "float16", "bfloat16", "../../../etc/passwd",
              "/etc/passwd", "~/x", "unet/../../x", "\x00", "é東", "a" * 5000, [], {}, [1, "a", None], {"k": "v"},
              [[[[[[[[1]]]]]]]]]


def tree_paths(node, prefix=()):
    """Every place in a JSON-like tree, as a tuple of keys and indices (the root is ())."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from tree_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from tree_paths(v, prefix + (i,))


def mutate_tree(rng: random.Random, doc, odd=ODD_VALUES):
    """One to three random edits: replace a value, delete it, wrap it, nest it deep, rename a key."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(tree_paths(doc)))
        if not path:
            doc = rng.choice([[doc], "x", 3, {"schema_version": 2}]) if rng.random() < 0.05 else doc
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key, value = path[-1], parent[path[-1]]
        op = rng.choice(["replace", "replace", "replace", "delete", "list", "dict", "deep", "rename", "number"])
        if op == "delete":
            del parent[key]
        elif op == "list":
            parent[key] = [value]
        elif op == "dict":
            parent[key] = {"value": value}
        elif op == "deep":
            for _ in range(rng.choice([2, 50, 500])):
                value = [value]
            parent[key] = value
        elif op == "rename" and isinstance(parent, dict):
            parent[key + "_"] = parent.pop(key)
        elif op == "number":
            parent[key] = rng.choice([-1, 0, 2**64, 1e300, float("nan"), 7])
        else:
            parent[key] = copy.deepcopy(rng.choice(odd))
    return doc


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Flip, insert or cut bytes: what a damaged download gives."""
    data = bytearray(data)
    op = rng.choice(["flip", "insert", "truncate"])
    if op == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == "insert":
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.choice([b"\xff\xfe", b"{", b"]", b"\x00" * 3, b'"', b"[" * 5000])
    else:
        data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def listing(*roots: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    files = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p not in skip:
                files[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sd1) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "onnx"
    assert main(["export", str(tiny_sd1), "--out", str(out), "--quiet", "--no-validate"]) == 0
    return out


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A private temporary directory and working directory, so that any stray write shows up."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def check_cli(capsys, argv) -> int:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "internal error" not in captured.err and "Traceback" not in captured.err, (argv, captured.err)
    if code != 0:
        assert code == 2, (argv, captured.err)
        assert_one_line_error(code, captured.err)
    return code


def dumps(doc, **kwargs) -> str:
    """JSON text, or (nested too deep for json.dumps itself) a deep nesting written by hand."""
    try:
        return json.dumps(doc, allow_nan=True, **kwargs)
    except RecursionError:
        return '{"schema_version": 2, "model": ' + "[" * 100_000 + "]" * 100_000 + "}"


def write_manifest(path: Path, doc, rng: random.Random) -> None:
    text = dumps(doc, indent=1)
    if rng.random() < 0.15:
        text = mutate_bytes(rng, text.encode()).decode("utf-8", "replace")
    if rng.random() < 0.02:
        text = "[" * 100_000 + "]" * 100_000
    path.write_text(text, encoding="utf-8")


def test_manifest_mutations(capsys, sandbox, exported):
    from runtime.manifest import Manifest, ManifestError

    art = Path(shutil.copytree(exported, sandbox / "art"))
    manifest_path = art / "sdexport.json"
    original = json.loads(manifest_path.read_text())
    before = listing(sandbox, skip=(manifest_path,))
    rng = random.Random(SEED)
    generated, cases = 0, 250
    for case in range(cases):
        write_manifest(manifest_path, mutate_tree(rng, original), rng)
        code = check_cli(capsys, ["inspect", art, *rng.choice([[], ["--json"], ["--verify"]])])
        try:
            Manifest.load(art, check_files=False).check_paths()
        except ManifestError:
            pass
        if code == 0 and generated < 10:  # the loadable ones are the interesting ones to run
            generated += 1
            out = sandbox / "work" / "x.png"
            check_cli(capsys, ["generate", art, "--prompt", "a cat", "--steps", "1", "--height", "64", "--width", "64",
                               "-o", out, "--overwrite", "--quiet"])
            out.unlink(missing_ok=True)
    manifest_path.write_text(json.dumps(original))
    assert listing(sandbox, skip=(manifest_path,)) == before
    assert generated >= 3  # some mutations leave a runnable artifact, so generate really ran


def to_toml(data: dict) -> str:
    """A small TOML writer (tomllib only reads): top-level scalars, then one [table] per dict."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items() if x is not None) + "}"
        return json.dumps(str(v))

    if not isinstance(data, dict):  # the mutation replaced the whole document
        data = {"target": data}
    lines = [f"{json.dumps(k)} = {value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    for k, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{json.dumps(k)}]")
            lines += [f"{json.dumps(kk)} = {value(v)}" for kk, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def test_profile_mutations(capsys, sandbox, tiny_sd1):
    import tomllib

    from sdexport import profile

    shipped = sorted(Path(profile.PROFILE_DIR).glob("*.toml"))
    rng = random.Random(SEED)
    path = sandbox / "p.toml"
    before = listing(sandbox, skip=(path,))
    planned = 0
    for case in range(150):
        original = tomllib.loads(rng.choice(shipped).read_text())
        try:
            if case == 0:
                raise RecursionError  # one deep nesting for sure
            text = to_toml(mutate_tree(rng, original, [v for v in ODD_VALUES if v is not None]))
        except RecursionError:  # nested too deep for this writer: write the nesting by hand
            text = "height = " + "[" * 2000 + "1" + "]" * 2000 + "\n" + to_toml(original)
        path.write_bytes(mutate_bytes(rng, text.encode()) if rng.random() < 0.2 else text.encode())
        try:
            options = profile.resolve(str(path))
        except _user_errors():
            continue
        if planned < 10 and options.target in ("onnx", "openvino", "tensorrt", "coreml"):
            planned += 1
            out = sandbox / "work" / f"plan{case}"
            check_cli(capsys, ["export", tiny_sd1, "--profile", path, "--out", out, "--dry-run", "--quiet"])
            shutil.rmtree(out, ignore_errors=True)
    after = listing(sandbox, skip=(path,))
    assert after == before


def tiny_lora(path: Path) -> Path:
    """A real kohya LoRA for the SD 1.x U-Net's first attention projection, rank 2."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": rng.standard_normal((2, 32), dtype=np.float32),
               f"{name}.lora_up.weight": rng.standard_normal((32, 2), dtype=np.float32),
               f"{name}.alpha": np.array(2.0, dtype=np.float32)}, str(path), metadata={"ss_network_dim": "2"})
    return path


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header, body = data[8:8 + n], data[8 + n:]
    choice = rng.random()
    if choice < 0.6:
        doc = mutate_tree(rng, json.loads(header))
        header = dumps(doc).encode()
    elif choice < 0.85:
        header = mutate_bytes(rng, header)
    else:
        return mutate_bytes(rng, data)
    if rng.random() < 0.1:
        return struct.pack("<Q", rng.choice([0, 1, n + 7, 2**63])) + header + body
    return struct.pack("<Q", len(header)) + header + body


def test_safetensors_header_mutations(sandbox):
    from runtime.safetensors import SafetensorsError, SafetensorsFile
    from sdexport.sources.lora import read_lora

    real = tiny_lora(sandbox / "real.safetensors").read_bytes()
    path = sandbox / "lora.safetensors"
    before = listing(sandbox, skip=(path,))
    rng = random.Random(SEED)
    for case in range(300):
        path.write_bytes(mutate_safetensors(rng, real))
        try:
            f = SafetensorsFile(path)
            for name in f.keys():
                f.read_bytes(name)
        except SafetensorsError:
            pass
        try:
            read_lora(path)
        except _user_errors():
            pass
    assert listing(sandbox, skip=(path,)) == before
