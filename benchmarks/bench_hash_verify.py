"""What verifying an artifact's sha256 costs when a session opens, at SD 1.5 fp32 size.

The runtime checks every component file against the manifest's sha256 when it first opens a session
(runtime.manifest.Manifest.check_files), and remembers a verified file by size, mtime and inode in the
user's cache, so a warm start hashes nothing. This measures both on files of the sizes of the SD 1.5
fp32 OpenVINO export in openvino-cpu-sd15-256.json (4.27 GB; the hash does not depend on the bytes):
the first open (page cache warm, as right after an export or a copy; a cold disk adds its read time)
and the second (verification cache hit).

    python benchmarks/bench_hash_verify.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine_info  # noqa: E402
from runtime.files import HashCache  # noqa: E402
from runtime.manifest import Component, FileRef, Manifest, sha256_file  # noqa: E402

SOURCE = RESULTS / "openvino-cpu-sd15-256.json"


def component_sizes() -> dict[str, int]:
    sizes = json.loads(SOURCE.read_text())["artifact_sizes"]["fp32"]
    return {name: int(entry["bytes"]) for name, entry in sizes.items()}


def write_files(root: Path, sizes: dict[str, int]) -> dict[str, FileRef]:
    refs = {}
    block = os.urandom(1 << 24)
    for name, size in sizes.items():
        path = root / name / "model.bin"
        path.parent.mkdir(parents=True)
        with open(path, "wb") as f:
            for start in range(0, size, len(block)):
                f.write(block[: min(len(block), size - start)])
        refs[name] = FileRef(f"{name}/model.bin", sha256_file(path), size)
    return refs


def manifest_for(root: Path, refs: dict[str, FileRef]) -> Manifest:
    """Only the file list matters to check_files: the model section is left out."""
    components = {n: Component(name=n, role=n, backend="openvino", files=(r,), precision="fp32", inputs=(), outputs=())
                  for n, r in refs.items()}
    return Manifest(model=None, components=components, root=root)  # type: ignore[arg-type]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the 4.27 GB of test files (default: a temporary one)")
    args = parser.parse_args()
    sizes = component_sizes()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(root / "cache")
        refs = write_files(root / "artifact", sizes)
        manifest = manifest_for(root / "artifact", refs)
        first = timed(lambda: manifest.check_files())
        warm = timed(lambda: manifest.check_files())
        sizes_only = timed(lambda: manifest.check_files(verify_hashes=False))
        assert len(HashCache()._load()) == len(refs)
    total = sum(sizes.values())
    result = {"machine": machine_info(), "command": "python benchmarks/bench_hash_verify.py",
              "source_sizes": SOURCE.name, "bytes": total, "files": len(sizes),
              "first_open_seconds": first, "first_open_gb_per_s": total / first / 1e9,
              "warm_open_seconds": warm, "sizes_only_seconds": sizes_only}
    (RESULTS / "hash-verify-sd15.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "hash-verify-sd15.md").write_text(
        "# sha256 verification when a session opens, SD 1.5 fp32 OpenVINO export sizes\n"
        f"machine: {result['machine'].get('cpu', 'this machine')}; command: `{result['command']}`\n\n"
        "| open | seconds |\n|---|---:|\n"
        f"| first (every file hashed, {total / 1e9:.2f} GB in {len(sizes)} files, page cache warm) | {first:.2f} |\n"
        f"| warm start (verified before: same size, mtime, inode) | {warm:.4f} |\n"
        f"| sizes only (what the runtime checked before) | {sizes_only:.4f} |\n\n"
        f"First open: {total / first / 1e9:.2f} GB/s of sha256.\n")
    print((RESULTS / "hash-verify-sd15.md").read_text())


if __name__ == "__main__":
    main()
