"""Training fusion heads on cached features the way a good linear model is trained.

Protocol: split the labeled set into stratified folds; for every setting of the grid (``FusionConfig.grid``: an
L2 strength, and a strength per penalty of the head's own) and every fold, train a head on the other folds and score
it on its fold every ``eval_every`` steps; pick the (setting, steps) pair with the best cross-validated accuracy over
all labeled samples (ties: lower NLL);
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

    def proximal(self, optimizer: torch.optim.Adam, strengths: dict[str, torch.Tensor]) -> None:
        """The head's proximal step (``FusionHead.proximal``) after ``optimizer``'s last step, given the gradient that
        step followed (Adam's bias-corrected first moment ``m_hat``) and the step size it gave each coordinate
        (``lr / (sqrt(v_hat) + eps)``, which multiplied ``m_hat``). Nothing without strengths of the head's own."""
        if not strengths:
            return
        group = optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        moments, step_sizes = {}, {}
        for name, param in self.params.items():
            state, key = optimizer.state[param], name.removeprefix("head.")
            step = float(state["step"])
            moments[key] = state["exp_avg"] / (1 - beta1**step)
            step_sizes[key] = group["lr"] / ((state["exp_avg_sq"] / (1 - beta2**step)).sqrt() + group["eps"])
        params = {name.removeprefix("head."): p for name, p in self.params.items()}
        with torch.no_grad():
            self.template.head.proximal(params, moments, step_sizes, strengths)

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
    strengths: Optional[dict[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """``features``: per pretext, (views, samples, dim), the plain features first (see ``FeatureSet.labeled_rows``).
    Minimise each member's cross entropy over the samples ``trains_on[member]`` marks (all when None) +
    ``l2[member]`` * L2 + the head's regulariser for ``steps`` Adam steps at a constant rate (a refit for N steps
    retraces selection), each followed by the head's proximal step for its own penalties' ``strengths`` (each
    (members,), in units of ``per_sample_scale``); returns the loss curves (members, steps). Full-batch when the
    labeled set fits in ``cfg.batch_size``, else every member reads the same random batch. ``on_eval(step, stack)``
    runs every ``cfg.eval_every`` steps. Each sample of a batch is read from one of its views, drawn at random, the
    same view for every pretext (all pretexts saw the same augmented image)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws
    optimizer = torch.optim.Adam(stack.params.values(), lr=cfg.lr)
    weights = torch.ones(len(stack), len(labels)) if trains_on is None else trains_on.float()
    own = per_sample_scale(strengths or {}, weights.sum(1))
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
        stack.proximal(optimizer, own)
        losses[step - 1] = loss.detach()
        if on_eval is not None and step % cfg.eval_every == 0:
            on_eval(step, stack)
    check_finite(cfg, torch.stack([p.detach().abs().max() for p in stack.params.values()]), steps, "a weight")
    return losses.T


def per_sample_scale(strengths: dict[str, torch.Tensor], samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """A head's own strengths, given in units of ``1 / sqrt(samples)`` (each member's training samples), as the head
    applies them: the norm at which the mean gradient of features without label information falls with the samples,
    so that one grid fits every label regime and a refit on all labels keeps the strength cross-validation chose."""
    return {key: strength / samples.clamp_min(1).sqrt() for key, strength in strengths.items()}


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
    """The chosen setting (a strength per penalty, ``FusionConfig.grid``) and its k-fold score: accuracy and NLL over
    all labeled samples, each predicted by the head that did not train on it. With a single labeled sample in some
    class nothing can be held out: ``folds`` is 0, the setting is fixed (``fixed_setting``, all ``steps``) and there
    is no score."""

    setting: dict[str, float]
    steps: int
    accuracy: Optional[float]
    nll: Optional[float]
    folds: int

    def record(self) -> dict[str, Any]:
        """The result's ``selection`` fields."""
        return {
            **{f"selected_{key}": strength for key, strength in self.setting.items()},  # selected_l2, ...
            "selected_steps": self.steps,
            "cv_accuracy": self.accuracy,
            "cv_nll": self.nll,
            "folds": self.folds,
            "selection": "cross-validation" if self.folds else "fixed: a class has one labeled image",
        }


def fixed_setting(grid: list[dict[str, float]]) -> dict[str, float]:
    """The setting without cross-validation: the grid's largest L2, and the smallest of each of the head's own
    strengths. One label per class cannot tell a pretext that pays from one that does not, so no head penalty
    of its own leaves one out (the group lasso's largest strength sets every block to zero there)."""
    return {key: (max if key == "l2" else min)(s[key] for s in grid) for key in grid[0]}


def member_strengths(settings: list[dict[str, float]], repeats: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each member's L2 strength and its head's own strengths, for members ``g * repeats + r`` trained with
    ``settings[g]``."""
    column = {key: torch.tensor([s[key] for s in settings]).repeat_interleave(repeats) for key in settings[0]}
    return column.pop("l2"), column


def cross_validate(
    make_head: HeadFactory, features: list[torch.Tensor], labels: torch.Tensor, cfg: FusionConfig, seed: int
) -> CrossValidation:
    """Grid over settings (``cfg.grid()``) × training length, scored by stratified k-fold cross-validation on the
    labeled set (plain features; ``features`` as for ``fit_stack``). Members: one head per (setting, fold), trained
    together."""
    grid = cfg.grid()
    if fold_count(labels, cfg.folds) == 0:
        return CrossValidation(fixed_setting(grid), cfg.steps, None, None, 0)
    fold_of = stratified_folds(labels, cfg.folds, seed)
    folds = int(fold_of.max()) + 1
    held_out = fold_of[None, :] == torch.arange(folds)[:, None]  # (folds, samples)
    trains_on = (~held_out).repeat(len(grid), 1)  # member g * folds + k trains without fold k
    plain = [f[0] for f in features]
    scores: dict[int, torch.Tensor] = {}  # step -> (grid, 2): correct predictions and summed NLL over held-out samples

    def record(step: int, stack: HeadStack) -> None:
        log_probs = (
            stack.logits(plain).log_softmax(-1).unflatten(0, (len(grid), folds))
        )  # (grid, folds, samples, classes)
        mask = held_out[None].float()
        correct = ((log_probs.argmax(-1) == labels).float() * mask).sum((1, 2))
        nll = (-log_probs.gather(-1, labels.expand(*log_probs.shape[:3])[..., None]).squeeze(-1) * mask).sum((1, 2))
        scores[step] = torch.stack([correct, nll], 1)

    torch.manual_seed(seed)
    head = make_head()
    stack = HeadStack([head] + [copy.deepcopy(head) for _ in range(len(trains_on) - 1)])
    l2, strengths = member_strengths(grid, folds)
    fit_stack(stack, features, labels, cfg, l2, cfg.steps, seed, trains_on, record, strengths)
    candidates = [
        (float(s[g, 0]), -float(s[g, 1]), -step, g, step) for step, s in scores.items() for g in range(len(grid))
    ]
    correct, neg_nll, _, grid_index, step = max(candidates)
    return CrossValidation(grid[grid_index], step, correct / len(labels), -neg_nll / len(labels), folds)


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
    l2, strengths = member_strengths([selection.setting], len(heads))
    losses = fit_stack(stack, features, labels, cfg, l2, selection.steps, seed * 1000 + 500, strengths=strengths)
    return stack.unstack(), selection, losses[-1].tolist()
