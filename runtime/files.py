"""Writing output files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Sequence


def write_file_atomic(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, renamed over ``path`` when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; an output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class OutputFileError(ValueError):
    """An output file cannot be written as asked; the message names it and says why."""


def check_output(path: str | Path, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse up front what publishing would refuse, before any time is spent computing the file."""
    if not str(path):
        raise OutputFileError(f"{flag} is empty; give a file name")
    path = Path(path)
    if _existing_kind(path, flag) is not None and not overwrite:
        raise OutputFileError(f"{path}: already exists; pass --overwrite to replace it")
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        raise OutputFileError(f"{parent}: directory does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFileError(f"{parent}: directory is not writable")
    return path


def _existing_kind(path: Path, flag: str) -> str | None:
    """None when nothing is there; "file" for a regular file; anything else is never replaced (a
    rename over a device node, a FIFO or a symlink would destroy something this program did not make)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputFileError(f"{path}: cannot check the {flag} path ({e.strerror})") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        raise OutputFileError(f"{path}: is a symbolic link; refusing to replace it (remove it or name another file)")
    if stat.S_ISDIR(mode):
        raise OutputFileError(f"{path}: is a directory; {flag} needs a file name")
    raise OutputFileError(f"{path}: exists and is not a regular file; refusing to replace it")


def _stage(path: Path, data: bytes) -> str:
    """``data`` in a temporary file next to ``path`` (same file system, so publishing is a rename)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=os.path.abspath(path.parent))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; an output is an ordinary file
        return tmp
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise OutputFileError(f"{path}: cannot write it ({e.strerror or e})") from None


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    """Rename into place; without ``overwrite``, never over a file that appeared while we worked
    (another run writing the same name): a hard link fails if the name exists."""
    if _existing_kind(path, "output") is not None and not overwrite:
        raise OutputFileError(f"{path}: already exists (written while this run was going); pass --overwrite to replace it")
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputFileError(f"{path}: already exists (written while this run was going); "
                              "pass --overwrite to replace it") from None
    except OSError:  # no hard links here (some network and FAT file systems): claim the name exclusively
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise OutputFileError(f"{path}: already exists (written while this run was going); "
                                  "pass --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_files(items: Sequence[tuple[str | Path, bytes]], overwrite: bool) -> None:
    """Every file written, or none: all are staged before any is published, and a failure removes
    the temporary files and the files this call created (a replaced file cannot come back)."""
    staged: list[tuple[str, Path]] = []
    created: list[Path] = []
    try:
        for path, data in items:
            staged.append((_stage(Path(path), data), Path(path)))
        for tmp, path in staged:
            try:
                _publish(tmp, path, overwrite)
            except OSError as e:
                raise OutputFileError(f"{path}: cannot write it ({e.strerror or e})") from None
            created.append(path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for path in created if not overwrite else ():
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


class ArtifactFileError(ValueError):
    """An artifact's file is outside its folder, missing, or not what the manifest recorded."""


def inside(root: str | Path, relative: str, what: str = "file") -> Path:
    """``root/relative`` with every symlink resolved, refused unless it stays inside ``root``.

    The manifest is untrusted input: an absolute path, ``..`` or a symlink out of the folder would
    otherwise make the runtime read (and a backend parse) any file the user can read.
    """
    root_real = Path(root).resolve()
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise ArtifactFileError(f"{root}: {what} path {relative!r} is not a relative path inside the artifact")
    candidate = Path(relative)
    if candidate.is_absolute() or candidate.drive:
        raise ArtifactFileError(f"{root}: {what} path {relative!r} is absolute; artifact paths must stay inside the folder")
    resolved = (root_real / candidate).resolve()
    if resolved != root_real and root_real not in resolved.parents:
        raise ArtifactFileError(f"{root}: {what} path {relative!r} leads outside the artifact folder")
    return resolved


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdexport"


class HashCache:
    """sha256 of files already verified, keyed by (size, mtime, inode): a warm start hashes nothing.

    Stored in the user's cache folder (never in the artifact, which is untrusted); a cache that
    cannot be read or written only means hashing again, never an error.
    """

    def __init__(self, path: Path | None = None):
        self.path = path if path is not None else user_cache_dir() / "verified-sha256.json"
        self._entries: dict[str, list] | None = None
        self._dirty = False

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            import json

            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    @staticmethod
    def _key(path: Path) -> tuple[str, list]:
        st = path.stat()
        return str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]

    def known(self, path: Path, sha256: str) -> bool:
        key, stamp = self._key(path)
        return self._load().get(key) == [*stamp, sha256]

    def remember(self, path: Path, sha256: str) -> None:
        """Noted in memory; :meth:`save` writes all of them at once."""
        key, stamp = self._key(path)
        self._load()[key] = [*stamp, sha256]
        self._dirty = True

    def save(self) -> None:
        import json

        if not self._dirty:
            return
        entries = self._load()
        self._dirty = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(self.path, json.dumps(entries).encode())
        except OSError:
            pass
