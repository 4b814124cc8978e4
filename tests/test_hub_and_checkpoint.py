"""Two hub models and a checkpoint of one's own, declared in a user's folder and fused by one ``sslfuse run``, offline:
the recipe of docs/own_encoders.md ("Two hub models and your checkpoint") with small stand-ins for the packaged
``dinov2_vits14`` (timm's ``test_vit``) and ``resnet50_imagenet`` (torchvision's ResNet-18), their weights written
into a Hugging Face and a torch hub cache folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import sslfuse
from test_external import SMALL
from test_external_files import as_keys, declare
from test_hub import STAND_IN, STAND_IN_REPO, write_hf_weights, write_torchvision_weights

TORCHVISION = "resnet18"  # its random weights give features that vary from image to image (MobileNet's do not)
RUN = [*SMALL, "labels.per_class=5", "seeds=[0]"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def features(root: Path, name: str) -> tuple[dict, np.ndarray]:
    """The one features artifact cached for ``name``: its manifest's external encoder record, its train features."""
    (folder,) = (root / "outputs/artifacts/features").glob(f"{name}-*")
    return json.loads((folder / "manifest.json").read_text())["config"]["external"], np.load(folder / "train.npy")


@pytest.mark.slow
def test_two_hub_models_and_a_checkpoint_fuse_in_one_run_offline(tmp_path, monkeypatch):
    """One ``run`` caches the three encoders from their files (each manifest naming the weights' source and their
    sha256) and fuses them with two heads; paired, the same archs with random weights (torch seed 0, the files drawn
    with other seeds) give other features at the same input; the same ``run`` again reuses every feature."""
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_file = write_hf_weights(tmp_path / "hf", seed=1)
    enum_file = write_torchvision_weights(tmp_path / "torch", seed=2, model=TORCHVISION)
    torch.manual_seed(3)
    torch.save(torchvision.models.get_model(TORCHVISION).state_dict(), tmp_path / "my_ckpt.pth")
    declared = {
        "hub_vit": {"arch": f"timm:{STAND_IN}", "pretrained": True},
        "hub_tv": {"arch": f"torchvision:{TORCHVISION}", "weights": "IMAGENET1K_V1", "image_size": 64},  # not 224
        "my_ckpt": {"arch": f"torchvision:{TORCHVISION}", "checkpoint": str(tmp_path / "my_ckpt.pth")},
    }
    for name, keys in declared.items():
        declare(tmp_path / "mine", name, keys)
    recipe = ["pretexts=[hub_vit,hub_tv,my_ckpt]", "fusions=[attention,concat]"]

    first = sslfuse("run", *RUN, *recipe, "hydra.run.dir=r1", "--config-dir", "mine", cwd=tmp_path).stdout
    for name in declared:
        assert f"{name}: external encoder, features cached" in first
    for head in ("attention", "concat"):
        result = json.loads((tmp_path / f"r1/fuse/{head}(hub_vit+hub_tv+my_ckpt)/seed0/results.json").read_text())
        assert result["method"] == f"{head}(hub_vit+hub_tv+my_ckpt)"

    loaded = {name: features(tmp_path, name) for name in declared}
    assert loaded["hub_vit"][0]["format"] == "huggingface weights"
    assert {k: loaded["hub_vit"][0]["source"][k] for k in ("hub", "id", "file", "sha256")} == {
        "hub": "huggingface",
        "id": STAND_IN_REPO,
        "file": str(hub_file),
        "sha256": sha256(hub_file),
    }
    assert loaded["hub_tv"][0]["format"] == "torch hub weights"
    assert {k: loaded["hub_tv"][0]["source"][k] for k in ("hub", "id", "file", "sha256")} == {
        "hub": "torch hub",
        "id": "ResNet18_Weights.IMAGENET1K_V1",
        "file": str(enum_file),
        "sha256": sha256(enum_file),
    }
    assert loaded["my_ckpt"][0]["source"] == {
        "file": str(tmp_path / "my_ckpt.pth"),
        "sha256": sha256(tmp_path / "my_ckpt.pth"),
    }

    random = {  # the same archs and inputs, without weights
        "hub_vit": {"arch": f"timm:{STAND_IN}"},
        "hub_tv": {"arch": f"torchvision:{TORCHVISION}", "image_size": 64},
        "my_ckpt": {"arch": f"torchvision:{TORCHVISION}"},
    }
    keys = [key for name, node in random.items() for key in as_keys(f"random_{name}", node)]
    sslfuse(
        "cache",
        *SMALL,
        "pretexts=[random_hub_vit,random_hub_tv,random_my_ckpt]",
        *keys,
        "hydra.run.dir=c",
        cwd=tmp_path,
    )
    for name, (record, values) in loaded.items():
        random_record, random_values = features(tmp_path, f"random_{name}")
        assert random_record["format"] == "random weights" and random_record["conversion"] == record["conversion"]
        assert not np.allclose(values, random_values, atol=1e-2), name

    second = sslfuse("run", *RUN, *recipe, "hydra.run.dir=r2", "--config-dir", "mine", cwd=tmp_path).stdout
    for name in declared:
        assert f"{name}: external encoder, features reused" in second
    assert {name: features(tmp_path, name)[0] for name in declared} == {n: r for n, (r, _) in loaded.items()}
