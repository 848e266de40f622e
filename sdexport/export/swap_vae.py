"""``sdexport export-vae VAE --into ART``: export a VAE on its own and make it an artifact's VAE.

Only the VAE is converted (encoder and decoder, whichever the artifact has), with the artifact's
target, precision, static shape and profile, and checked against torch like any export. The U-Net,
text encoder and ControlNets stay as they are, byte for byte.

The replacement is atomic, with the manifest as the commit point: the new components are written
into a temporary folder inside ART, moved to fresh folders (``vae_decoder.<id>/``) that the current
manifest does not name, and only then is ``sdexport.json`` replaced (one rename) by a manifest whose
file list, sha256s and artifact hash describe the new VAE. An error before that rename removes the
new folders and leaves ART exactly as it was; after it, the old VAE folders are deleted (a crash
there leaves unreferenced folders, never a manifest that disagrees with its files).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

from runtime.files import write_file_atomic
from runtime.manifest import MANIFEST_NAME, Component, FileRef, Manifest, ModelInfo
from sdexport.errors import SdexportError
from sdexport.export.components import vae_decoder_spec, vae_encoder_spec
from sdexport.sources.vae import VaeWeights

VAE_COMPONENTS = ("vae_encoder", "vae_decoder")


class _VaeOnly:
    """What the VAE specs read of a source."""

    def __init__(self, vae: VaeWeights):
        self.vae = vae
        self.vae_config = vae.config

    def load_vae(self):
        return self.vae.load()


def _options(manifest: Manifest):
    """The artifact's export options as far as the VAE needs them: target, precision, shapes, profile."""
    from sdexport import profile

    decoder = manifest.component("vae_decoder")
    static = manifest.runtime.static_shape
    flags = dict(target=manifest.exporter.get("target"), precision=decoder.precision, cfg=manifest.runtime.cfg,
                 height=static.height if static else None, width=static.width if static else None,
                 batch=static.batch if static else None)
    try:
        options = profile.resolve(manifest.profile.get("name") if manifest.profile.get("name") != "custom" else None, **flags)
    except SdexportError:  # a profile file that moved since: the artifact's own settings still apply
        options = profile.resolve(None, **flags)
    size = min(manifest.model.default_height, options.default_size)
    return dataclasses.replace(options, trace_size=size)


def _model_info(info: ModelInfo, vae: VaeWeights) -> ModelInfo:
    if info.family == "upscaler":  # diffusers' upscaler pipeline fixes its scaling factor
        return info
    shift = vae.config.get("shift_factor")
    return dataclasses.replace(info, vae_scaling_factor=float(vae.config.get("scaling_factor", 0.18215)),
                               vae_shift_factor=float(shift) if shift is not None else None)


def export_vae_into(vae_path: str | Path, artifact: str | Path, progress: bool = False,
                    command: list[str] | None = None) -> Manifest:
    from sdexport.export.run import artifact_hash, export_component
    from sdexport.export.targets import get_target

    artifact = Path(artifact)
    manifest = Manifest.load(artifact)
    manifest.check_files(verify_hashes=True)  # swap into a consistent artifact only
    info = manifest.model
    vae = VaeWeights.open(vae_path, manifest.exporter.get("vae_config"))
    vae.check_fits(info.latent_channels, info.vae_scale_factor, str(artifact))
    options = _options(manifest)
    target = get_target(options.target)
    new_info = _model_info(info, vae)
    specs = [spec(_VaeOnly(vae), new_info) for spec in (vae_encoder_spec, vae_decoder_spec)]
    specs = [s for s in specs if s.name in manifest.components]
    stage = Path(tempfile.mkdtemp(prefix=".sdexport-vae-", dir=artifact))
    tag = stage.name.rsplit("-", 1)[-1]
    placed: list[Path] = []
    try:
        new = {}
        for spec in specs:
            component = export_component(spec, target, stage, options, info.vae_scale_factor * 8)
            new[spec.name] = _place(component, stage, artifact, f"{spec.name}.{tag}", placed)
        components = {name: new.get(name, c) for name, c in manifest.components.items()}
        exporter = {**manifest.exporter, "artifact_hash": artifact_hash(components), "vae_config": vae.config,
                    "vae_swap": {"vae": vae.describe(), "command": command or [],
                                 "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
        replaced = dataclasses.replace(manifest, model=new_info, components=components, exporter=exporter)
        replaced.check_files(verify_hashes=True)
        write_file_atomic(artifact / MANIFEST_NAME, (json.dumps(replaced.to_json(), indent=2) + "\n").encode())
    except BaseException:
        for path in placed:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    _remove_unreferenced(manifest, replaced, artifact)
    return Manifest.load(artifact)


def _place(component: Component, stage: Path, artifact: Path, folder: str, placed: list[Path]) -> Component:
    """Move a staged component's folder into the artifact under ``folder``; its file refs follow."""
    os.replace(stage / component.name, artifact / folder)
    placed.append(artifact / folder)
    files = tuple(FileRef(folder + ref.path[len(component.name):], ref.sha256, ref.bytes) for ref in component.files)
    return dataclasses.replace(component, files=files)


def _remove_unreferenced(old: Manifest, new: Manifest, artifact: Path) -> None:
    """The old VAE's folders, once the new manifest no longer names them."""
    def tops(m: Manifest) -> set[str]:
        return {ref.path.split("/", 1)[0] for c in m.components.values() for ref in c.files}

    for top in tops(old) - tops(new):
        path = old.path(top, "old VAE folder")  # resolved inside the artifact, never outside it
        if path != artifact.resolve() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
