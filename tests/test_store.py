from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ssl_fusion.config import CacheConfig, ProbeConfig, TrainOverrides
from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.models.encoders import SmallCNNConfig
from ssl_fusion.models.external import external_config
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.caching import (
    ensure_external_features,
    ensure_features,
    ensure_views,
)
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.pretrain import ensure_encoder
from ssl_fusion.store import artifacts
from ssl_fusion.store.artifacts import (
    encoder_artifact,
    features_artifact,
    pretext_recipe,
    views_artifact,
)
from ssl_fusion.store.files import ArtifactStore, atomic_write_json, content_key

PACKAGE = Path(artifacts.__file__).resolve().parents[1]


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


def key_context(tmp_path) -> StageContext:
    return StageContext(
        SyntheticConfig(name="synthetic"),
        make_synthetic(SyntheticConfig(name="synthetic"), root=None),
        SmallCNNConfig(name="small_cnn"),
        torch.device("cpu"),
        torch.float32,
        ArtifactStore(tmp_path),
        TrainOverrides(),
        0,
    )


def copy_of(source: Path, folder: Path, edit: bool) -> Path:
    """A copy of a source file in ``folder``, with its last line changed when ``edit``."""
    lines = source.read_text().splitlines(keepends=True)
    if edit:
        lines[-1] = lines[-1].rstrip("\n") + "  # changed\n"
    folder.mkdir()
    copy = folder / source.name
    copy.write_text("".join(lines))
    return copy


def replacing(listing, original: Path, copy: Path):
    return lambda *args: tuple(copy if path == original else path for path in listing(*args))


def module_file(pretext: str) -> Path:
    return Path(sys.modules[PRETEXTS.get(pretext).impl.__module__].__file__).resolve()


def test_encoder_sources_are_the_code_that_makes_an_encoder():
    sources = set(artifacts.pretrain_sources("vicreg", "synthetic"))
    expected = [
        "pretexts/vicreg.py",
        "pretexts/simclr.py",
        "pretexts/__init__.py",
        "pretexts/trainer.py",
        "models/encoders.py",
        "data/augment.py",
        "data/datasets/__init__.py",
        "data/datasets/synthetic.py",
    ]
    assert {PACKAGE / name for name in expected} <= sources
    assert PACKAGE / "pretexts/rotation.py" not in sources
    assert PACKAGE / "data/datasets/image_folder.py" not in sources  # another dataset's loader makes none of these
    assert PACKAGE / "data/datasets/torchvision_sets.py" in set(artifacts.pretrain_sources("rotation", "fashion_mnist"))
    assert PACKAGE / "models/checkpoints.py" not in sources  # loads encoders made elsewhere; makes none of ours
    assert {PACKAGE / "stages/caching.py", PACKAGE / "evaluation/probe.py"} <= set(artifacts.cache_sources("synthetic"))


def test_encoder_key_changes_with_the_code_of_its_pretext_only(tmp_path, monkeypatch):
    ctx = key_context(tmp_path / "store")
    recipes = [pretext_recipe(name, TrainOverrides()) for name in ("rotation", "simclr")]

    def keys() -> dict[str, str]:
        return {recipe.name: encoder_artifact(ctx, recipe, None) for recipe in recipes}

    before = keys()
    assert keys() == before  # same code, same key
    listing, rotation = artifacts.pretrain_sources, module_file("rotation")
    monkeypatch.setattr(
        artifacts, "pretrain_sources", replacing(listing, rotation, copy_of(rotation, tmp_path / "same", edit=False))
    )
    assert keys() == before  # the same bytes elsewhere: the same key
    monkeypatch.setattr(
        artifacts, "pretrain_sources", replacing(listing, rotation, copy_of(rotation, tmp_path / "edited", edit=True))
    )
    after = keys()
    assert after["rotation"] != before["rotation"] and after["rotation"].startswith("rotation-")
    assert after["simclr"] == before["simclr"]
    assert features_artifact(ctx, after["rotation"]) != features_artifact(ctx, before["rotation"])


