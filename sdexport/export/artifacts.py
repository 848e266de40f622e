"""Writing an artifact directory atomically: build in a temporary sibling, rename into place last.

A crashed or refused export therefore never leaves a directory that looks complete, and an
existing output directory is only replaced (with ``overwrite``) once the new one is whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from runtime.files import write_file_atomic  # noqa: F401  (re-exported for the export side)
from sdexport.errors import OptionError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse early, before any work, when the output exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise OptionError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: exists and is not a directory")
    parent = _existing_ancestor(out.resolve().parent)
    if not parent.is_dir():
        raise OptionError(f"{parent}: exists and is not a directory")
    if not os.access(parent, os.W_OK):
        raise OptionError(f"{parent}: not writable")


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path`` and its parents that exists (the one the missing ones are created in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def ordinary_permissions(path: Path) -> None:
    """Give a file or directory made by mkstemp/mkdtemp (private: 0600/0700) the user's umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def staged_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes ``out``, on error it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    # Missing parents are ordinary directories the user asked for; only ``out`` itself appears atomically.
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    ordinary_permissions(stage)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        # Move the old directory aside first so that ``out`` is never half old, half new.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

