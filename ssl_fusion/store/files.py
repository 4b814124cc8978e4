"""The artifact store: encoders and cached features addressed by a hash of everything that made them.

Layout: ``<artifacts_dir>/<kind>/<label>-<key>/`` holding the files and ``manifest.json``. An
artifact is built in a staging folder and renamed into place with its manifest already inside, so
a folder with a manifest is complete; a lock per artifact keeps concurrent jobs from building it twice.
Reading a complete artifact needs no lock, so a read-only store serves what it holds. A full disk is refused in one
line and leaves no staging folder; one left by a killed build is removed by the next build that takes a lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Optional

from ssl_fusion import __version__
from ssl_fusion.runtime.errors import UserError

MANIFEST = "manifest.json"
# Content hashes of files outside the store (checkpoints, hub weights) by resolved path, with the size and mtime of the
# version hashed: an unchanged file is not read again.
FILE_HASHES = "file_hashes.json"
STAGING = ".staging-"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
# An artifact's name becomes a folder and a lock file: one path component, no hidden or relative one.
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


def full_disk(error: OSError, what: str) -> UserError | None:
    """The one-line refusal of a write that failed because the disk (or the user's quota) is full; None otherwise."""
    if error.errno not in FULL_DISK:
        return None
    return UserError(f"no space left on the device to write {what} ({error.strerror}); free some space and run again")


def content_key(payload: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description of how an artifact is made."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, rename: readers see all or nothing. A failed write
    removes its temporary file; a full disk is a one-line UserError naming the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        refusal = full_disk(error, f"'{path}'") if isinstance(error, OSError) else None
        if refusal is not None:
            raise refusal from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, kind: str, name: str) -> Path:
        if not ARTIFACT_NAME.fullmatch(name):
            raise UserError(
                f"artifact name {name!r}: letters, digits and _ . + = - only, not starting with . or -; "
                "a name is one folder of the store"
            )
        return self.root / kind / name

    def file_hash(self, path: str | Path) -> str:
        """The sha256 of a file outside the store, read once per version (resolved path, size, mtime_ns) and kept in
        ``FILE_HASHES``. Concurrent writers may drop each other's new entries: those files are only read again."""
        resolved = Path(path).resolve()
        stat = resolved.stat()
        version = [stat.st_size, stat.st_mtime_ns]
        hashes = self._file_hashes()
        kept = hashes.get(str(resolved))
        if isinstance(kept, dict) and kept.get("version") == version and isinstance(kept.get("sha256"), str):
            return kept["sha256"]
        digest = file_sha256(resolved)
        hashes[str(resolved)] = {"version": version, "sha256": digest}
        with contextlib.suppress(OSError, UserError):  # a read-only store or a full disk: the hash is not kept
            atomic_write_json(self.root / FILE_HASHES, hashes)
        return digest

    def _file_hashes(self) -> dict[str, Any]:
        """The kept file hashes; none when the file is absent or not a JSON object (it is rewritten whole)."""
        try:
            hashes = json.loads((self.root / FILE_HASHES).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return hashes if isinstance(hashes, dict) else {}

    def manifest(self, kind: str, name: str) -> Optional[dict[str, Any]]:
        """The manifest of a complete artifact after checking that it lists its files and their hashes; else None."""
        path = self.folder(kind, name) / MANIFEST
        if not path.is_file():
            return None
        manifest = read_manifest(path)
        stored = {p.name for p in path.parent.iterdir() if p.name != MANIFEST}
        unlisted = sorted(stored - set(manifest["files"]))
        if unlisted:
            raise UserError(
                f"artifact file '{path.parent / unlisted[0]}' is not in its manifest; "
                f"delete '{path.parent}' to rebuild it"
            )
        for file_name, expected in manifest["files"].items():
            file_path = path.parent / file_name
            if not file_path.is_file() or file_sha256(file_path) != expected:
                raise UserError(
                    f"artifact file '{file_path}' is missing or corrupted (hash mismatch); delete '{path.parent}' to "
                    "rebuild it"
                )
        return manifest

    @contextlib.contextmanager
    def lock(self, kind: str, name: str) -> Iterator[None]:
        """Exclusive per-artifact lock, so parallel jobs wait for one build instead of racing. In a store that cannot
        be written (read-only, not the user's) a complete artifact is read without it; one to build is refused in
        one line. Once locked, the staging folders no live build holds (a killed run's) are removed."""
        handle = self._open_lock(kind, name)
        if handle is None:
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self.remove_stale_staging(kind, name)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _open_lock(self, kind: str, name: str) -> Optional[IO[str]]:
        """The artifact's lock file, opened; None when the store cannot be written and the artifact is complete."""
        folder, lock_dir = self.folder(kind, name), self.root / kind / ".locks"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            return open(lock_dir / f"{name}.lock", "w")
        except OSError as error:
            if error.errno not in READ_ONLY:
                raise
            if (folder / MANIFEST).is_file():
                return None
            raise UserError(
                f"the store '{self.root}' cannot be written ({error.strerror}) and lacks {kind} '{name}'; "
                "give artifacts_dir a folder you can write"
            ) from None

    def remove_stale_staging(self, kind: str, locked: str) -> None:
        """Remove the staging folders of ``kind`` that no live build holds: those of ``locked`` (whose lock the caller
        holds) and those whose artifact's lock is free."""
        for scratch in (self.root / kind).glob(f"{STAGING}*"):
            name = scratch.name.removeprefix(STAGING).rpartition("-")[0]
            if name == locked or self._lock_is_free(kind, name):
                shutil.rmtree(scratch, ignore_errors=True)

    def _lock_is_free(self, kind: str, name: str) -> bool:
        path = self.root / kind / ".locks" / f"{name}.lock"
        if not path.is_file():
            return False  # a build outside any lock (none in the stages): left alone
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True

    def check_space(self, kind: str, name: str, needed: int) -> None:
        """Refuse in one line, before writing, an artifact of ``needed`` bytes that the disk has no room for."""
        folder = self.root / kind
        free = shutil.disk_usage(folder if folder.is_dir() else self.root).free
        if free < needed:
            raise UserError(
                f"{kind} '{name}' needs {needed / 2**20:.1f} MiB and the disk of the store '{self.root}' "
                f"has {free / 2**20:.1f} MiB free; free some space or give artifacts_dir another disk"
            )

    @contextlib.contextmanager
    def staging(self, kind: str, name: str) -> Iterator[Path]:
        """A scratch folder beside the artifact's final place; removed unless published. A write into it that finds
        the disk full is a one-line UserError."""
        parent = self.root / kind
        parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=parent, prefix=f"{STAGING}{self.folder(kind, name).name}-"))
        try:
            yield scratch
        except OSError as error:
            refusal = full_disk(error, f"{kind} '{name}' into '{parent}'")
            if refusal is None:
                raise
            raise refusal from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def publish(self, kind: str, name: str, scratch: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Hash the files in ``scratch``, add the manifest and move the folder into place atomically."""
        files = sorted(p.name for p in scratch.iterdir() if p.is_file())
        manifest = {
            **manifest,
            "kind": kind,
            "name": name,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "sslfuse_version": __version__,
            "files": {file_name: file_sha256(scratch / file_name) for file_name in files},
        }
        atomic_write_json(scratch / MANIFEST, manifest)
        final = self.folder(kind, name)
        if final.exists():
            shutil.rmtree(final)
        os.rename(scratch, final)
        return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest file as a dict with its ``files``; a one-line UserError naming it when it is not one."""
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"manifest '{path}' is not JSON ({error}); delete '{path.parent}' to rebuild it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(
            f"manifest '{path}' is not a JSON object with a 'files' object; delete '{path.parent}' to rebuild it"
        )
    return manifest