def test_features_key_changes_with_the_cache_stage_code(tmp_path, monkeypatch):
    ctx = key_context(tmp_path / "store")
    encoder = encoder_artifact(ctx, pretext_recipe("rotation", TrainOverrides()), None)
    before = features_artifact(ctx, encoder), views_artifact(encoder, 4, 0.1, ctx.fingerprints, "synthetic")
    cache_stage = PACKAGE / "stages" / "caching.py"
    listing = artifacts.cache_sources
    monkeypatch.setattr(
        artifacts,
        "cache_sources",
        replacing(listing, cache_stage, copy_of(cache_stage, tmp_path / "edited", edit=True)),
    )
    after = features_artifact(ctx, encoder), views_artifact(encoder, 4, 0.1, ctx.fingerprints, "synthetic")
    assert after[0] != before[0] and after[1] != before[1]
    assert encoder_artifact(ctx, pretext_recipe("rotation", TrainOverrides()), None) == encoder


def test_encoder_and_features_keys_follow_the_precision_and_device_kind(tmp_path):
    """Paired: one run's context changed in its precision or device kind only. bf16 and fp32 encoders (on the CPU
    too) and their features are different artifacts; the same precision on the same kind of device is the same
    one, whichever GPU it is."""
    ctx = key_context(tmp_path / "store")
    recipe = pretext_recipe("rotation", TrainOverrides())

    def keys(device: str, dtype: torch.dtype) -> tuple[str, str]:
        ctx.device, ctx.dtype = torch.device(device), dtype
        encoder = encoder_artifact(ctx, recipe, None)
        return encoder, features_artifact(ctx, encoder)

    fp32 = keys("cpu", torch.float32)
    assert keys("cpu", torch.float32) == fp32
    runs = [fp32, keys("cpu", torch.bfloat16), keys("cuda", torch.float32), keys("cuda", torch.bfloat16)]
    assert len({encoder for encoder, _ in runs}) == len({features for _, features in runs}) == 4
    assert keys("cuda:1", torch.bfloat16) == keys("cuda", torch.bfloat16)
    cpu_encoder = fp32[0]
    ctx.device, ctx.dtype = torch.device("cpu"), torch.bfloat16  # an fp32 encoder's features cached in bf16
    assert features_artifact(ctx, cpu_encoder) != fp32[1]


def test_source_files_are_hashed_once_per_process(tmp_path, monkeypatch):
    ctx = key_context(tmp_path / "store")
    recipe = pretext_recipe("rotation", TrainOverrides())
    encoder_artifact(ctx, recipe, None)
    reads = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: reads.append(path) or read_bytes(path))
    encoder_artifact(ctx, recipe, None)
    assert reads == []


def test_every_module_whose_code_runs_while_caching_is_in_the_features_key(tmp_path):
    """Trace the package's code that runs while an own encoder's features and views and an external encoder's features
    are cached: each file is hashed into the key (``cache_sources``, or the encoder's own key), or is one of
    ``NOT_CACHE_CODE``, which shapes no value. A module that caching starts to use fails this until it is hashed."""
    ctx = key_context(tmp_path / "store")
    ctx.data = make_synthetic(SyntheticConfig(name="synthetic", n_train=48, n_test=16), root=None)
    encoder, _, _ = ensure_encoder(ctx, pretext_recipe("random", TrainOverrides()), ProbeConfig())
    external = external_config("r18", {"arch": "torchvision:resnet18", "image_size": 16})
    ran: set[str] = set()
    sys.setprofile(lambda frame, event, arg: ran.add(frame.f_code.co_filename) if event == "call" else None)
    try:
        ensure_features(ctx, encoder, 16)
        ensure_views(ctx, encoder, CacheConfig(batch_size=16, views=2, num_workers=0))
        ensure_external_features(ctx, "r18", external, 16)
    finally:
        sys.setprofile(None)
    package = {Path(path).resolve() for path in ran if Path(path).resolve().is_relative_to(PACKAGE)}
    hashed = {*artifacts.cache_sources("synthetic"), *artifacts.pretrain_sources("random", "synthetic")}
    shaping_nothing = {
        Path(sys.modules[name].__file__).resolve() for name in artifacts.NOT_CACHE_CODE if name in sys.modules
    }
    assert PACKAGE / "data/convert.py" in package
    assert package - hashed - shaping_nothing == set()
    assert PACKAGE / "data/datasets/image_folder.py" in set(artifacts.cache_sources("image_folder"))
