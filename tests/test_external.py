"""Encoders made elsewhere in the cache stage: images converted to their input, features keyed by the checkpoint's
content, every weight loaded, bad declarations refused in one line."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import sslfuse

import ssl_fusion.models.external as external_module
from ssl_fusion.config import check_external
from ssl_fusion.data.datasets import load_dataset
from ssl_fusion.models.external import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ExternalEncoder,
    ExternalEncoderConfig,
    build_external,
    conversion,
    external_config,
    resolve_input,
)
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.store.artifacts import external_features_artifact
from ssl_fusion.store.files import ArtifactStore

SMALL = ["preset=smoke", "dataset.n_train=64", "dataset.n_test=32", "precision=fp32"]


def test_gray_images_are_repeated_resized_and_normalised():
    """A 1-channel 28 px batch reaches the backbone as 3 channels at 32 px, normalised by the given mean and std."""
    cfg = ExternalEncoderConfig(arch="torchvision:resnet18", image_size=32, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    encoder = ExternalEncoder(torch.nn.Identity(), 3, cfg)
    images = torch.rand(2, 1, 28, 28)
    resized = F.interpolate(
        images.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear", antialias=True, align_corners=False
    )
    expected = (resized - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(encoder(images), expected)


def key_context(store: Path) -> types.SimpleNamespace:
    """What an external encoder's features key reads of a stage's context: the data's fingerprints, its dataset and
    the store (which keeps the weights files' hashes)."""
    dataset = types.SimpleNamespace(name="synthetic")
    return types.SimpleNamespace(
        fingerprints={"train": "t", "test": "s"}, dataset_cfg=dataset, store=ArtifactStore(store)
    )


def test_the_key_follows_the_checkpoints_content_not_its_path(tmp_path):
    torch.manual_seed(0)
    first, copy, other = tmp_path / "a.pth", tmp_path / "copy.pth", tmp_path / "b.pth"
    torch.save(torchvision.models.resnet18().state_dict(), first)
    shutil.copy(first, copy)
    torch.save(torchvision.models.resnet18().state_dict(), other)
    ctx = key_context(tmp_path / "store")
    key = {
        path: external_features_artifact(ctx, "r18", ExternalEncoderConfig("torchvision:resnet18", str(path)))
        for path in (first, copy, other)
    }
    assert key[first] == key[copy] != key[other]
    assert key[first].startswith("r18-")


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"r18": {"checkpoint": "x.pth"}}, r"external\.r18: give external\.r18\.arch"),
        (
            {"r18": {"arch": "torchvision:resnet18", "size": 32}},
            r"external\.r18\.size: not a key of an external encoder",
        ),
        (
            {"r18": {"arch": "torchvision:resnet18", "checkpoint": "/absent.pth"}},
            r"external\.r18\.checkpoint: no file '/absent\.pth'",
        ),
        ({"rotation": {"arch": "torchvision:resnet18"}}, r"external\.rotation: the name of a built-in pretext"),
        (
            {"r18": {"arch": "torchvision:resnet18", "std": [1.0, 0.0, 1.0]}},
            "mean and std need three values each, std > 0",
        ),
    ],
)
def test_bad_declarations_are_refused_in_one_line_naming_the_key(node, message):
    with pytest.raises(UserError, match=message):
        check_external(node, PRETEXTS)


