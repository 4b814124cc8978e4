"""Encoders made elsewhere, fed the dataset's images converted to what they take.

A user names one on the command line (``+external.<name>.arch=torchvision:resnet50
+external.<name>.checkpoint=<file>``, or the hubs' weights: ``pretrained: true`` for timm, ``weights: <enum name>``
for torchvision) and lists ``<name>`` in ``pretexts=[...]``; the cache stage runs it like a stored encoder. Its input
is converted per batch: gray images repeated to three channels, resized to ``image_size``, normalised by ``mean`` and
``std``. What the user leaves unset comes from the model: a timm model's own pretrained configuration
(``pretrained_cfg``: ``input_size``, ``mean``, ``std``) or torchvision weights' ``transforms()``, else ImageNet's mean
and std (as torchvision's models were trained) and the dataset's size. ``resolve_input`` fills them in; the resolved
values are what the features' key and manifest hold, with the content hash of the weights file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.models.checkpoints import (
    check_torchvision,
    load_external_encoder,
    timm_pretrained,
    timm_pretrained_cfg,
)
from ssl_fusion.models.hub import HubWeights, hub_weights, timm_has_weights, torchvision_input, torchvision_weights
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.store.files import ArtifactStore

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class ExternalEncoderConfig:
    arch: str = ""  # torchvision:<name> or timm:<name>
    checkpoint: Optional[str] = None  # None: random weights, or the hub's (pretrained, weights)
    pretrained: bool = False  # timm: its pretrained weights (the tag as timm:<model>.<tag>), from the hub's cache
    weights: Optional[str] = None  # torchvision: the name in the model's weights enum (IMAGENET1K_V1, DEFAULT...)
    prefix: Optional[str] = None  # keys of the backbone in the checkpoint, when not recognised
    which: str = "teacher"  # DINO checkpoints: teacher or student
    image_size: Optional[int] = (
        None  # pixels a side the encoder reads; None: timm's pretrained size, else the dataset's
    )
    mean: Optional[List[float]] = None  # None: timm's pretrained mean, else ImageNet's
    std: Optional[List[float]] = None  # None: timm's pretrained std, else ImageNet's


KEYS = set(ExternalEncoderConfig.__dataclass_fields__)
MAX_IMAGE_SIZE = 4096  # pixels a side: a batch of 20000 px images alone would take gigabytes
# The name becomes part of a folder's and a lock file's name in the store: one plain path component.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


def external_config(name: str, node: Any) -> ExternalEncoderConfig:
    """``+external.<name>.*`` as a typed config; a one-line UserError naming the key otherwise."""
    if not NAME.fullmatch(str(name)):
        raise UserError(
            f"external.{name}: an encoder's name is letters, digits and _ . + = - (not first . or -), "
            "as it names files in the store"
        )
    if not isinstance(node, dict) or not node.get("arch"):
        raise UserError(f"external.{name}: give external.{name}.arch (torchvision:<model> or timm:<model>)")
    unknown = sorted(set(node) - KEYS)
    if unknown:
        raise UserError(
            f"external.{name}.{unknown[0]}: not a key of an external encoder; keys: {', '.join(sorted(KEYS))}"
        )
    check_input(name, node)
    check_weights(name, node)
    cfg = resolve_input(ExternalEncoderConfig(**node), pretrained_source(node["arch"], node))
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise UserError(f"external.{name}: mean and std need three values each, std > 0")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise UserError(f"external.{name}.checkpoint: no file '{cfg.checkpoint}'")
    return cfg


def check_input(name: str, node: Mapping[str, Any]) -> None:
    """Refuse in one line an ``image_size`` that is not a whole number in [8, MAX_IMAGE_SIZE], and a ``mean`` or
    ``std`` that is not a list of three finite numbers (one per channel)."""
    size = node.get("image_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= MAX_IMAGE_SIZE):
        raise UserError(
            f"external.{name}.image_size: a whole number of pixels from 8 to {MAX_IMAGE_SIZE}, got {size!r}"
        )
    for key in ("mean", "std"):
        values = node.get(key)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            raise UserError(f"external.{name}.{key}: one value per channel, as [r, g, b], got {values!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise UserError(f"external.{name}.{key}: three finite numbers, got {values!r}")


def check_weights(name: str, node: Mapping[str, Any]) -> None:
    """Refuse in one line hub weights the library does not have, or asked of the other library, or with a
    checkpoint (whose weights would replace them)."""
    source, _, model = str(node["arch"]).partition(":")
    pretrained, weights = node.get("pretrained", False), node.get("weights")
    if not isinstance(pretrained, bool):
        raise UserError(f"external.{name}.pretrained: true or false, got {pretrained!r}")
    if (pretrained or weights is not None) and node.get("checkpoint") is not None:
        key = "pretrained" if pretrained else "weights"
        raise UserError(f"external.{name}: give checkpoint or {key}, not both (the checkpoint would replace them)")
    if pretrained and source != "timm":
        raise UserError(
            f"external.{name}.pretrained: timm models only; torchvision's weights are named by "
            f"external.{name}.weights (e.g. IMAGENET1K_V1)"
        )
    if weights is not None and source != "torchvision":
        raise UserError(
            f"external.{name}.weights: torchvision models only; timm's are loaded by external.{name}.pretrained=true "
            "(a tag as timm:<model>.<tag>)"
        )
    if weights is not None:
        check_torchvision(model)
        torchvision_weights(model, str(weights), f"external.{name}.weights")
    if pretrained and not timm_has_weights(timm_pretrained(model)):
        raise UserError(f"external.{name}.pretrained: timm has no pretrained weights for {model}; give a checkpoint")


def pretrained_input(model: Any) -> dict[str, Any]:
    """``input_size``, ``mean`` and ``std`` of ``model.pretrained_cfg`` (timm keeps a dict there; a ``PretrainedCfg``
    or any object with those attributes does too), those it has; {} for a model without one (torchvision's)."""
    pretrained = getattr(model, "pretrained_cfg", None)
    if pretrained is None:
        return {}
    if not isinstance(pretrained, Mapping):
        pretrained = {key: getattr(pretrained, key, None) for key in ("input_size", "mean", "std")}
    return {key: pretrained[key] for key in ("input_size", "mean", "std") if pretrained.get(key) is not None}


def resolve_input(cfg: ExternalEncoderConfig, model: Any = None) -> ExternalEncoderConfig:
    """``cfg`` with what the user left unset (None) taken from ``model``'s pretrained configuration
    (``pretrained_input``): ``image_size`` from its square ``input_size``, ``mean`` and ``std`` from its own; else
    ImageNet's mean and std, and no size (the dataset's). Keys the user gave win. Resolving twice changes nothing."""
    found = pretrained_input(model)
    size = cfg.image_size
    if size is None and "input_size" in found:
        height, width = found["input_size"][-2:]
        if height != width:
            raise UserError(f"{cfg.arch} was pretrained on {height}x{width} images; give a square image_size")
        size = int(height)
    mean, std = (
        cfg.mean if cfg.mean is not None else three(found.get("mean"), IMAGENET_MEAN, cfg.arch),
        cfg.std if cfg.std is not None else three(found.get("std"), IMAGENET_STD, cfg.arch),
    )
    return dataclasses.replace(cfg, image_size=size, mean=[float(v) for v in mean], std=[float(v) for v in std])


def three(values: Optional[Any], default: List[float], arch: str) -> List[float]:
    """A pretrained mean or std as three values (one value repeated); ``default`` when there is none."""
    if values is None:
        return list(default)
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise UserError(f"{arch}: its pretrained mean/std has {len(values)} values; give external mean and std")
    return values


def pretrained_source(arch: str, node: Optional[Mapping[str, Any]] = None) -> Any:
    """What ``resolve_input`` reads for ``arch`` without building the model, when the user left a key of the input
    unset: for ``timm:<name>`` an object whose ``pretrained_cfg`` is timm's for that name, for ``torchvision:<name>``
    with ``weights`` one that holds those weights' input; None otherwise."""
    if node is not None and all(node.get(k) is not None for k in ("image_size", "mean", "std")):
        return None
    source, _, name = arch.partition(":")
    if source == "timm":
        return timm_pretrained_cfg(name)
    if source == "torchvision" and node is not None and node.get("weights") is not None:
        return torchvision_input(name, str(node["weights"]))
    return None


def external_hub_weights(cfg: ExternalEncoderConfig) -> Optional[HubWeights]:
    """The cached file of the hub weights ``cfg`` asks for (fetched when reachable); None without hub weights."""
    if cfg.pretrained:
        return hub_weights(cfg.arch, timm_pretrained(cfg.arch.partition(":")[2]))
    if cfg.weights is not None:
        return hub_weights(cfg.arch, weights=cfg.weights)
    return None


def weights_source(cfg: ExternalEncoderConfig, store: ArtifactStore) -> Optional[dict[str, Any]]:
    """Where the encoder's weights come from, with the content hash the features' key holds (hashed once per file
    version, ``ArtifactStore.file_hash``): the checkpoint file, or the hub's (hub, id, tag or enum, file); None for
    random weights."""
    if cfg.checkpoint is not None:
        return {"file": str(cfg.checkpoint), "sha256": store.file_hash(cfg.checkpoint)}
    hub = external_hub_weights(cfg)
    return None if hub is None else {**hub.record(), "sha256": store.file_hash(hub.file)}


class ExternalEncoder(nn.Module):
    """The backbone behind the conversion of the dataset's images (floats in [0, 1]) to its input."""

    def __init__(self, backbone: nn.Module, out_dim: int, cfg: ExternalEncoderConfig) -> None:
        super().__init__()
        cfg = resolve_input(cfg, backbone)
        self.backbone, self.out_dim, self.image_size = backbone, out_dim, cfg.image_size
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1))

    def convert(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.convert(images))


