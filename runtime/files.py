"""Writing output files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


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
        import json

        key, stamp = self._key(path)
        entries = self._load()
        entries[key] = [*stamp, sha256]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(self.path, json.dumps(entries).encode())
        except OSError:
            pass
