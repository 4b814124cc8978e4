"""VICReg (Bardes, Ponce, LeCun 2022): two views agree while each embedding dimension keeps variance and stays
decorrelated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fusion.models.encoders import Encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext
from ssl_fusion.pretexts.simclr import TwoViewConfig, two_views
from ssl_fusion.runtime.distributed import gather


@dataclass
class VICRegConfig(TwoViewConfig):
    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0
    expander_dim: int = 1024


class VICRegLoss(NamedTuple):
    total: torch.Tensor
    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


def variance_term(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean hinge on each dimension's standard deviation at 1: 1 - sqrt(eps) for a collapsed batch, 0 once std >= 1."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """Sum of the squared off-diagonal covariances, divided by the dimension. The covariance is written out as
    ``torch.cov`` computes it, which would also check its degrees of freedom on the host: a sync in every step."""
    centred = z - z.mean(dim=0)
    cov = centred.t() @ centred / (z.shape[0] - 1)
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]


def vicreg_loss(
    z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float, eps: float = 1e-4
) -> VICRegLoss:
    """The weighted total and the unweighted invariance, variance and covariance terms (float32).

    As in the authors' code, the variance term is averaged over the two branches and the
    covariance term summed over them; the default coefficients 25/25/1 assume that scaling.
    Autocast is off here: under bf16 autocast the covariance's matmul would round it to bf16.
    """
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        invariance = F.mse_loss(z1, z2)
        variance = (variance_term(z1, eps) + variance_term(z2, eps)) / 2
        covariance = covariance_term(z1) + covariance_term(z2)
        total = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return VICRegLoss(total, invariance, variance, covariance)


@PRETEXTS.register("vicreg", VICRegConfig)
class VICReg(Pretext):
    """Under torchrun every term is computed on the global batch (embeddings gathered from every rank),
    so the variance and covariance see all samples."""

    sync_batchnorm = True

    def __init__(self, cfg: VICRegConfig, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        width = cfg.expander_dim
        self.expander = nn.Sequential(
            nn.Linear(encoder.out_dim, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
        )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.expander(self.encoder(two_views(images, self.cfg))).chunk(2)
        cfg = self.cfg
        return vicreg_loss(gather(z1), gather(z2), cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff).total
