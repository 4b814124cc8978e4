"""Features made elsewhere (CLIP, DINOv2, any stack): one array file per split, rows in the dataset's order.

They stand beside sslfuse's own pretexts under a name of the user's (``+imported.<name>.train=...``); every fuse
reads them afresh and checks them: the row counts of the dataset's splits, a float dtype, no NaN or inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING

from ssl_fusion.data.features import FeatureSet
from ssl_fusion.runtime.errors import UserError

SUFFIXES = (".npy", ".pt", ".pth")


@dataclass
class ImportedFeatures:
    """The two array files of one imported feature set: (samples, dim) each, float, rows in the dataset's order."""

    train: str = MISSING
    test: str = MISSING


def read_array(path: str) -> torch.Tensor:
    """A (samples, dim) float tensor from ``.npy`` (no pickles) or ``.pt``/``.pth`` (a saved tensor, loaded with
    ``weights_only=True``); a UserError naming the file for anything else."""
    file = Path(path)
    if file.suffix not in SUFFIXES:
        raise UserError(f"imported features '{path}': give a {', '.join(SUFFIXES)} file")
    if not file.is_file():
        raise UserError(f"imported features '{path}': no such file")
    try:
        if file.suffix == ".npy":
            array = np.load(file, allow_pickle=False)
            array = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))  # big-endian: converted
        else:
            array = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file: whatever the reader raised, one line naming it
        raise UserError(f"imported features '{path}': not readable as an array ({type(err).__name__})") from None
    if not isinstance(array, torch.Tensor):
        raise UserError(f"imported features '{path}': holds a {type(array).__name__}, not one array")
    if array.layout != torch.strided:
        layout = str(array.layout).removeprefix("torch.")
        raise UserError(f"imported features '{path}': a {layout} tensor; save a dense one")
    return array


def checked_split(name: str, path: str, rows: int) -> torch.Tensor:
    """The array at ``path`` as float32, checked against the split's ``rows``."""
    array = read_array(path)
    if not array.is_floating_point():
        raise UserError(
            f"imported features '{path}' ({name}): dtype {str(array.dtype).removeprefix('torch.')}, a float dtype is "
            "needed"
        )
    if array.dim() != 2 or len(array) != rows:
        raise UserError(
            f"imported features '{path}' ({name}): shape {tuple(array.shape)}, needs ({rows}, dim): one row per "
            "image of the split"
        )
    if not torch.isfinite(array).all():
        raise UserError(f"imported features '{path}' ({name}): holds NaN or inf")
    array = array.float()
    if not torch.isfinite(array).all():
        raise UserError(
            f"imported features '{path}' ({name}): values beyond float32's range (about 3.4e38) overflow "
            "it; scale them down"
        )
    return array


def load_imported(
    name: str, spec: ImportedFeatures, train_labels: torch.Tensor, test_labels: torch.Tensor
) -> FeatureSet:
    """The imported feature set ``name`` with the dataset's labels; both splits of one width."""
    train = checked_split(name, spec.train, len(train_labels))
    test = checked_split(name, spec.test, len(test_labels))
    if train.shape[1] != test.shape[1]:
        raise UserError(f"imported features '{name}': train has {train.shape[1]} columns and test {test.shape[1]}")
    return FeatureSet(train, test, train_labels, test_labels)
