"""Training fusion heads on cached features the way a good linear model is trained.

Protocol: carve a stratified validation part out of the labeled set; for every L2 strength in the
grid, train a head and score it on validation every ``eval_every`` steps; pick the (L2, steps) pair
with the best validation accuracy (ties: lower NLL); then refit ``restarts`` heads with it on *all*
labeled samples and average their predicted probabilities.

The heads of each phase train together as one model (``HeadStack``): their parameters are stacked
on a leading member dimension and the head runs under ``torch.vmap``. Members share no parameter,
so the summed loss gives each member exactly its own gradient, and Adam, being elementwise, updates
each as if it were trained alone. The grid's members start from one initialisation and see the same
batches and dropout masks, differing only in L2 (as heads trained one by one from the same seed
would); each refit has its own seed for initialisation and batch order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from ssl_fusion.data.splits import stratified_subset
from ssl_fusion.fusion import FusionConfig, FusionHead

HeadFactory = Callable[[], FusionHead]


@dataclass
class Selection:
    l2: float
    steps: int
    val_accuracy: float
    val_nll: float


class _Objective(nn.Module):
    """A head's logits and training regulariser from one call, so that ``functional_call`` substitutes the
    stacked parameters for both (heads compute their regulariser from state their forward leaves)."""

    def __init__(self, head: FusionHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(features), self.head.regularization()


class HeadStack:
    """Heads of one architecture trained as one model: parameters stacked on a leading member dimension."""

    def __init__(self, heads: list[FusionHead]) -> None:
        self.heads = heads
        self.template = _Objective(copy.deepcopy(heads[0]))
        self.params, self.buffers = stack_module_state([_Objective(head) for head in heads])
        # Weight matrices are penalised; biases, normalisation gains and per-pretext scalars are not.
        self.penalised = [name for name, p in self.template.named_parameters() if p.dim() >= 2]

    def __len__(self) -> int:
        return len(self.heads)

    def _member(self, params: dict, buffers: dict, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return functional_call(self.template, (params, buffers), (features,))

    def __call__(self, features: list[torch.Tensor], shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (members, batch, classes) and regularisers (members,). ``shared``: every member reads the same
        unbatched ``features`` and the same random draws (dropout); otherwise each reads its own slice."""
        run = torch.vmap(self._member, in_dims=(0, 0, None if shared else 0), randomness="same" if shared else "different")
        return run(self.params, self.buffers, features)

    def penalty(self) -> torch.Tensor:
        """Each member's sum of squared weight matrices (members,)."""
        return sum((self.params[name].pow(2).flatten(1).sum(1) for name in self.penalised), torch.zeros(len(self)))

    @torch.no_grad()
    def logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Every member's logits (members, samples, classes) in eval mode."""
        self.template.eval()
        logits, _ = self(features, shared=True)
        self.template.train()
        return logits

    def unstack(self) -> list[FusionHead]:
        """The heads with their trained parameters, in eval mode."""
        state = {**self.params, **self.buffers}
        for member, head in enumerate(self.heads):
            head.load_state_dict({name.removeprefix("head."): tensor[member] for name, tensor in state.items()})
            head.eval()
        return self.heads


def fit_stack(
    stack: HeadStack,
    features: list[torch.Tensor],
    labels: torch.Tensor,
    cfg: FusionConfig,
    l2: torch.Tensor,
    steps: int,
    seeds: list[int],
    on_eval: Optional[Callable[[int, HeadStack], None]] = None,
) -> torch.Tensor:
    """``features``: per pretext, (views, samples, dim), the plain features first (see ``FeatureSet.labeled_rows``).
    Minimise each member's cross entropy + ``l2[member]`` * L2 + the head's regulariser for ``steps`` Adam
    steps; returns the loss curves (members, steps). Member m draws its batches from ``seeds[m]``; when all
    seeds are equal the members share batches and dropout masks. ``on_eval(step, stack)`` runs every
    ``cfg.eval_every`` steps. Each sample of a batch is read from one of its views, drawn at random, the same
    view for every pretext (all pretexts saw the same augmented image)."""
    shared = len(set(seeds)) == 1
    generators = [torch.Generator().manual_seed(seed) for seed in (seeds[:1] if shared else seeds)]
    # Constant rate: a refit for N steps retraces selection.
    optimizer = torch.optim.Adam(stack.params.values(), lr=cfg.lr)
    batch_size = min(cfg.batch_size, len(labels))
    losses = torch.empty(steps, len(stack))
    stack.template.train()
    for step in range(1, steps + 1):
        view, index = draw_batch(generators, len(labels), batch_size, len(features[0]))
        view, index = (view[0], index[0]) if shared else (view, index)
        logits, regularization = stack([f[view, index] for f in features], shared)
        targets = labels[index].expand(len(stack), batch_size)
        loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
        total = (loss + l2 * stack.penalty() + regularization).sum()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses[step - 1] = loss.detach()
        if on_eval is not None and step % cfg.eval_every == 0:
            on_eval(step, stack)
    return losses.T


def draw_batch(generators: list[torch.Generator], samples: int, batch_size: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per generator, ``batch_size`` distinct sample positions and the view each is read from (members, batch).
    With one view no view is drawn, so the batches are the ones plain features always gave."""
    index = torch.stack([torch.randperm(samples, generator=g)[:batch_size] for g in generators])
    if views == 1:
        return torch.zeros_like(index), index
    return torch.stack([torch.randint(views, (batch_size,), generator=g) for g in generators]), index


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
    """Grid over L2 strengths × training length, scored on a validation part of the labeled set (plain features;
    ``features`` as for ``fit_stack``)."""
    fit_part, val_part = split_validation(labels, cfg.val_fraction, seed)
    val_features, val_labels = [f[0, val_part] for f in features], labels[val_part]
    scores: dict[int, list[tuple[float, float]]] = {}

    def record(step: int, stack: HeadStack) -> None:
        scores[step] = [score(logits.softmax(1), val_labels) for logits in stack.logits(val_features)]

    torch.manual_seed(seed)
    head = make_head()
    stack = HeadStack([head] + [copy.deepcopy(head) for _ in cfg.l2_grid[1:]])
    l2 = torch.tensor(cfg.l2_grid, dtype=torch.float32)
    fit_stack(stack, [f[:, fit_part] for f in features], labels[fit_part], cfg, l2, cfg.steps, [seed] * len(stack), record)
    best: Optional[Selection] = None
    for member, strength in enumerate(cfg.l2_grid):
        for step, member_scores in scores.items():
            accuracy, nll = member_scores[member]
            if best is None or (accuracy, -nll) > (best.val_accuracy, -best.val_nll):
                best = Selection(strength, step, accuracy, nll)
    assert best is not None
    return best


def train_selected(make_head: HeadFactory, features: list[torch.Tensor], labels: torch.Tensor, cfg: FusionConfig, seed: int) -> tuple[list[FusionHead], Selection, list[float]]:
    """Select hyper-parameters on validation, then refit ``restarts`` heads on all labeled samples.
    Returns the heads, the selection and the loss curve of the last refit."""
    selection = select_hyperparameters(make_head, features, labels, cfg, seed)
    seeds = [seed * 1000 + 500 + restart for restart in range(cfg.restarts)]
    heads = []
    for restart_seed in seeds:
        torch.manual_seed(restart_seed)
        heads.append(make_head())
    stack = HeadStack(heads)
    losses = fit_stack(stack, features, labels, cfg, torch.full((len(seeds),), selection.l2), selection.steps, seeds)
    return stack.unstack(), selection, losses[-1].tolist()
