"""Transfer: encoders pretrained on one dataset, cached and fused on another with another size and channel count."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import sslfuse
from omegaconf import OmegaConf

from ssl_fusion.data.convert import converter, describe
from ssl_fusion.data.datasets import load_dataset
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.context import pretraining_dataset


def test_gray_is_repeated_rgb_becomes_luminance_and_sizes_are_resized():
    gray = torch.rand(2, 1, 8, 8)
    assert converter(1, (8, 8), 1, (8, 8)) is None
    torch.testing.assert_close(converter(1, (8, 8), 3, (8, 8))(gray), gray.expand(-1, 3, -1, -1))
    rgb = torch.rand(2, 3, 8, 8)
    luminance = 0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:]
    torch.testing.assert_close(converter(3, (8, 8), 1, (8, 8))(rgb), luminance)
    resized = converter(3, (8, 8), 1, (16, 16))(rgb)
    torch.testing.assert_close(resized, F.interpolate(luminance, size=(16, 16), mode="bilinear", antialias=True, align_corners=False))
    assert describe(3, (24, 24), 1, (16, 16)) == {"channels": "3 -> 1 (luminance)", "size": "24x24 -> 16x16"}
    with pytest.raises(UserError, match="cannot feed 2-channel images to an encoder pretrained on 3 channels"):
        converter(2, (8, 8), 3, (8, 8))


def test_pretraining_on_the_downstream_dataset_keeps_todays_context_and_keys():
    """``pretrain_dataset`` unset, or naming the very dataset configured, adds nothing: encoder keys stay those of a
    same-dataset run."""
    dataset_cfg, _ = load_dataset({"name": "synthetic"}, None)
    for node in (None, "synthetic", {"name": "synthetic"}):
        assert pretraining_dataset(OmegaConf.create({"pretrain_dataset": node, "data_dir": None}), dataset_cfg) == (None, None)
    other_cfg, other = pretraining_dataset(OmegaConf.create({"pretrain_dataset": {"name": "synthetic", "image_size": 12},
                                                              "data_dir": None}), dataset_cfg)
    assert other_cfg.image_size == 12 and other.image_size == (12, 12)


@pytest.mark.slow
def test_an_encoder_pretrained_on_gray_16px_images_is_cached_and_fused_on_rgb_24px_ones(tmp_path):
    """``sslfuse run`` with another pretraining dataset: the encoder is pretrained on it (its manifest says so), the
    downstream RGB images are converted to gray 16 px for it (the features' manifest says so), and the fuse runs on
    the downstream labels."""
    pretrain = "pretrain_dataset={name:synthetic,image_size:16,n_train:256,n_test:64}"
    sslfuse("run", "preset=smoke", pretrain, "dataset.channels=3", "dataset.image_size=24", "dataset.n_train=256",
            "dataset.n_test=64", "pretexts=[rotation]", "fusions=[concat]", "seeds=[0]", "labels.per_class=5",
            "hydra.run.dir=transfer", cwd=tmp_path)
    store = tmp_path / "outputs/artifacts"
    ((encoder_manifest,), (features_manifest,)) = ([json.loads(p.read_text()) for p in (store / kind).glob("rotation-*/manifest.json")]
                                                 for kind in ("encoders", "features"))
    assert encoder_manifest["data"]["channels"] == 1 and encoder_manifest["data"]["image_size"] == [16, 16]
    assert encoder_manifest["data"]["n_train"] == 256
    assert features_manifest["config"]["conversion"] == {"channels": "3 -> 1 (luminance)", "size": "24x24 -> 16x16"}
    assert features_manifest["metrics"]["n_test"] == 64
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "transfer/fuse").rglob("results.json")]
    # 4 classes, 64 test images: 0.6 stands over 5 standard errors above chance (0.25); measured 0.96 ± 0.01, seeds 0-2
    assert result["n_labeled"] == 20 and result["test_accuracy"] > 0.6
