"""Pretrained weights from the hubs, offline, through the libraries' real local caches: a Hugging Face cache folder
(timm) and a torch hub cache folder (torchvision) written here with randomly initialised weights of small models. The
features equal those of the same file loaded as a checkpoint, the key follows the file's content (hashed once per
version), and weights neither cached nor reachable are refused in one line naming the cache and the model."""

from __future__ import annotations

import json
import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import sslfuse
from test_external import SMALL, key_context

import ssl_fusion.store.files as files_module
from ssl_fusion.config import check_external
from ssl_fusion.models.external import build_external, external_config, weights_source
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.store.artifacts import external_features_artifact
from ssl_fusion.store.files import FILE_HASHES, ArtifactStore

STAND_IN = "test_vit"  # timm's small test model: stands in for vit_small_patch14_dinov2.lvd142m
STAND_IN_REPO = "timm/test_vit.r160_in1k"  # the Hugging Face repo timm reads its weights from
TORCHVISION = "mobilenet_v3_small"


def features(cfg, images: torch.Tensor) -> torch.Tensor:
    encoder, _ = build_external(cfg, images.shape[1])
    with torch.no_grad():
        return encoder(images)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline: huggingface_hub reads its settings at import, so they are set there too."""
    hub = pytest.importorskip("huggingface_hub")
    pytest.importorskip("timm")
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def write_hf_weights(cache: Path, seed: int) -> Path:
    """Random weights of the stand-in, laid out as huggingface_hub keeps a download: a snapshot of the revision that
    ``refs/main`` names."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    repo = cache / f"models--{STAND_IN_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file(timm.create_model(STAND_IN, pretrained=False).state_dict(), str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot / "model.safetensors"


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def write_torchvision_weights(torch_home: Path, seed: int, model: str = TORCHVISION) -> Path:
    """Random weights of the torchvision model under the name its ``IMAGENET1K_V1`` URL gives, in the torch hub cache.
    The name carries a hash prefix: torch checks it only on a download, not on a cached file."""
    weights = torchvision.models.get_model_weights(model).IMAGENET1K_V1
    path = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(torchvision.models.get_model(model, weights=None).state_dict(), path)
    return path


def test_timm_pretrained_weights_come_from_the_hugging_face_cache(hf_cache, tmp_path):
    """Paired: ``pretrained: true`` gives the features of the same cached file given as a checkpoint (other than
    random weights'), at the pretrained input size; the key follows the file's content; the record names the repo,
    tag and file."""
    file = write_hf_weights(hf_cache, seed=1)  # not 0: random weights are drawn with torch seed 0
    cfg = external_config("vit", {"arch": f"timm:{STAND_IN}", "pretrained": True})
    assert (cfg.image_size, cfg.mean, cfg.std) == (160, [0.5] * 3, [0.5] * 3)  # timm's pretrained_cfg
    images = torch.rand(2, 1, 28, 28)
    loaded = features(cfg, images)
    checkpoint = external_config("vit", {"arch": f"timm:{STAND_IN}", "checkpoint": str(file)})
    torch.testing.assert_close(loaded, features(checkpoint, images), rtol=0, atol=0)
    assert not torch.allclose(loaded, features(external_config("vit", {"arch": f"timm:{STAND_IN}"}), images))

    ctx = key_context(tmp_path / "store")
    source = weights_source(cfg, ctx.store)
    assert {k: source[k] for k in ("hub", "id", "tag", "file")} == {
        "hub": "huggingface",
        "id": STAND_IN_REPO,
        "tag": "r160_in1k",
        "file": str(file),
    }
    key = external_features_artifact(ctx, "vit", cfg)
    tagged = external_config("vit", {"arch": f"timm:{STAND_IN}.r160_in1k", "pretrained": True})
    assert features(tagged, images).equal(loaded)  # the tag named as timm names it: the same weights
    write_hf_weights(hf_cache, seed=2)
    assert external_features_artifact(ctx, "vit", cfg) != key


def test_torchvision_weights_come_from_the_torch_hub_cache(torch_home, tmp_path):
    """Paired: ``weights: IMAGENET1K_V1`` gives the features of the same cached file given as a checkpoint, at the
    weights' crop size with their mean and std (user keys winning); ``DEFAULT`` names the same file; other weights in
    that file, another key."""
    file = write_torchvision_weights(torch_home, seed=0)
    cfg = external_config("mnet", {"arch": f"torchvision:{TORCHVISION}", "weights": "IMAGENET1K_V1"})
    assert (cfg.image_size, cfg.mean, cfg.std) == (224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    given = external_config("mnet", {"arch": f"torchvision:{TORCHVISION}", "weights": "DEFAULT", "image_size": 64})
    assert given.image_size == 64 and given.mean == cfg.mean
    images = torch.rand(2, 3, 32, 32)
    checkpoint = external_config("mnet", {"arch": f"torchvision:{TORCHVISION}", "checkpoint": str(file)})
    checkpoint.image_size = 224
    torch.testing.assert_close(features(cfg, images), features(checkpoint, images), rtol=0, atol=0)

    ctx = key_context(tmp_path / "store")
    source = weights_source(cfg, ctx.store)
    assert (source["hub"], source["id"], source["file"]) == (
        "torch hub",
        "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        str(file),
    )
    key = external_features_artifact(ctx, "mnet", cfg)
    write_torchvision_weights(torch_home, seed=1)
    assert external_features_artifact(ctx, "mnet", cfg) != key


def test_weights_neither_cached_nor_reachable_are_refused_in_one_line(hf_cache, torch_home, tmp_path, monkeypatch):
    """The real DINOv2 declaration offline with an empty cache, and torchvision weights whose download fails: one
    line naming the model and the cache folder, and nothing written to the store."""
    store = tmp_path / "store"
    dino = external_config("dino", {"arch": "timm:vit_small_patch14_dinov2.lvd142m", "pretrained": True})
    assert (dino.image_size, dino.mean) == (518, [0.485, 0.456, 0.406])  # the DINOv2 weights' own input
    with pytest.raises(UserError) as refused:
        external_features_artifact(key_context(store), "dino", dino)
    message = str(refused.value)
    assert "\n" not in message and "timm:vit_small_patch14_dinov2.lvd142m" in message
    assert f"cache '{hf_cache}'" in message and "HF_HUB_OFFLINE" in message

    def unreachable(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    mnet = external_config("mnet", {"arch": f"torchvision:{TORCHVISION}", "weights": "IMAGENET1K_V1"})
    with pytest.raises(UserError) as refused:
        external_features_artifact(key_context(store), "mnet", mnet)
    message = str(refused.value)
    assert "\n" not in message and f"torchvision:{TORCHVISION}" in message and "no route to host" in message
    assert f"torch hub cache '{torch_home / 'hub' / 'checkpoints'}'" in message
    assert not store.exists()


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"arch": "torchvision:resnet18", "weights": "IMAGENET"},
            r"external\.x\.weights: ResNet18_Weights has no 'IMAGENET'; allowed: IMAGENET1K_V1, DEFAULT$",
        ),
        ({"arch": "torchvision:resnet18", "pretrained": True}, r"external\.x\.pretrained: timm models only"),
        ({"arch": "timm:test_vit", "weights": "DEFAULT"}, r"external\.x\.weights: torchvision models only"),
        ({"arch": "timm:test_vit", "pretrained": "yes"}, r"external\.x\.pretrained: true or false"),
        (
            {"arch": "timm:test_vit", "pretrained": True, "checkpoint": "w.pth"},
            r"external\.x: give checkpoint or pretrained, not both",
        ),
        (
            {"arch": "torchvision:resnet18", "weights": "DEFAULT", "checkpoint": "w.pth"},
            r"external\.x: give checkpoint or weights, not both",
        ),
        (
            {"arch": "timm:test_vit.in22k", "pretrained": True},
            r"no weights tagged 'in22k' for test_vit; its tags: r160",
        ),
    ],
)
def test_bad_hub_declarations_are_refused_in_one_line_naming_the_key(node, message):
    pytest.importorskip("timm")
    with pytest.raises(UserError, match=message):
        check_external({"x": node}, PRETEXTS)


