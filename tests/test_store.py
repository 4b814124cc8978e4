from __future__ import annotations

import json

import pytest

from ssl_fusion.runtime.errors import UserError
from ssl_fusion.store.files import ArtifactStore, atomic_write_json, content_key


def publish_one(store: ArtifactStore, name: str = "thing-1") -> dict:
    with store.staging("things", name) as scratch:
        (scratch / "data.bin").write_bytes(b"\x00\x01" * 1000)
        return store.publish("things", name, scratch, {"config": {"a": 1}, "metrics": {"m": 0.5}})


def test_content_key_is_stable_and_sensitive():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_publish_then_read_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = publish_one(store)
    assert store.manifest("things", "thing-1") == manifest
    assert set(manifest["files"]) == {"data.bin"} and manifest["metrics"] == {"m": 0.5}
    assert not [p for p in (tmp_path / "things").iterdir() if p.name.startswith(".staging")]


def test_unpublished_artifact_is_absent_and_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.staging("things", "thing-2") as scratch:
            (scratch / "data.bin").write_bytes(b"half")
            raise RuntimeError("killed while writing")
    assert store.manifest("things", "thing-2") is None
    assert [p.name for p in (tmp_path / "things").iterdir()] == []


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_corrupted_file_is_detected_with_its_name(tmp_path, damage):
    store = ArtifactStore(tmp_path)
    publish_one(store)
    path = tmp_path / "things" / "thing-1" / "data.bin"
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":
        data[10] ^= 0xFF
    else:
        data = data[:100]
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="data.bin"):
        store.manifest("things", "thing-1")


def test_atomic_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
