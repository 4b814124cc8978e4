"""Fusion heads over cached per-pretext features: each module is one way to combine them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

import torch
from omegaconf import MISSING
from torch import nn

from ssl_fusion.runtime.checks import Checked, Rule, above, at_least, within
from ssl_fusion.runtime.registry import Registry, import_submodules


def schedule_rules(steps: int) -> dict[str, Rule]:
    """The rules of a method trained by gradient steps (the heads, and the baselines that train on images): how many
    steps, how often it is scored, batch size and learning rate."""
    return {
        "steps": at_least(1),
        "eval_every": Rule(lambda every: 1 <= every <= steps, f"in [1, fusion.steps] = [1, {steps}]", steps + 1),
        "batch_size": at_least(1),
        "lr": above(0),
    }


@dataclass
class FusionConfig(Checked):
    """How every head is trained (see ``ssl_fusion.fusion.training``); heads add their own fields."""

    section: ClassVar[str] = "fusion"
    name: str = MISSING
    steps: int = 200  # the most steps; the best length is chosen by cross-validation
    eval_every: int = 20
    batch_size: int = 512  # a labeled set that fits trains full-batch
    lr: float = 3e-3
    l2_grid: List[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    folds: int = 5  # stratified k-fold cross-validation over the labeled set (fewer when a class has fewer labels)
    restarts: int = 2
    feature_dropout: float = 0.2
    screen: bool = True  # leave out pretexts whose features show no label information (ssl_fusion.fusion.screen)

    def grid(self) -> list[dict[str, float]]:
        """The settings cross-validation chooses among, each a strength per penalty: ``l2`` for every head (the
        L2 of ``training.fit_stack``), and the strengths a head applies itself (``FusionHead.proximal``). Default:
        one setting per L2 strength."""
        return [{"l2": l2} for l2 in self.l2_grid]

    def rules(self) -> dict[str, Rule]:
        """Heads with options of their own extend it (see ``ssl_fusion.runtime.checks``)."""
        return {
            **schedule_rules(self.steps),
            "l2_grid": Rule(lambda grid: len(grid) > 0 and min(grid) >= 0, "a non-empty list of values >= 0", []),
            "folds": at_least(2),
            "restarts": at_least(1),
            "feature_dropout": within(0, 1, "[)"),
        }


@dataclass
class Fitted:
    """A method fit on the labeled features, as the protocol records it: the evaluated images' class probabilities,
    their pretext weights (for heads that have them), how its settings were chosen (``FuseResult.selection``) and
    what else its fit tells (``FuseResult.details``: parameters, losses)."""

    probs: torch.Tensor
    weights: Optional[torch.Tensor]
    selection: dict[str, Any]
    details: dict[str, Any]


class FusionMethod:
    """What every method in ``FUSIONS`` tells the protocol and the stages about itself, so that they never compare
    method names: class attributes and class methods, read before any instance exists."""

    needs_images: ClassVar[bool] = False  # trains on the labeled images (a baseline), not on cached features
    reads_one_pretext: ClassVar[bool] = False  # trained on one pretext's features (single, select)
    hidden_options: ClassVar[tuple[str, ...]] = ()  # options a method label shows in its own way
    fits_itself: ClassVar[bool] = False  # fit on the features by its own ``fit_predict``, not trained as a head

    @classmethod
    def inputs(cls, cfg: FusionConfig, pretexts: list[str]) -> list[str]:
        """The pretexts this head reads, of those given. Default: all."""
        return pretexts

    @classmethod
    def variants(cls, cfg: FusionConfig, pretexts: list[str]) -> list[tuple[FusionConfig, list[str]]]:
        """The heads ``sslfuse run`` trains for this option over ``pretexts``: one over all of them by default."""
        return [(cfg, pretexts)]

    @classmethod
    def chooses_pretext(cls, cfg: FusionConfig) -> bool:
        """Whether the protocol must first choose one pretext for it (pretext matching)."""
        return False

    @classmethod
    def needs_cross_validation(cls, cfg: FusionConfig) -> bool:
        """Whether it cannot run on a fixed setting when no fold can be held out (a class with one labeled image)."""
        return False

    @classmethod
    def peeks_at_test(cls, cfg: FusionConfig) -> bool:
        """Whether its result used the test labels (a reference only, never a method to pick)."""
        return False

    @classmethod
    def title(cls, cfg: FusionConfig) -> str:
        """The method's name in tables, before its changed options and pretexts."""
        return cfg.name

    @classmethod
    def fit_to(cls, cfg: FusionConfig, n_pretexts: int) -> tuple[FusionConfig, dict[str, str]]:
        """``cfg`` adapted to the number of pretexts left after the screen, and a note per changed option.
        Default: unchanged."""
        return cfg, {}


class FusionHead(FusionMethod, nn.Module):
    """Maps the list of per-pretext feature batches (same order as ``pretexts``) to class logits."""

    def __init__(self, cfg: FusionConfig, feature_dims: list[int], num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def pretext_weights(self, features: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-sample weights over pretexts (batch, pretexts) for heads that have them."""
        return None

    def stacked_logits(self, params: dict[str, torch.Tensor], features: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """Every member's logits (members, batch, classes) from parameters stacked on a leading member dimension,
        computed at once, for heads that can do it faster than ``torch.vmap`` over ``forward``; None otherwise."""
        return None

    def regularization(self) -> torch.Tensor:
        """Extra loss term added while training (e.g. an entropy penalty); zero by default."""
        return torch.zeros(())

    def proximal(
        self,
        params: dict[str, torch.Tensor],
        moments: dict[str, torch.Tensor],
        step_sizes: dict[str, torch.Tensor],
        strengths: dict[str, torch.Tensor],
    ) -> None:
        """The proximal step of a non-smooth penalty, applied in place after every optimizer step to the parameters
        stacked on a leading member dimension. Of that update, per parameter: ``moments``, the gradient it followed,
        and ``step_sizes``, the step it gave each coordinate along it (Adam: rate over root mean square gradient);
        ``strengths``: each of the head's own penalties' strength per member (the keys of ``FusionConfig.grid`` but
        ``l2``). Nothing by default."""


def dropped_pretexts(like: torch.Tensor, dropout: float) -> torch.Tensor:
    """Which pretexts (columns of a (batch, pretexts) ``like``) each sample leaves out in training, each with
    probability ``dropout``, never all of a sample's: the one draw of ``attention``'s and ``concat``'s pretext
    dropout, so that both see the same masks from the same random state."""
    dropped = torch.rand_like(like) < dropout
    return dropped & ~dropped.all(dim=1, keepdim=True)


FUSIONS: Registry[type[FusionMethod]] = Registry("fusion")

import_submodules(sys.modules[__name__])