def test_a_weights_files_hash_is_read_once_per_version(tmp_path, monkeypatch):
    """Counted reads: an unchanged checkpoint is hashed once, by any process sharing the store (a new store object
    reads the kept hashes); a rewritten one (new size or mtime) is hashed again and gives a new key."""
    reads: list[Path] = []
    real = files_module.file_sha256

    def counted(path: Path) -> str:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(files_module, "file_sha256", counted)
    checkpoint = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
    cfg = external_config("r18", {"arch": "torchvision:resnet18", "checkpoint": str(checkpoint)})
    key = external_features_artifact(key_context(tmp_path / "store"), "r18", cfg)
    for _ in range(3):
        assert external_features_artifact(key_context(tmp_path / "store"), "r18", cfg) == key
    assert reads == [checkpoint]
    kept = json.loads((tmp_path / "store" / FILE_HASHES).read_text())
    assert list(kept) == [str(checkpoint)]

    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)  # same size, new content and mtime
    assert external_features_artifact(key_context(tmp_path / "store"), "r18", cfg) != key
    assert reads == [checkpoint, checkpoint]


def test_a_store_that_cannot_keep_hashes_still_hashes(tmp_path, monkeypatch):
    """The kept hashes are a saving only: a store whose hash file cannot be written gives the file's hash."""
    file = tmp_path / "w.bin"
    file.write_bytes(b"weights")

    def refuse(path, payload):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files_module, "atomic_write_json", refuse)
    assert ArtifactStore(tmp_path / "store").file_hash(file) == files_module.file_sha256(file)


