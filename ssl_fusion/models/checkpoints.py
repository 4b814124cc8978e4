"""Bring your own encoder: build a torchvision or timm backbone and load a self-supervised checkpoint into it.

Checkpoints are read with ``torch.load(weights_only=True)`` (or safetensors), so no pickled code runs; only the
configuration classes that real checkpoints carry (argparse, OmegaConf) are allowed besides tensors and plain data.
The backbone's weights are found in the layouts of common self-supervised projects and must match the model exactly.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import pickle
import re
import typing
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode
from torch import nn

from ssl_fusion.models.hub import HubWeights, first_line
from ssl_fusion.runtime.errors import UserError

Tensor = torch.Tensor
State = dict[str, Tensor]
ARCH_HINT = "name it torchvision:<model> (e.g. torchvision:resnet50) or timm:<model> (e.g. timm:vit_small_patch16_224)"
RANDOM_WEIGHTS_SEED = 0  # an external encoder without checkpoint or hub weights: torch's seed for its initialisation
CLASSIFIERS = ("fc", "classifier", "heads", "head", "last_linear")  # where models keep their classification layer
# (marker of the backbone's keys, format, projector/classifier of that project to drop after stripping the marker)
WRAPPED_BACKBONES = (
    ("module.encoder_q.", "moco v2", ("fc.",)),
    ("module.base_encoder.", "moco v3", ("fc.", "head.")),
    ("backbone.", "lightning/solo-learn", ()),
)


def build_backbone(arch: str, weights: HubWeights | None = None) -> tuple[nn.Module, int]:
    """A ``torchvision:<name>`` or ``timm:<name>`` model without its classifier, and its feature width (the size of
    the vector it returns per image): randomly initialised, or with the hub ``weights`` loaded by the library's own
    loader from the cached file (``hub.hub_weights``)."""
    source, _, name = arch.partition(":")
    if source == "torchvision" and name:
        return _torchvision_backbone(name, weights)
    if source == "timm" and name:
        return _timm_backbone(name, weights)
    raise UserError(f"unknown encoder architecture {arch!r}: {ARCH_HINT}")


def check_torchvision(name: str) -> None:
    """Refuse in one line a name that is not one of torchvision's classification models."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"torchvision has no classification model {name!r}{hint}: {ARCH_HINT}")


def _torchvision_backbone(name: str, weights: HubWeights | None) -> tuple[nn.Module, int]:
    import torchvision

    check_torchvision(name)
    # torchvision reads the enum's file from the torch hub cache, where hub_weights found it
    model = torchvision.models.get_model(name, weights=None if weights is None else weights.id)
    return model, _remove_classifier(model, f"torchvision:{name}")


def _remove_classifier(model: nn.Module, arch: str) -> int:
    """Replace the last linear layer of the model's classifier by an identity; return that layer's input width."""
    for attribute in CLASSIFIERS:
        head = getattr(model, attribute, None)
        modules = head.named_modules() if isinstance(head, nn.Module) else []
        linears = [n for n, m in modules if isinstance(m, nn.Linear)]
        if linears:
            path = f"{attribute}.{linears[-1]}".rstrip(".")
            width = model.get_submodule(path).in_features
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Identity())
            return int(width)
    raise UserError(f"{arch} has no linear classifier in {'/'.join(CLASSIFIERS)} to remove; choose another model")


def _timm(name: str) -> Any:
    """The timm module, once ``name`` is known to be one of its models; a one-line UserError otherwise."""
    try:
        import timm
    except ImportError:
        raise UserError(f"timm:{name} needs timm, which is not installed: pip install timm") from None
    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r} (timm.list_models() lists them): {ARCH_HINT}")
    architecture, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(name):
        tags = ", ".join(t.partition(".")[2] for t in timm.list_pretrained(f"{architecture}.*")) or "none"
        raise UserError(f"timm:{name}: timm has no weights tagged {tag!r} for {architecture}; its tags: {tags}")
    return timm


def timm_pretrained(name: str) -> dict[str, Any]:
    """timm's pretrained configuration of model ``name`` (``<model>.<tag>``: that tag's; else the default one): where
    its weights are (``hf_hub_id``, ``url``) and what input they take; {} for a model without one."""
    pretrained = _timm(name).models.get_pretrained_cfg(name)
    return {} if pretrained is None else pretrained.to_dict()


def timm_pretrained_cfg(name: str) -> Any:
    """An object whose ``pretrained_cfg`` is the one timm gives model ``name`` (``input_size``, ``mean``, ``std``...),
    read from timm's registry without building the model where it has one; else the built model itself."""
    pretrained = timm_pretrained(name)
    if pretrained:
        return argparse.Namespace(pretrained_cfg=pretrained)
    return _timm(name).create_model(name, pretrained=False)