@pytest.mark.slow
def test_cache_runs_a_checkpoint_on_converted_images_then_reuses_it_and_fuse_reads_it(tmp_path):
    """A resnet18 checkpoint declared on the command line: the cached features equal the model's own output on the
    converted images (to float16 rounding), the manifest records the format and the conversion, a second cache reuses
    them, a fuse reads them, and a checkpoint of another architecture is refused in one line before any feature."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    declared = [
        "+external.r18.arch=torchvision:resnet18",
        f"+external.r18.checkpoint={tmp_path / 'r18.pth'}",
        "+external.r18.image_size=32",
    ]
    first = sslfuse("cache", *SMALL, "pretexts=[r18]", *declared, "hydra.run.dir=c1", cwd=tmp_path)
    assert "(computed)" in first.stdout
    (folder,) = (tmp_path / "outputs/artifacts/features").glob("r18-*")
    manifest = json.loads((folder / "manifest.json").read_text())
    external = manifest["config"]["external"]
    assert external["format"] == "state dict" and external["conversion"]["size"] == "28x28 -> 32x32"
    assert external["conversion"]["channels"].startswith("1 -> 3")

    _, data = load_dataset({"name": "synthetic", "n_train": 64, "n_test": 32, "image_size": 28}, None)
    model.fc = torch.nn.Identity()
    converted = ExternalEncoder(model.eval(), 512, ExternalEncoderConfig("torchvision:resnet18", image_size=32))
    with torch.no_grad():
        expected = converted(data.test_images.float() / 255)
    cached = torch.from_numpy(np.load(folder / "test.npy").astype(np.float32))
    torch.testing.assert_close(cached, expected, rtol=2e-3, atol=2e-3)

    again = sslfuse("cache", *SMALL, "pretexts=[r18]", *declared, "hydra.run.dir=c2", cwd=tmp_path)
    assert "(reused)" in again.stdout
    sslfuse(
        "fuse",
        *SMALL,
        "pretexts=[r18]",
        *declared,
        "fusion=concat",
        "labels.per_class=5",
        "hydra.run.dir=f",
        cwd=tmp_path,
    )
    assert json.loads((tmp_path / "f/results.json").read_text())["method"] == "concat(r18)"

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    wrong = [declared[0], f"+external.r18.checkpoint={tmp_path / 'r34.pth'}", declared[2]]
    refused = sslfuse("cache", *SMALL, "pretexts=[r18]", *wrong, "hydra.run.dir=c3", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and "unexpected" in refused.stderr


class FakeTimmModel(torch.nn.Identity):
    """Stands in for a timm model: an identity backbone carrying timm's ``pretrained_cfg`` dict."""

    def __init__(self, input_size=(3, 40, 40), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> None:
        super().__init__()
        self.pretrained_cfg = {"input_size": input_size, "mean": mean, "std": std, "interpolation": "bicubic"}


def test_a_timm_models_pretrained_config_supplies_size_and_normalisation_the_user_left_unset():
    resolved = resolve_input(ExternalEncoderConfig("timm:fake"), FakeTimmModel())
    assert (resolved.image_size, resolved.mean, resolved.std) == (40, [0.5] * 3, [0.25] * 3)
    given = resolve_input(ExternalEncoderConfig("timm:fake", image_size=32, std=[0.2, 0.3, 0.4]), FakeTimmModel())
    assert (given.image_size, given.mean, given.std) == (32, [0.5] * 3, [0.2, 0.3, 0.4])
    assert resolve_input(resolved, FakeTimmModel(input_size=(3, 64, 64))) == resolved  # resolving twice: no change
    gray = resolve_input(ExternalEncoderConfig("timm:fake"), FakeTimmModel(mean=(0.4,), std=(0.2,)))
    assert (gray.mean, gray.std) == ([0.4] * 3, [0.2] * 3)
    with pytest.raises(UserError, match="pretrained on 224x160 images; give a square image_size"):
        resolve_input(ExternalEncoderConfig("timm:fake"), FakeTimmModel(input_size=(3, 224, 160)))


def test_torchvision_models_keep_imagenets_normalisation_and_the_datasets_size():
    resolved = resolve_input(ExternalEncoderConfig("torchvision:resnet18"), torchvision.models.resnet18())
    assert (resolved.image_size, resolved.mean, resolved.std) == (None, IMAGENET_MEAN, IMAGENET_STD)
    assert external_config("r18", {"arch": "torchvision:resnet18"}) == resolved


def test_the_encoder_reads_its_pretrained_size_and_normalisation():
    encoder = ExternalEncoder(FakeTimmModel(), 3, ExternalEncoderConfig("timm:fake"))
    images = torch.rand(2, 1, 28, 28)
    resized = F.interpolate(
        images.expand(-1, 3, -1, -1), size=(40, 40), mode="bilinear", antialias=True, align_corners=False
    )
    torch.testing.assert_close(encoder(images), (resized - 0.5) / 0.25)


def test_resolved_values_reach_the_manifests_conversion_and_the_features_key(monkeypatch, tmp_path):
    """A timm declaration without size or normalisation takes the pretrained configuration's (timm faked here); the
    conversion records them, and the key changes with them but not when the user gives the same values."""
    pretrained = {"model": FakeTimmModel()}
    monkeypatch.setattr(external_module, "timm_pretrained_cfg", lambda name: pretrained["model"])
    ctx = key_context(tmp_path)
    cfg = external_config("vit", {"arch": "timm:fake"})
    assert conversion(cfg, 1, (28, 28)) == {
        "channels": "1 -> 3 (gray repeated)",
        "size": "28x28 -> 40x40",
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    key = external_features_artifact(ctx, "vit", cfg)
    spelled_out = external_config("vit", {"arch": "timm:fake", "image_size": 40, "mean": [0.5] * 3, "std": [0.25] * 3})
    assert external_features_artifact(ctx, "vit", spelled_out) == key
    assert external_features_artifact(ctx, "vit", ExternalEncoderConfig("timm:fake")) == key  # resolved on keying too
    pretrained["model"] = FakeTimmModel(input_size=(3, 48, 48))
    assert external_features_artifact(ctx, "vit", external_config("vit", {"arch": "timm:fake"})) != key
    pretrained["model"] = FakeTimmModel(mean=(0.4, 0.4, 0.4))
    assert external_features_artifact(ctx, "vit", external_config("vit", {"arch": "timm:fake"})) != key


def test_a_timm_declaration_without_timm_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match="pip install timm"):
        check_external({"vit": {"arch": "timm:vit_small_patch16_224"}}, PRETEXTS)


def test_a_real_timm_model_takes_its_pretrained_input():
    """With timm installed: a timm model declared without size or normalisation reads timm's own data config."""
    timm = pytest.importorskip("timm")
    from timm.data import resolve_data_config

    cfg = check_external({"vit": {"arch": "timm:vit_small_patch16_224"}}, PRETEXTS)["vit"]
    expected = resolve_data_config({}, model=timm.create_model("vit_small_patch16_224", pretrained=False))
    assert (cfg.image_size, cfg.mean, cfg.std) == (
        expected["input_size"][-1],
        list(expected["mean"]),
        list(expected["std"]),
    )
    assert cfg.mean == [0.5] * 3  # not ImageNet's
    encoder, _ = build_external(ExternalEncoderConfig("timm:resnet18", mean=[0.1, 0.2, 0.3]), 1)
    assert encoder.image_size == 224 and encoder.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_random_external_weights_are_the_same_in_every_build_and_leave_the_callers_generator_alone():
    """The key of an encoder without checkpoint or hub weights holds no weights, so every build must draw the same
    ones: two builds (with the caller's generator at different states between them) have equal tensors, and the
    caller's next draw is the one it would have made without the builds."""
    cfg = external_config("r18", {"arch": "torchvision:resnet18"})
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first, _ = build_external(cfg, 3)
    assert torch.equal(torch.rand(3), expected_draw)
    torch.manual_seed(7)
    second, _ = build_external(cfg, 3)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