@pytest.mark.slow
def test_cache_and_fuse_a_timm_model_with_its_pretrained_weights_offline(tmp_path, monkeypatch):
    """The DINOv2 example's keys with the stand-in: ``sslfuse cache`` reads its weights from the Hugging Face cache
    offline and records their source, ``fuse`` reads the features; an empty cache is refused in one line, leaving no
    features."""
    pytest.importorskip("timm")
    file = write_hf_weights(tmp_path / "hf", seed=0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    declared = [f"+external.vit.arch=timm:{STAND_IN}.r160_in1k", "+external.vit.pretrained=true"]
    first = sslfuse("cache", *SMALL, "pretexts=[vit]", *declared, "hydra.run.dir=c1", cwd=tmp_path)
    assert "(computed)" in first.stdout
    (folder,) = (tmp_path / "outputs/artifacts/features").glob("vit-*")
    external = json.loads((folder / "manifest.json").read_text())["config"]["external"]
    assert external["format"] == "huggingface weights" and external["conversion"]["size"] == "28x28 -> 160x160"
    assert {k: external["source"][k] for k in ("hub", "id", "tag", "file")} == {
        "hub": "huggingface",
        "id": STAND_IN_REPO,
        "tag": "r160_in1k",
        "file": str(file),
    }
    assert external["source"]["sha256"] == files_module.file_sha256(file)
    fused = [*SMALL, "pretexts=[vit]", *declared, "fusion=concat", "labels.per_class=5", "hydra.run.dir=f"]
    sslfuse("fuse", *fused, cwd=tmp_path)  # a fuse reads cached features only: it found them under the same key
    assert json.loads((tmp_path / "f/results.json").read_text())["method"] == "concat(vit)"

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    refused = sslfuse("cache", *SMALL, "pretexts=[vit]", *declared, "hydra.run.dir=c2", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert f"timm:{STAND_IN}.r160_in1k" in refused.stderr and str(tmp_path / "empty") in refused.stderr
    assert [p.name for p in (tmp_path / "outputs/artifacts/features").glob("vit-*")] == [folder.name]
