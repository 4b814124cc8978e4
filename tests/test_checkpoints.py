"""Bring-your-own-encoder checkpoints: each project's layout, written here from a randomly initialised resnet18 as that
project saves it, loads into ``torchvision:resnet18`` with the same features; unsafe or ill-fitting files are refused
in one line."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ssl_fusion.models.checkpoints import (
    backbone_state,
    build_backbone,
    load_external_encoder,
    read_checkpoint,
)
from ssl_fusion.runtime.errors import UserError

ARCH = "torchvision:resnet18"
REBUILT: list[str] = []  # what unpickling a Foreign object ran


class Foreign:
    """An object of a class no checkpoint reader should rebuild: unpickling it calls ``Foreign(loaded=True)``."""

    def __init__(self, loaded: bool = False) -> None:
        if loaded:
            REBUILT.append("Foreign.__init__ ran")

    def __reduce__(self):
        return (Foreign, (True,))


def resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


def headless(model: nn.Module) -> nn.Module:
    """``model`` without its classifier: the features a checkpoint of it should give."""
    model = copy.deepcopy(model)
    model.fc = nn.Identity()
    return model.eval()


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def mlp(width: int, out: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, out))


def write_plain(model: nn.Module, path: Path) -> Path:
    """torchvision/timm: ``torch.save(model.state_dict())``, classifier included."""
    torch.save(model.state_dict(), path / "resnet18.pth")
    return path / "resnet18.pth"


def write_safetensors(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path / "model.safetensors"))
    return path / "model.safetensors"


def write_lightning(model: nn.Module, path: Path) -> Path:
    """solo-learn through Lightning: ``backbone.`` (classifier removed), momentum backbone, projector and online
    classifier in ``state_dict``; the run's OmegaConf config in ``hyper_parameters``."""
    backbone = headless(model).state_dict()
    state = {
        **prefixed(backbone, "backbone."),
        **prefixed(backbone, "momentum_backbone."),
        **prefixed(mlp(512).state_dict(), "projector."),
        **prefixed(nn.Linear(512, 10).state_dict(), "classifier."),
    }
    cfg = OmegaConf.create(
        {
            "method": "byol",
            "backbone": {"name": "resnet18", "kwargs": {}},
            "max_epochs": 400,
            "optimizer": {"lr": 1.0, "betas": [0.9, 0.999]},
            "auto_resume": None,
        }
    )
    torch.save(
        {
            "epoch": 399,
            "global_step": 1000,
            "pytorch-lightning_version": "2.2.0",
            "state_dict": state,
            "loops": {},
            "callbacks": {},
            "optimizer_states": [],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": {"cfg": cfg},
        },
        path / "last.ckpt",
    )
    return path / "last.ckpt"


