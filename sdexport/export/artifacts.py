"""Writing an artifact directory atomically: build in a temporary sibling, rename into place last.

A crashed or refused export therefore never leaves a directory that looks complete, and an
existing output directory is only replaced (with ``overwrite``) once the new one is whole.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from runtime.files import write_file_atomic  # noqa: F401  (re-exported for the export side)
from sdexport.errors import OptionError


def check_output_dir(out: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse early, before any work, when the output exists and may not be replaced.

    ``--overwrite`` replaces only what is recognisably an earlier export (a directory whose
    ``sdexport.json`` loads), and never one of ``inputs`` (the source), a folder holding one, or a
    folder inside one: a mistyped ``--out`` must not delete a model or a folder of the user's files.
    """
    for given in inputs:
        _check_apart(out, Path(given))
    if out.exists() and not overwrite:
        raise OptionError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: exists and is not a directory")
    if out.exists() and not is_artifact(out):
        raise OptionError(f"{out}: exists and is not an sdexport output (no valid sdexport.json); "
                          "--overwrite replaces only an earlier export, choose another --out")
    parent = _existing_ancestor(out.resolve().parent)
    if not parent.is_dir():
        raise OptionError(f"{parent}: exists and is not a directory")
    if not os.access(parent, os.W_OK):
        raise OptionError(f"{parent}: not writable")


def is_artifact(path: Path) -> bool:
    """A directory an earlier export (or dry run) wrote: its manifest loads. Hand-made JSON does not pass."""
    from runtime.manifest import Manifest, ManifestError

    if path.is_symlink() or not path.is_dir():
        return False
    try:
        Manifest.load(path, check_files=False)
    except (ManifestError, OSError):
        return False
    return True


def _check_apart(out: Path, given: Path) -> None:
    """``out`` may be neither an input, nor hold one, nor lie inside one (the input is never touched)."""
    if not out.exists() or not given.exists():  # a new directory cannot hold an existing input
        return
    a, b = out.resolve(), given.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise OptionError(f"{out}: the output would replace or lie inside the input {given}; choose another --out")


def check_output_file(out: str | Path) -> None:
    """A file output (merge, merge-lora) replaces only a regular file: never a directory, a device,
    a FIFO or a symlink (renaming over one would swap the link, not write where it points)."""
    out = Path(out)
    try:
        mode = out.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise OptionError(f"{out}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise OptionError(f"{out}: exists and is not a regular file; choose another --out")


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


OWNER_MARKER = ".sdexport-partial.json"  # inside a stage: which process builds it


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _write_owner(stage: Path) -> None:
    owner = {"pid": os.getpid(), "start": _process_start(os.getpid()), "boot_id": _boot_id(),
             "host": socket.gethostname()}
    (stage / OWNER_MARKER).write_text(json.dumps(owner), encoding="utf-8")


def _owner_gone(owner: dict) -> bool:
    """True only when the process that built a stage certainly no longer runs (else keep the stage)."""
    if owner.get("host") != socket.gethostname():
        return False  # a shared filesystem: another machine's pids mean nothing here
    boot = _boot_id()
    if boot is not None and owner.get("boot_id") not in (None, boot):
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # it exists (another user's): compare start times below
    start = _process_start(pid)
    return start is not None and owner.get("start") is not None and start != owner["start"]


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the stages of ``out`` that a killed export left behind (SIGKILL runs no cleanup).

    Only stages holding an owner marker whose process is gone go: a concurrent export's stage, or a
    folder without a marker (not ours to judge), stays."""
    parent, removed = out.resolve().parent, []
    for path in parent.glob(f".{glob.escape(out.name)}.partial-*"):
        try:
            owner = json.loads((path / OWNER_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if path.is_dir() and not path.is_symlink() and isinstance(owner, dict) and _owner_gone(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staged_directory(out: Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes ``out``, on error it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite, inputs)
    # Missing parents are ordinary directories the user asked for; only ``out`` itself appears atomically.
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    ordinary_permissions(stage)
    try:
        _write_owner(stage)
        yield stage
        (stage / OWNER_MARKER).unlink()  # the artifact carries no trace of the stage
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