def _timm_backbone(name: str, weights: HubWeights | None) -> tuple[nn.Module, int]:
    timm = _timm(name)
    if weights is None:
        model = timm.create_model(name, pretrained=False)
    else:  # timm's own loader (its key filters and classifier handling) reads exactly the file that was hashed
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights.file)})
    model.reset_classifier(0)
    # With the classifier reset, timm models return their pre-logits features (head_hidden_size where they have one).
    return model, int(getattr(model, "head_hidden_size", None) or model.num_features)


def _allowed_classes() -> list[Any]:
    """The non-tensor classes real checkpoints carry that are safe to rebuild: DINO/MAE keep their argparse
    ``Namespace``; Lightning/solo-learn keep OmegaConf configs (with the types their metadata names) in
    ``hyper_parameters``."""
    return [
        argparse.Namespace,
        collections.defaultdict,
        typing.Any,
        dict,
        list,
        int,
        float,
        str,
        bool,
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        FloatNode,
        IntegerNode,
        StringNode,
    ]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's top-level dict, read without running pickled code (``.safetensors`` through safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises UnpicklingError, KeyError, EOFError... for other kinds of file
        found = re.search(r"GLOBAL (\S+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if found is not None:
            raise UserError(
                f"checkpoint {path} holds {found.group(1)}, which is refused as it could run code; only "
                "tensors, plain data and argparse/OmegaConf configs are accepted"
            ) from None
        raise UserError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {first_line(error)})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of weights")
    return checkpoint


def _read_safetensors(path: Path) -> State:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"reading {path} needs safetensors, which is not installed: pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # SafetensorError, OSError
        raise UserError(f"{path} is not a safetensors file ({first_line(error)})") from None


def backbone_state(checkpoint: dict[str, Any], prefix: str | None = None, which: str = "teacher") -> tuple[State, str]:
    """The backbone's state dict inside ``checkpoint`` and the name of the format it was found in.

    ``prefix`` overrides detection: the keys starting with it (nested dicts joined by dots), stripped of it.
    ``which`` picks DINO's ``teacher`` (the one DINO evaluates) or ``student``.
    """
    if which not in ("teacher", "student"):
        raise UserError(f"which must be 'teacher' or 'student', not {which!r}")
    if prefix is not None:
        return _by_prefix(checkpoint, prefix), f"prefix {prefix!r}"
    for detect in (_vissl, _dino, _state_dict):
        found = detect(checkpoint, which)
        if found is not None:
            return found
    keys = ", ".join(map(str, list(checkpoint)[:6]))
    raise UserError(
        f"cannot tell where the backbone's weights are in this checkpoint (top-level keys: {keys}); "
        "give the prefix of their keys by hand"
    )


def _tensors(node: Any) -> State | None:
    """``node`` when it is a non-empty dict of tensors (a state dict), otherwise None."""
    if isinstance(node, dict) and node and all(isinstance(v, Tensor) for v in node.values()):
        return {str(k): v for k, v in node.items()}
    return None


