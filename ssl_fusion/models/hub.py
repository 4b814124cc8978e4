"""Pretrained weights from the hubs: timm's (``pretrained: true``, on the Hugging Face hub or at a URL) and
torchvision's ``weights`` enums, found in the libraries' own caches and fetched by the libraries' own downloaders when
absent and reachable; refused in one line, naming the cache and the model, when neither.

The Hugging Face cache is huggingface_hub's (``HF_HUB_CACHE``, else ``HF_HOME/hub``; ``HF_HUB_OFFLINE=1`` fetches
nothing), the torch hub cache torch's (``TORCH_HOME/hub/checkpoints``, the file named as in the URL). The file found
here is the one the model then loads (``checkpoints.build_backbone``), so the features' key holds its content hash.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ssl_fusion.runtime.errors import UserError

# What timm reads of a Hugging Face repo without an ``hf_hub_filename``, in its order (safetensors first).
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
FETCH_HINT = "fetch them once where the hub is reachable, or give a checkpoint"


@dataclass(frozen=True)
class HubWeights:
    """Weights in a library's cache: the file its loader reads and where they come from (the manifest's record)."""

    file: Path
    hub: str  # "huggingface" or "torch hub"
    id: str  # the Hugging Face repo, the URL (timm) or the weights enum (torchvision: ResNet18_Weights.IMAGENET1K_V1)
    tag: Optional[str] = None  # timm's pretrained tag

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "file": str(self.file)}


def torchvision_weights(name: str, weights: str, key: str) -> Any:
    """The member ``weights`` (e.g. ``IMAGENET1K_V1`` or ``DEFAULT``) of torchvision model ``name``'s weights enum; a
    one-line UserError naming ``key`` and the allowed names otherwise."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    allowed = list(enum.__members__)
    if weights not in allowed:
        raise UserError(f"{key}: {enum.__name__} has no {weights!r}; allowed: {', '.join(allowed)}")
    return enum[weights]


def torchvision_input(name: str, weights: str) -> Any:
    """An object whose ``pretrained_cfg`` holds the input of torchvision weights (their ``transforms()``: the crop
    the model reads, mean and std), as timm's models carry theirs."""
    transform = torchvision_weights(name, weights, f"torchvision:{name} weights").transforms()
    size = transform.crop_size[0]
    return argparse.Namespace(
        pretrained_cfg={"input_size": (3, size, size), "mean": transform.mean, "std": transform.std}
    )


def timm_has_weights(pretrained: dict[str, Any]) -> bool:
    """Whether timm's pretrained configuration names weights to download (a Hugging Face repo or a URL)."""
    return bool(pretrained.get("hf_hub_id") or pretrained.get("url"))


def hub_weights(arch: str, pretrained: dict[str, Any] | None = None, weights: Optional[str] = None) -> HubWeights:
    """The cached file of ``arch``'s hub weights (timm: its ``pretrained`` configuration; torchvision: the enum name
    ``weights``), fetched into the library's cache first when it is not there."""
    source, _, name = arch.partition(":")
    if source == "torchvision":
        enum = torchvision_weights(name, str(weights), f"{arch} weights")
        return HubWeights(torch_hub_file(enum.url, arch, check_hash=True), "torch hub", str(enum))
    assert pretrained is not None, "timm weights are found from timm's pretrained configuration"
    tag = pretrained.get("tag") or None
    if pretrained.get("hf_hub_id"):
        repo = pretrained["hf_hub_id"]
        files = (pretrained["hf_hub_filename"],) if pretrained.get("hf_hub_filename") else TIMM_HUB_FILES
        return HubWeights(hugging_face_file(repo, files, arch), "huggingface", repo, tag)
    return HubWeights(torch_hub_file(pretrained["url"], arch, check_hash=False), "torch hub", pretrained["url"], tag)


def hugging_face_file(repo: str, files: tuple[str, ...], arch: str) -> Path:
    """The first of ``files`` in the Hugging Face cache for ``repo`` (``<repo>@<revision>`` pins a revision), else
    downloaded by huggingface_hub (which does nothing under ``HF_HUB_OFFLINE=1``)."""
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise UserError(
            f"{arch} pretrained needs huggingface_hub, which is not installed: pip install huggingface_hub"
        ) from None
    repo_id, _, revision = repo.partition("@")
    for file in files:
        cached = try_to_load_from_cache(repo_id, file, revision=revision or None)
        if isinstance(cached, str):
            return Path(cached)

    def unreachable(reason: str) -> UserError:
        return UserError(
            f"{arch}: its pretrained weights (Hugging Face {repo}) are not in the cache '{constants.HF_HUB_CACHE}' and "
            f"cannot be fetched ({reason}); {FETCH_HINT}"
        )

    for file in files:
        try:
            return Path(hf_hub_download(repo_id, file, revision=revision or None))
        except LocalEntryNotFoundError as error:  # offline, or the hub not reachable
            raise unreachable("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else first_line(error)) from None
        except EntryNotFoundError:  # not in the repo: the next name
            continue
        except (HfHubHTTPError, OSError) as error:
            raise unreachable(first_line(error)) from None
    raise UserError(f"{arch}: the Hugging Face repo {repo} has none of {', '.join(files)}; give a checkpoint")


def torch_hub_file(url: str, arch: str, check_hash: bool) -> Path:
    """The file of ``url`` in the torch hub cache (``torch.hub.get_dir()/checkpoints``, named as in the URL, as
    ``torch.hub.load_state_dict_from_url`` keeps it), else downloaded there by torch; with ``check_hash`` a download
    must match the hash prefix in the file's name (torchvision's builders check it; a cached file is not checked)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(urllib.parse.urlparse(url).path)
    if path.is_file():
        return path
    found = torch.hub.HASH_REGEX.search(path.name) if check_hash else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), found.group(1) if found else None, progress=True)
    except (OSError, RuntimeError) as error:  # URLError and HTTPError are OSErrors; a wrong hash a RuntimeError
        raise UserError(
            f"{arch}: its weights ({path.name}) are not in the torch hub cache '{folder}' and cannot be fetched from "
            f"{url} ({first_line(error)}); {FETCH_HINT}"
        ) from None
    return path


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
