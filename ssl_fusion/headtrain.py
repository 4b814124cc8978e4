"""Training fusion heads on cached features the way a good linear model is trained.

Protocol: carve a stratified validation part out of the labeled set; for every L2 strength in the
grid, train a head and score it on validation every ``eval_every`` steps; pick the (L2, steps) pair
with the best validation accuracy (ties: lower NLL); then refit ``restarts`` heads with it on *all*
labeled samples and average their predicted probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ssl_fusion.fusion import FusionConfig, FusionHead
from ssl_fusion.labels import stratified_subset

HeadFactory = Callable[[], FusionHead]


@dataclass
class Selection:
    l2: float
    steps: int
    val_accuracy: float
    val_nll: float


def standardize(train: list[torch.Tensor], *others: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Scale each pretext's features to zero mean, unit variance using statistics of ``train``."""
    stats = [(f.mean(0, keepdim=True), f.std(0, keepdim=True).clamp_min(1e-6)) for f in train]
    return [[(f - m) / s for f, (m, s) in zip(group, stats)] for group in (train, *others)]


def l2_penalty(head: FusionHead) -> torch.Tensor:
    """Sum of squared weight matrices (biases and normalisation gains are not penalised)."""
    return sum((p.pow(2).sum() for p in head.parameters() if p.dim() >= 2), torch.zeros(()))


def fit_head(
    head: FusionHead,
    features: list[torch.Tensor],
    labels: torch.Tensor,
    cfg: FusionConfig,
    l2: float,
    steps: int,
    seed: int,
    on_eval: Optional[Callable[[int, FusionHead], None]] = None,
) -> list[float]:
    """Minimise cross entropy + ``l2`` * L2 + the head's regulariser for ``steps`` steps; returns the loss curve.

    ``on_eval(step, head)`` is called every ``cfg.eval_every`` steps (head in eval mode meanwhile).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)  # constant rate: a refit for N steps retraces selection
    batch_size = min(cfg.batch_size, len(labels))
    losses = []
    head.train()
    for step in range(1, steps + 1):
        index = torch.randperm(len(labels), generator=generator)[:batch_size]
        loss = F.cross_entropy(head([f[index] for f in features]), labels[index])
        total = loss + l2 * l2_penalty(head) + head.regularization()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_eval is not None and step % cfg.eval_every == 0:
            head.eval()
            on_eval(step, head)
            head.train()
    head.eval()
    return losses


@torch.no_grad()
def predict_proba(heads: list[FusionHead], features: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Class probabilities averaged over ``heads`` and, for heads that have them, their mean pretext weights."""
    probs = torch.stack([head(features).softmax(1) for head in heads]).mean(0)
    weights = [head.pretext_weights(features) for head in heads]
    return probs, None if weights[0] is None else torch.stack(weights).mean(0)


def score(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and negative log-likelihood of predicted probabilities."""
    accuracy = float((probs.argmax(1) == labels).float().mean())
    nll = float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean())
    return accuracy, nll


def split_validation(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into ``labels``) of a stratified validation part and of the rest."""
    val = stratified_subset(labels, fraction, None, seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val


def select_hyperparameters(make_head: HeadFactory, features: list[torch.Tensor], labels: torch.Tensor, cfg: FusionConfig, seed: int) -> Selection:
    """Grid over L2 strengths × training length, scored on a validation part of the labeled set."""
    fit_part, val_part = split_validation(labels, cfg.val_fraction, seed)
    fit_features = [f[fit_part] for f in features]
    val_features = [f[val_part] for f in features]
    best: Optional[Selection] = None
    for l2 in cfg.l2_grid:
        scores: dict[int, tuple[float, float]] = {}

        def record(step: int, trained: FusionHead) -> None:
            with torch.no_grad():
                scores[step] = score(trained(val_features).softmax(1), labels[val_part])

        torch.manual_seed(seed)
        fit_head(make_head(), fit_features, labels[fit_part], cfg, l2, cfg.steps, seed, record)
        for step, (accuracy, nll) in scores.items():
            if best is None or (accuracy, -nll) > (best.val_accuracy, -best.val_nll):
                best = Selection(l2, step, accuracy, nll)
    assert best is not None
    return best


def train_selected(make_head: HeadFactory, features: list[torch.Tensor], labels: torch.Tensor, cfg: FusionConfig, seed: int) -> tuple[list[FusionHead], Selection, list[float]]:
    """Select hyper-parameters on validation, then refit ``restarts`` heads on all labeled samples."""
    selection = select_hyperparameters(make_head, features, labels, cfg, seed)
    heads, losses = [], []
    for restart in range(cfg.restarts):
        torch.manual_seed(seed * 1000 + 500 + restart)
        head = make_head()
        losses = fit_head(head, features, labels, cfg, selection.l2, selection.steps, seed * 1000 + 500 + restart)
        heads.append(head)
    return heads, selection, losses