def write_moco_v2(model: nn.Module, path: Path) -> Path:
    """MoCo v2: DataParallel ``module.`` query and key encoders (``fc`` an MLP projector) and the queue."""
    encoder = copy.deepcopy(model)
    encoder.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    state = {
        **prefixed(encoder.state_dict(), "module.encoder_q."),
        **prefixed(encoder.state_dict(), "module.encoder_k."),
        "module.queue": torch.randn(128, 64),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    torch.save(
        {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {}}, path / "checkpoint_0199.pth.tar"
    )
    return path / "checkpoint_0199.pth.tar"


def write_moco_v3(model: nn.Module, path: Path) -> Path:
    """MoCo v3: base and momentum encoders (``fc`` the projector) and the predictor."""
    encoder = copy.deepcopy(model)
    encoder.fc = mlp(512, 256)
    state = {
        **prefixed(encoder.state_dict(), "module.base_encoder."),
        **prefixed(encoder.state_dict(), "module.momentum_encoder."),
        **prefixed(mlp(256).state_dict(), "module.predictor."),
    }
    torch.save(
        {"epoch": 100, "arch": "resnet18", "state_dict": state, "optimizer": {}, "scaler": {}},
        path / "checkpoint_0099.pth.tar",
    )
    return path / "checkpoint_0099.pth.tar"


def dino_checkpoint(teacher: nn.Module, student: nn.Module) -> dict:
    """DINO: a MultiCropWrapper (backbone without classifier, projection head) as teacher and, DDP-wrapped, as student,
    with the run's argparse ``Namespace``."""

    def wrapper(model: nn.Module) -> dict[str, torch.Tensor]:
        return {**prefixed(headless(model).state_dict(), "backbone."), **prefixed(mlp(512).state_dict(), "head.mlp.")}

    args = argparse.Namespace(arch="resnet18", out_dim=65536, lr=0.0005, output_dir=".", local_crops_scale=(0.05, 0.4))
    return {
        "student": prefixed(wrapper(student), "module."),
        "teacher": wrapper(teacher),
        "epoch": 100,
        "args": args,
        "optimizer": {},
        "dino_loss": {"center": torch.zeros(1, 65536)},
    }


def write_dino(model: nn.Module, path: Path) -> Path:
    torch.save(dino_checkpoint(model, resnet18(seed=7)), path / "checkpoint.pth")
    return path / "checkpoint.pth"


def write_vissl(model: nn.Module, path: Path) -> Path:
    """VISSL: the trunk's ``_feature_blocks.`` under classy_state_dict/base_model/model, beside the heads."""
    trunk = prefixed(headless(model).state_dict(), "_feature_blocks.")
    model_state = {"trunk": trunk, "heads": prefixed(mlp(512).state_dict(), "0.clf.0.")}
    torch.save(
        {
            "phase_idx": 3,
            "iteration": 500,
            "type": "consolidated",
            "classy_state_dict": {"base_model": {"model": model_state, "meta": {}}, "train_phase_idx": 3},
        },
        path / "model_final_checkpoint_phase3.torch",
    )
    return path / "model_final_checkpoint_phase3.torch"


WRITERS: dict[str, tuple[Callable[[nn.Module, Path], Path], str]] = {
    "plain": (write_plain, "state dict"),
    "safetensors": (write_safetensors, "state dict"),
    "lightning": (write_lightning, "lightning/solo-learn"),
    "moco_v2": (write_moco_v2, "moco v2"),
    "moco_v3": (write_moco_v3, "moco v3"),
    "dino": (write_dino, "dino teacher"),
    "vissl": (write_vissl, "vissl"),
}


def features(model: nn.Module, seed: int = 1) -> torch.Tensor:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(images)


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("layout", list(WRITERS))
def test_each_format_gives_the_source_features(layout: str, tmp_path: Path) -> None:
    """Every supported layout is recognised by name and yields exactly the source resnet18's features (classifier
    removed), in eval mode with the right width."""
    source = resnet18(seed=3)
    write, expected = WRITERS[layout]
    model, width, found = load_external_encoder(ARCH, write(source, tmp_path))
    assert (found, width, model.training) == (expected, 512, False)
    torch.testing.assert_close(features(model), features(headless(source)), rtol=0, atol=0)


def test_random_weights_without_checkpoint() -> None:
    """Without a checkpoint the encoder has random weights, so the equality above is not trivially true."""
    model, width, found = load_external_encoder(ARCH, None)
    assert (found, width) == ("random weights", 512)
    assert not torch.allclose(features(model), features(headless(resnet18(seed=3))))


def test_dino_student_on_request(tmp_path: Path) -> None:
    """DINO's teacher is taken by default and the DDP-wrapped student on request; each gives its own features."""
    teacher, student = resnet18(seed=3), resnet18(seed=4)
    torch.save(dino_checkpoint(teacher, student), tmp_path / "checkpoint.pth")
    for which, source in (("teacher", teacher), ("student", student)):
        model, _, found = load_external_encoder(ARCH, tmp_path / "checkpoint.pth", which=which)
        assert found == f"dino {which}"
        torch.testing.assert_close(features(model), features(headless(source)), rtol=0, atol=0)


def test_config_objects_load_without_unpickling_code(tmp_path: Path) -> None:
    """The argparse Namespace of a DINO checkpoint and the OmegaConf DictConfig in a Lightning checkpoint's
    hyper_parameters are rebuilt under weights_only loading."""
    source = resnet18(seed=3)
    dino = read_checkpoint(write_dino(source, tmp_path))
    lightning = read_checkpoint(write_lightning(source, tmp_path))
    assert isinstance(dino["args"], argparse.Namespace) and dino["args"].arch == "resnet18"
    cfg = lightning["hyper_parameters"]["cfg"]
    assert isinstance(cfg, DictConfig) and cfg.backbone.name == "resnet18" and list(cfg.optimizer.betas) == [0.9, 0.999]


def test_foreign_class_is_refused_without_running_it(tmp_path: Path) -> None:
    """A checkpoint holding an object of any other class is refused in one line naming the file and the class, and
    its unpickling code never runs."""
    path = tmp_path / "poisoned.pth"
    torch.save({"state_dict": resnet18(seed=3).state_dict(), "extra": Foreign()}, path)
    message = refused(lambda: read_checkpoint(path))
    assert str(path) in message and "test_checkpoints.Foreign" in message
    assert REBUILT == []


@pytest.mark.parametrize(
    "other, problem, key",
    [("resnet34", "unexpected", "layer1.2.conv1.weight"), ("resnet50", "wrongly shaped", "conv1.weight")],
)
def test_other_architecture_is_refused(other: str, problem: str, key: str, tmp_path: Path) -> None:
    """Weights of another architecture are refused in one line that counts and names the keys that do not fit."""
    torch.save(torchvision.models.get_model(other, weights=None).state_dict(), tmp_path / f"{other}.pth")
    message = refused(lambda: load_external_encoder(ARCH, tmp_path / f"{other}.pth"))
    assert problem in message and key in message and f"{other}.pth" in message


def test_missing_backbone_key_is_refused(tmp_path: Path) -> None:
    """A checkpoint lacking one backbone weight is refused, naming that key, instead of leaving it random."""
    state = resnet18(seed=3).state_dict()
    del state["layer4.1.bn2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    message = refused(lambda: load_external_encoder(ARCH, tmp_path / "partial.pth"))
    assert "1 missing: layer4.1.bn2.weight" in message


def test_prefix_by_hand(tmp_path: Path) -> None:
    """An unknown layout loads when the prefix of its backbone keys is given, nested dicts joined by dots or inside
    a ``state_dict`` wrapper; a prefix no key has is refused."""
    source = resnet18(seed=3)
    torch.save({"state_dict": prefixed(source.state_dict(), "model.encoder.")}, tmp_path / "custom.pth")
    for prefix in ("state_dict.model.encoder.", "model.encoder."):
        model, _, found = load_external_encoder(ARCH, tmp_path / "custom.pth", prefix=prefix)
        assert found == f"prefix {prefix!r}"
        torch.testing.assert_close(features(model), features(headless(source)), rtol=0, atol=0)
    assert "nothing." in refused(lambda: load_external_encoder(ARCH, tmp_path / "custom.pth", prefix="nothing."))


def test_unrecognised_layout_and_bad_files_are_refused(tmp_path: Path) -> None:
    """A checkpoint without recognisable weights, a missing file, a file that is no checkpoint (either suffix) and
    a checkpoint that is not a dict are each refused in one line naming the file or the keys."""
    assert "epoch" in refused(lambda: backbone_state({"epoch": 3, "args": {}}))
    assert "absent.pth" in refused(lambda: read_checkpoint(tmp_path / "absent.pth"))
    for name in ("notes.pth", "notes.safetensors"):
        (tmp_path / name).write_text("not a checkpoint\n")
        assert name in refused(lambda path=tmp_path / name: read_checkpoint(path))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert "list" in refused(lambda: read_checkpoint(tmp_path / "list.pth"))


@pytest.mark.parametrize("arch", ["resnet18", "keras:resnet18", "torchvision:resnet_18", "torchvision:"])
def test_unknown_architecture_is_refused(arch: str) -> None:
    """Unknown or malformed architecture names are refused in one line that says how to name one."""
    assert "torchvision:<model>" in refused(lambda: build_backbone(arch))


def test_missing_timm_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timm architecture without timm installed says to install it, in one line."""
    monkeypatch.setitem(sys.modules, "timm", None)
    assert "pip install timm" in refused(lambda: build_backbone("timm:resnet18"))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_0"])
def test_other_torchvision_classifiers_are_removed(name: str) -> None:
    """Models keeping their classifier as a Sequential (mobilenet) or ``fc`` give feature vectors of the width read
    from the model; a model without a linear classifier (squeezenet) is refused in one line."""
    if name == "squeezenet1_0":
        assert "no linear classifier" in refused(lambda: build_backbone(f"torchvision:{name}"))
        return
    model, width = build_backbone(f"torchvision:{name}")
    assert features(model.eval()).shape == (2, width)


def test_timm_state_dict_loads(tmp_path: Path) -> None:
    """With timm installed, a timm model's own state dict (classifier included) loads with the same features."""
    timm = pytest.importorskip("timm")
    source = timm.create_model("resnet18", pretrained=False).eval()
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    model, width, _ = load_external_encoder("timm:resnet18", tmp_path / "timm.pth")
    source.reset_classifier(0)
    assert width == 512
    torch.testing.assert_close(features(model), features(source), rtol=0, atol=0)
