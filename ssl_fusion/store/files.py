"""The artifact store: encoders and cached features addressed by a hash of everything that made them.

Layout: ``<artifacts_dir>/<kind>/<label>-<key>/`` holding the files and ``manifest.json``. An
artifact is built in a staging folder and renamed into place with its manifest already inside, so
a folder with a manifest is complete; a lock per artifact keeps concurrent jobs from building it twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from ssl_fusion import __version__
from ssl_fusion.runtime.errors import UserError

MANIFEST = "manifest.json"


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
    """Write via a temporary file in the same folder, fsync, rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, kind: str, name: str) -> Path:
        return self.root / kind / name

    def manifest(self, kind: str, name: str) -> Optional[dict[str, Any]]:
        """The manifest of a complete artifact after checking its files' hashes, else None."""
        path = self.folder(kind, name) / MANIFEST
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text())
        for file_name, expected in manifest["files"].items():
            file_path = path.parent / file_name
            if not file_path.is_file() or file_sha256(file_path) != expected:
                raise UserError(
                    f"artifact file '{file_path}' is missing or corrupted (hash mismatch); delete '{path.parent}' to rebuild it"
                )
        return manifest

    @contextlib.contextmanager
    def lock(self, kind: str, name: str) -> Iterator[None]:
        """Exclusive per-artifact lock, so parallel jobs wait for one build instead of racing."""
        lock_dir = self.root / kind / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def staging(self, kind: str, name: str) -> Iterator[Path]:
        """A scratch folder beside the artifact's final place; removed unless published."""
        parent = self.root / kind
        parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=parent, prefix=f".staging-{name}-"))
        try:
            yield scratch
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
