"""Per-pretext features as every fusion head reads them: train and test rows, their labels, optional views."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ssl_fusion.data.splits import complement


@dataclass(eq=False)
class FeatureSet:
    """One pretext's cached features (float32 in memory) and the labels of both splits."""

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    uses_labels: bool = False  # made by an encoder trained with all training labels (a reference, not SSL)
    train_views: Optional[torch.Tensor] = None  # (views, train samples, dim): features of augmented train images

    def labeled_rows(self, labeled: torch.Tensor) -> torch.Tensor:
        """Standardized features of the ``labeled`` train rows, (1 + views, rows, dim): the plain images first, then
        each cached augmented view of them."""
        plain = self.train[labeled][None]
        if self.train_views is None:
            return self.standardized(plain)
        return self.standardized(torch.cat([plain, self.train_views[:, labeled].float()]))

    @functools.cached_property
    def scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of each feature over the whole train split (labeled or not), computed once."""
        std, mean = torch.std_mean(self.train, dim=0, keepdim=True)
        return mean, std.clamp_min(1e-6)

    def standardized(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` (rows of either split) scaled to zero mean, unit variance by the train split's statistics."""
        mean, std = self.scale
        return (features - mean) / std

    def held_out(self, dev: torch.Tensor) -> FeatureSet:
        """These features with the ``dev`` train rows as the split to score: the train split (rows, labels, views,
        and so the standardisation's statistics) is what is left of it; the test split is not read."""
        rest = complement(dev, len(self.train))
        views = None if self.train_views is None else self.train_views[:, rest]
        return dataclasses.replace(
            self,
            train=self.train[rest],
            test=self.train[dev],
            train_labels=self.train_labels[rest],
            test_labels=self.train_labels[dev],
            train_views=views,
        )
