"""Checkpoint merging (SD + SD -> SD), streamed tensor by tensor.

Per tensor, with A and B the models to merge, C the base of an add-difference merge and alpha the
weight of B (computed in float32, or float64 for float64 tensors, then stored in A's dtype):

    weighted         (1 - alpha) * A + alpha * B
    add-difference   A + alpha * (B - C)            ("add what B learned on top of C to A")

Tensors that are not floating point (e.g. CLIP's position ids) are A's. EMA copies (``model_ema.*``)
are not merged and not written: inference does not use them. The U-Net's input convolution of an
inpainting A with an ordinary B (and C) merges the channels they share and keeps A's mask channels,
which is how an inpainting model is made from a fine-tune ("A = SD inpainting, B = fine-tune, C = SD").

Memory: the header of the output is written from the inputs' headers, then each tensor is read with a
plain file read (large ones in blocks of rows: the formulas are elementwise), merged and appended, so the
process holds a few blocks at a time, not a model
(safetensors' own loader memory-maps the file, and the pages it touches count as the process's
resident memory until the map closes). ``benchmarks/bench_merge.py`` measures the peak.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from sdexport.errors import OptionError, SourceError
from sdexport.sources.checkpoint import Checkpoint, SafetensorsWriter
from sdexport.sources.detect import detect

METHODS = ("weighted", "add-difference")
SKIP_PREFIXES = ("model_ema.",)
CHUNK_BYTES = 16 * 1024 * 1024  # rows of a large tensor read, merged and written together
INPAINT_CONV_IN = ("model.diffusion_model.input_blocks.0.0.weight", "unet.conv_in.weight")


def _check_is_model(checkpoint: Checkpoint) -> None:
    detect(checkpoint.tensors, checkpoint.path)  # a LoRA, an SDXL file, a VAE ... -> SourceError


class _Blocks:
    """Buffers reused by every block of rows. A fresh allocation per block left the process's peak to
    the allocator: glibc's dynamic mmap threshold kept ~20 MB more resident in about half of the runs
    of tests/test_merge.py (45.8 vs 25.3 MB added for two 101 MB checkpoints, measured)."""

    def __init__(self) -> None:
        self._raw: dict[str, torch.Tensor] = {}

    def raw(self, role: str, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer of at least ``nbytes`` for ``role``, grown only when a block needs more."""
        buffer = self._raw.get(role)
        if buffer is None or buffer.numel() < nbytes:
            self._raw.pop(role, None)
            buffer = self._raw[role] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer

    def tensor(self, role: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n = like.numel() * dtype.itemsize
        return self.raw(role, n)[:n].view(dtype).reshape(like.shape)

    def merge(self, a: torch.Tensor, b: torch.Tensor, alpha: float, method: str,
              c: torch.Tensor | None) -> torch.Tensor:
        """One block of the merge, in A's dtype, computed in float32 (float64 for float64) in the
        reused buffers."""
        if not a.is_floating_point():
            return a
        compute = torch.float64 if a.dtype == torch.float64 else torch.float32
        x = self.tensor("x", a, compute).copy_(a)
        y = self.tensor("y", b, compute).copy_(b)
        if method == "weighted":
            x.mul_(1 - alpha).add_(y.mul_(alpha))  # (1 - alpha) * a + alpha * b
        else:
            y.sub_(self.tensor("z", c, compute).copy_(c))
            x.add_(y.mul_(alpha))  # a + alpha * (b - c)
        return x if a.dtype == compute else self.tensor("out", a, a.dtype).copy_(x)


def merge_tensor(a: torch.Tensor, b: torch.Tensor, alpha: float, method: str = "weighted",
                 c: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of the merge, in A's dtype (see the module docstring for the formulas)."""
    return _Blocks().merge(a, b, alpha, method, c)


def merge_checkpoints(a: str | Path, b: str | Path, alpha: float, out: str | Path, method: str = "weighted",
                      base: str | Path | None = None, overwrite: bool = False) -> dict:
    """Merge two single-file checkpoints (``.safetensors`` or ``.ckpt``) into a new ``.safetensors``.

    Returns a summary (counts of merged / copied / partially merged tensors). Nothing is written
    unless the whole merge succeeds (the output is written beside its name and renamed at the end).
    """
    out = Path(out)
    inputs = [Path(p) for p in (a, b, base) if p is not None]
    _check_options(method, base, out, inputs, overwrite)
    alpha = float(alpha)
    with contextlib.ExitStack() as stack:
        cks = [stack.enter_context(Checkpoint.open(p)) for p in inputs]
        for ck in cks:
            _check_is_model(ck)
        names = _shared_names(cks)
        partial = _partially_shared(cks, names)
        ca, cb, cc = cks[0], cks[1], cks[2] if base is not None else None
        meta = {"format": "pt", "sdexport_merge": json.dumps({
            "method": method, "alpha": alpha, "a": ca.path.name, "b": cb.path.name,
            "base": cc.path.name if cc is not None else None})}
        counts = {"merged": 0, "copied": 0, "partial": len(partial), "skipped": len(ca.keys()) - len(names)}
        blocks = _Blocks()
        with SafetensorsWriter(out, [(k, ca.tensors[k].dtype, ca.tensors[k].shape) for k in names], meta) as writer:
            for k in names:
                counts["merged" if ca.tensors[k].dtype.is_floating_point else "copied"] += 1
                if k in partial:
                    writer.write(k, _merge_partial(k, cks, alpha, method))
                else:
                    _merge_streamed(writer, k, cks, alpha, method, blocks)
        return {"out": str(out), "method": method, "alpha": alpha, "tensors": counts}


def _check_options(method: str, base, out: Path, inputs: list[Path], overwrite: bool) -> None:
    if method not in METHODS:
        raise OptionError(f"merge method {method!r}: use {' or '.join(METHODS)}")
    if (method == "add-difference") != (base is not None):
        raise OptionError("add-difference needs --base C (A + alpha * (B - C)); weighted takes no base")
    if out.suffix != ".safetensors":
        raise OptionError(f"{out}: the merged checkpoint is written as .safetensors")
    for p in inputs:
        if p.exists() and p.resolve() == out.resolve():
            raise OptionError(f"{out}: the output would overwrite an input")
    if out.exists() and not overwrite:
        raise OptionError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.resolve().parent.is_dir():
        raise OptionError(f"{out.resolve().parent}: directory does not exist")


def _shared_names(cks: list[Checkpoint]) -> list[str]:
    """A's tensor names (EMA copies left out); every other input must have exactly these."""
    ca = cks[0]
    names = [k for k in ca.keys() if not k.startswith(SKIP_PREFIXES)]
    for ck in cks[1:]:
        own = {k for k in ck.keys() if not k.startswith(SKIP_PREFIXES)}
        missing = [k for k in names if k not in own]
        extra = sorted(own - set(names))
        if missing or extra:
            raise SourceError(
                f"{ck.path} does not have the layout of {ca.path}: "
                + "; ".join(filter(None, [
                    f"{len(missing)} tensors missing, e.g. {', '.join(missing[:3])}" if missing else "",
                    f"{len(extra)} extra, e.g. {', '.join(extra[:3])}" if extra else ""]))
                + " (merge models of the same family)")
    return names


def _partially_shared(cks: list[Checkpoint], names: list[str]) -> set[str]:
    """Tensors whose shapes differ only as an inpainting A's input convolution differs from an
    ordinary model's (more input channels in A); any other difference is an error."""
    partial = set()
    for k in names:
        shapes = [ck.tensors[k].shape for ck in cks]
        if len(set(shapes)) == 1:
            continue
        sa, rest = shapes[0], shapes[1:]
        if k in INPAINT_CONV_IN and all(len(s) == 4 and s[0] == sa[0] and s[2:] == sa[2:] and s[1] < sa[1]
                                        and s == rest[0] for s in rest):
            partial.add(k)
            continue
        raise SourceError(f"{k} is {list(sa)} in {cks[0].path} but {list(rest[0])} in {cks[1].path} "
                          "(merge models of the same family)")
    return partial


def _merge_partial(k: str, cks: list[Checkpoint], alpha: float, method: str) -> torch.Tensor:
    """A's tensor with the input channels the others share merged, A's extra (mask) channels kept."""
    ta, tb = cks[0].get(k), cks[1].get(k)
    tc = cks[2].get(k) if len(cks) > 2 else None
    n = tb.shape[1]
    merged = ta.clone()
    merged[:, :n] = merge_tensor(ta[:, :n], tb, alpha, method, tc)
    return merged


def _merge_streamed(writer: SafetensorsWriter, k: str, cks: list[Checkpoint], alpha: float, method: str,
                    blocks: _Blocks) -> None:
    """One tensor, merged and appended in blocks of rows (the formulas are elementwise)."""
    ca, cb, cc = cks[0], cks[1], cks[2] if len(cks) > 2 else None
    info = ca.tensors[k]
    if not info.shape:
        writer.write(k, merge_tensor(ca.get(k), cb.get(k), alpha, method, cc.get(k) if cc is not None else None))
        return
    row = max(1, info.nbytes // info.shape[0])
    step = max(1, CHUNK_BYTES // row)
    size = min(step, info.shape[0]) * row
    for start in range(0, info.shape[0], step):
        stop = min(start + step, info.shape[0])
        tc = cc.get_rows(k, start, stop, blocks.raw("c", size)) if cc is not None else None
        writer.write_rows(k, blocks.merge(ca.get_rows(k, start, stop, blocks.raw("a", size)),
                                          cb.get_rows(k, start, stop, blocks.raw("b", size)),
                                          alpha, method, tc))