def _strip(state: State, prefix: str) -> State:
    """The entries whose keys start with ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _drop(state: State, prefixes: tuple[str, ...]) -> State:
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def _unprefix(state: State, prefix: str) -> State:
    """``prefix`` removed from the keys that have it (e.g. ``module.`` of DistributedDataParallel)."""
    return {(k.removeprefix(prefix)): v for k, v in state.items()}


def _vissl(checkpoint: dict[str, Any], which: str) -> tuple[State, str] | None:
    node: Any = checkpoint.get("classy_state_dict", checkpoint)
    for key in ("base_model", "model"):
        node = node.get(key, node) if isinstance(node, dict) else node
    trunk = _tensors(node.get("trunk")) if isinstance(node, dict) else None
    return None if trunk is None else (_unprefix(trunk, "_feature_blocks."), "vissl")


def _dino(checkpoint: dict[str, Any], which: str) -> tuple[State, str] | None:
    if "teacher" not in checkpoint and "student" not in checkpoint:
        return None
    state = _tensors(checkpoint.get(which))
    if state is None:
        keys = ", ".join(map(str, checkpoint))
        raise UserError(f"this DINO checkpoint has no {which} weights (top-level keys: {keys})")
    state = _unprefix(state, "module.")
    if any(k.startswith("backbone.") for k in state):
        return _strip(state, "backbone."), f"dino {which}"  # leaves out the projection head
    return _drop(state, ("head.",)), f"dino {which}"


def _from_state_dict(state: State) -> tuple[State, str]:
    for marker, name, projector in WRAPPED_BACKBONES:
        if any(k.startswith(marker) for k in state):
            return _drop(_strip(state, marker), projector), name
    return _unprefix(state, "module."), "state dict"


def _state_dict(checkpoint: dict[str, Any], which: str) -> tuple[State, str] | None:
    # wrapped by Lightning, MoCo, plain training loops (``state_dict``) or DeiT, MAE (``model``); or saved as it is
    for node in (checkpoint.get("state_dict"), checkpoint.get("model"), checkpoint):
        state = _tensors(node)
        if state is not None:
            return _from_state_dict(state)
    return None


def _flatten(node: dict[Any, Any], path: str = "") -> State:
    """The tensors of nested dicts, their keys joined by dots."""
    flat: State = {}
    for key, value in node.items():
        if isinstance(value, Tensor):
            flat[f"{path}{key}"] = value
        elif isinstance(value, dict):
            flat.update(_flatten(value, f"{path}{key}."))
    return flat


def _by_prefix(checkpoint: dict[str, Any], prefix: str) -> State:
    flat = _flatten(checkpoint)
    state = _strip(flat, prefix)
    for key in ("state_dict", "model"):  # the prefix may also be given inside the usual wrappers
        if not state and isinstance(checkpoint.get(key), dict):
            state = _strip(_flatten(checkpoint[key]), prefix)
    if not state:
        examples = ", ".join(list(flat)[:3])
        raise UserError(f"no key of the checkpoint starts with {prefix!r} (its keys look like {examples})")
    return state


def load_backbone(model: nn.Module, state: State) -> None:
    """Load ``state`` into ``model``; every weight must match in name and shape, or it is refused in one line.

    Keys of an original classifier (``fc.``, ``head.``, ...) that the model no longer has are left out, and a missing
    BatchNorm ``num_batches_tracked`` counter (not a weight; older checkpoints lack it) keeps the model's value.
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or k.split(".")[0] not in CLASSIFIERS}
    state.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state})
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        _some(keys, what)
        for keys, what in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (shaped, "wrongly shaped (checkpoint vs model)"),
        )
        if keys
    ]
    if problems:
        raise UserError(
            f"the checkpoint does not fit {type(model).__name__} ({len(own)} entries): "
            f"{'; '.join(problems)} - is it for another architecture, or under another key prefix?"
        )
    for key, value in own.items():
        check_weight(key, state[key], value)
    model.load_state_dict(state, strict=True)


def check_weight(key: str, weight: Tensor, own: Tensor) -> None:
    """Refuse in one line a checkpoint tensor that loading would silently change or that would give broken features:
    a sparse one, integers where the model has floats (they would be cast), NaN or infinite values."""

    def name(value: object) -> str:
        return str(value).removeprefix("torch.")

    if weight.layout != torch.strided:
        raise UserError(f"tensor '{key}' is {name(weight.layout)}; only dense tensors are read")
    if own.is_floating_point() and not weight.is_floating_point():
        raise UserError(
            f"tensor '{key}' holds {name(weight.dtype)} values where the model has {name(own.dtype)} "
            "weights; they are not cast: save the checkpoint with float weights"
        )
    if weight.is_floating_point() and not torch.isfinite(weight).all():
        raise UserError(f"tensor '{key}' holds NaN or infinite values")


def _some(keys: list[str], what: str) -> str:
    more = ", ..." if len(keys) > 3 else ""
    return f"{len(keys)} {what}: {', '.join(keys[:3])}{more}"


def load_external_encoder(
    arch: str,
    checkpoint: str | Path | None,
    prefix: str | None = None,
    which: str = "teacher",
    weights: HubWeights | None = None,
) -> tuple[nn.Module, int, str]:
    """The backbone ``arch`` with the weights of ``checkpoint``, or the hub ``weights`` (random weights when neither)
    in eval mode, its feature width and the weights' recognised format. Random weights are drawn from torch's
    generator seeded with ``RANDOM_WEIGHTS_SEED`` (the caller's stream untouched), so the features' key, which holds
    no weights then, names the same weights in every store."""
    assert checkpoint is None or weights is None, "a checkpoint or hub weights, not both"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model, width = build_backbone(arch, weights)
    found = "random weights" if weights is None else f"{weights.hub} weights"
    if checkpoint is not None:
        state, found = backbone_state(read_checkpoint(checkpoint), prefix, which)
        try:
            load_backbone(model, state)
        except UserError as error:
            raise UserError(f"{checkpoint} ({found}): {error}") from None
    return model.eval(), width, found
