"""Training fusion heads on cached features the way a good linear model is trained.

Protocol: split the labeled set into stratified folds; for every L2 strength in the grid and every fold,
train a head on the other folds and score it on its fold every ``eval_every`` steps; pick the
(L2, steps) pair with the best cross-validated accuracy over all labeled samples (ties: lower NLL);
then refit ``restarts`` heads with it on *all* labeled samples and average their predicted probabilities.

The heads of each phase train together as one model (``HeadStack``): their parameters are stacked
on a leading member dimension and the head runs under ``torch.vmap``. Members share no parameter,
so the summed loss gives each member exactly its own gradient, and Adam, being elementwise, updates
each as if it were trained alone. Every member reads the same batch (the whole labeled set when it
fits in ``batch_size``); a member's loss weighs only the samples of its training folds, so a held-out
sample's label never reaches it. The grid's members start from one initialisation; each refit has its
own seed for initialisation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from ssl_fusion.data.splits import fold_count, stratified_folds
from ssl_fusion.evaluation.metrics import macro_f1
from ssl_fusion.fusion import FusionConfig, FusionHead
from ssl_fusion.runtime.errors import UserError

HeadFactory = Callable[[], FusionHead]


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

    def __call__(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (members, batch, classes) and regularisers (members,): every member reads the same ``features``
        and the same random draws (dropout masks), which keeps the members' comparison paired and costs a third of
        drawing them per member."""
        direct = self.template.head.stacked_logits(
            {name.removeprefix("head."): p for name, p in self.params.items()}, features
        )
        if direct is not None:
            return direct, torch.zeros(len(self))
        run = torch.vmap(self._member, in_dims=(0, 0, None), randomness="same")
        return run(self.params, self.buffers, features)

    def penalty(self) -> torch.Tensor:
        """Each member's sum of squared weight matrices (members,)."""
        return sum((self.params[name].pow(2).flatten(1).sum(1) for name in self.penalised), torch.zeros(len(self)))

    @torch.no_grad()
    def logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Every member's logits (members, samples, classes) in eval mode."""
        self.template.eval()
        logits, _ = self(features)
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
    seed: int,
    trains_on: Optional[torch.Tensor] = None,
    on_eval: Optional[Callable[[int, HeadStack], None]] = None,
) -> torch.Tensor:
    """``features``: per pretext, (views, samples, dim), the plain features first (see ``FeatureSet.labeled_rows``).
    Minimise each member's cross entropy over the samples ``trains_on[member]`` marks (all when None) +
    ``l2[member]`` * L2 + the head's regulariser for ``steps`` Adam steps at a constant rate (a refit for N steps
    retraces selection); returns the loss curves (members, steps). Full-batch when the labeled set fits in
    ``cfg.batch_size``, else every member reads the same random batch. ``on_eval(step, stack)`` runs every
    ``cfg.eval_every`` steps. Each sample of a batch is read from one of its views, drawn at random, the same
    view for every pretext (all pretexts saw the same augmented image)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws
    optimizer = torch.optim.Adam(stack.params.values(), lr=cfg.lr)
    weights = torch.ones(len(stack), len(labels)) if trains_on is None else trains_on.float()
    losses = torch.empty(steps, len(stack))
    stack.template.train()
    for step in range(1, steps + 1):
        view, index = draw_batch(generator, len(labels), cfg.batch_size, len(features[0]))
        logits, regularization = stack([f[view, index] for f in features])
        targets = labels[index].expand(len(stack), len(index))
        member_weights = weights[:, index]
        per_sample = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss = (per_sample * member_weights).sum(1) / member_weights.sum(1).clamp_min(1)
        objective = loss + l2 * stack.penalty() + regularization
        check_finite(cfg, objective.detach(), step)
        optimizer.zero_grad(set_to_none=True)
        objective.sum().backward()
        optimizer.step()
        losses[step - 1] = loss.detach()
        if on_eval is not None and step % cfg.eval_every == 0:
            on_eval(step, stack)
    check_finite(cfg, torch.stack([p.detach().abs().max() for p in stack.params.values()]), steps, "a weight")
    return losses.T


def check_finite(cfg: FusionConfig, values: torch.Tensor, step: int, what: str = "the training loss") -> None:
    """Stop a head that diverged (NaN or inf), as pretraining does, before it scores or writes anything."""
    if not torch.isfinite(values).all():
        bad = values[~torch.isfinite(values)][0].item()
        raise UserError(
            f"fusion head {cfg.name} diverged: {what} is {bad} at step {step}; lower fusion.lr (now {cfg.lr:g})"
        )


def draw_batch(
    generator: torch.Generator, samples: int, batch_size: int, views: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample positions of one batch (all of them when they fit in ``batch_size``) and the view each is read
    from. With one view no view is drawn."""
    index = (
        torch.arange(samples) if samples <= batch_size else torch.randperm(samples, generator=generator)[:batch_size]
    )
    if views == 1:
        return torch.zeros_like(index), index
    return torch.randint(views, (len(index),), generator=generator), index


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