def build_external(cfg: ExternalEncoderConfig, channels: int) -> tuple[ExternalEncoder, str]:
    """The encoder with its checkpoint (every backbone weight matched) or hub weights loaded, and their format."""
    if channels not in (1, 3):
        raise UserError(f"external encoders read 1- or 3-channel images; the dataset has {channels}")
    backbone, width, found = load_external_encoder(
        cfg.arch, cfg.checkpoint, cfg.prefix, cfg.which, external_hub_weights(cfg)
    )
    cfg = resolve_input(cfg, pretrained_source(cfg.arch, dataclasses.asdict(cfg)))  # torchvision weights' input
    return ExternalEncoder(backbone, width, cfg).eval(), found


def conversion(cfg: ExternalEncoderConfig, channels: int, image_size: tuple[int, int]) -> dict[str, Any]:
    """What the cache stage does to the dataset's images for this encoder, for the features' manifest (``cfg``
    resolved: its size, mean and std as the encoder reads them)."""
    cfg = resolve_input(cfg)
    size = cfg.image_size or image_size[0]
    return {
        "channels": f"{channels} -> 3" + (" (gray repeated)" if channels == 1 else ""),
        "size": f"{image_size[0]}x{image_size[1]} -> {size}x{size}",
        "mean": cfg.mean,
        "std": cfg.std,
    }