def split_metrics(split: str, probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """A result's metrics on the evaluation ``split``, each key prefixed by it: accuracy, macro-F1 and NLL."""
    accuracy, nll = score(probs, labels)
    return {
        f"{split}_accuracy": accuracy,
        f"{split}_macro_f1": macro_f1(probs.argmax(1), labels),
        f"{split}_nll": nll,
    }


@dataclass
class CrossValidation:
    """The chosen setting and its k-fold score: accuracy and NLL over all labeled samples, each predicted by the
    head that did not train on it. With a single labeled sample in some class nothing can be held out: ``folds``
    is 0, the setting is fixed (the grid's largest L2, all ``steps``) and there is no score."""

    l2: float
    steps: int
    accuracy: Optional[float]
    nll: Optional[float]
    folds: int

    def record(self) -> dict[str, Any]:
        """The result's ``selection`` fields."""
        return {
            "selected_l2": self.l2,
            "selected_steps": self.steps,
            "cv_accuracy": self.accuracy,
            "cv_nll": self.nll,
            "folds": self.folds,
            "selection": "cross-validation" if self.folds else "fixed: a class has one labeled image",
        }


def cross_validate(
    make_head: HeadFactory, features: list[torch.Tensor], labels: torch.Tensor, cfg: FusionConfig, seed: int
) -> CrossValidation:
    """Grid over L2 strengths × training length, scored by stratified k-fold cross-validation on the labeled set
    (plain features; ``features`` as for ``fit_stack``). Members: one head per (L2, fold), trained together."""
    if fold_count(labels, cfg.folds) == 0:
        return CrossValidation(max(cfg.l2_grid), cfg.steps, None, None, 0)
    fold_of = stratified_folds(labels, cfg.folds, seed)
    folds = int(fold_of.max()) + 1
    held_out = fold_of[None, :] == torch.arange(folds)[:, None]  # (folds, samples)
    trains_on = (~held_out).repeat(len(cfg.l2_grid), 1)  # member g * folds + k trains without fold k
    plain = [f[0] for f in features]
    scores: dict[int, torch.Tensor] = {}  # step -> (grid, 2): correct predictions and summed NLL over held-out samples

    def record(step: int, stack: HeadStack) -> None:
        log_probs = (
            stack.logits(plain).log_softmax(-1).unflatten(0, (len(cfg.l2_grid), folds))
        )  # (grid, folds, samples, classes)
        mask = held_out[None].float()
        correct = ((log_probs.argmax(-1) == labels).float() * mask).sum((1, 2))
        nll = (-log_probs.gather(-1, labels.expand(*log_probs.shape[:3])[..., None]).squeeze(-1) * mask).sum((1, 2))
        scores[step] = torch.stack([correct, nll], 1)

    torch.manual_seed(seed)
    head = make_head()
    stack = HeadStack([head] + [copy.deepcopy(head) for _ in range(len(trains_on) - 1)])
    l2 = torch.tensor(cfg.l2_grid, dtype=torch.float32).repeat_interleave(folds)
    fit_stack(stack, features, labels, cfg, l2, cfg.steps, seed, trains_on, record)
    candidates = [
        (float(s[g, 0]), -float(s[g, 1]), -step, g, step) for step, s in scores.items() for g in range(len(cfg.l2_grid))
    ]
    correct, neg_nll, _, grid_index, step = max(candidates)
    return CrossValidation(cfg.l2_grid[grid_index], step, correct / len(labels), -neg_nll / len(labels), folds)


def train_selected(
    make_head: HeadFactory, features: list[torch.Tensor], labels: torch.Tensor, cfg: FusionConfig, seed: int
) -> tuple[list[FusionHead], CrossValidation, list[float]]:
    """Choose hyper-parameters by k-fold cross-validation, then refit ``restarts`` heads on all labeled samples.
    Returns the heads, the selection and the loss curve of the last refit."""
    selection = cross_validate(make_head, features, labels, cfg, seed)
    heads = []
    for restart in range(cfg.restarts):
        torch.manual_seed(seed * 1000 + 500 + restart)
        heads.append(make_head())
    stack = HeadStack(heads)
    losses = fit_stack(
        stack, features, labels, cfg, torch.full((len(heads),), selection.l2), selection.steps, seed * 1000 + 500
    )
    return stack.unstack(), selection, losses[-1].tolist()
