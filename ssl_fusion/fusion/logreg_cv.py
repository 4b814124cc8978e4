"""``logreg_cv``: scikit-learn's ``LogisticRegressionCV`` on the concatenation of the pretexts' standardised features.

The textbook reference a fusion head has to beat, run by the same protocol as the heads (same labeled subset, same
evaluation split, same record): multinomial logistic regression fit by lbfgs, its inverse L2 strength C chosen from
``c_grid`` by accuracy over the heads' stratified k-fold split of the labeled set (``data.splits.stratified_folds``:
fewer folds when a class has fewer labels), then refit on all labeled samples. With a single labeled image in some
class nothing can be held out: C is fixed at the grid's smallest (the strongest regularisation, as the heads take
their grid's largest L2). Two classes: scikit-learn's binary logistic regression, the same model.

Cached augmented views of the labeled images are training rows too, as for the heads, and a fold holds out all
views of its images; its score reads the plain images only. scikit-learn's objective, ``C · Σ loss + ½‖W‖²``, is
the heads' mean loss + ``l2 · ‖W‖²`` with ``l2 = 1 / (2 C rows)``: the result records that ``selected_l2`` beside
``selected_c``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, List

import numpy as np
import torch
from omegaconf import MISSING
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from threadpoolctl import threadpool_limits

from ssl_fusion.data.splits import fold_count, stratified_folds
from ssl_fusion.fusion import FUSIONS, Fitted, FusionMethod
from ssl_fusion.runtime.checks import Checked, Rule, at_least


@dataclass
class LogRegCVConfig(Checked):
    section: ClassVar[str] = "fusion"
    name: str = MISSING
    c_grid: List[float] = field(default_factory=lambda: [10.0**e for e in range(-4, 5)])  # scikit-learn's Cs
    max_iter: int = 2000  # lbfgs iterations of each fit
    folds: int = 5  # stratified k-fold cross-validation over the labeled set, as the heads'
    screen: bool = False  # true: leave out the pretexts the heads' screen leaves out; false: all pretexts

    def rules(self) -> dict[str, Rule]:
        return {
            "c_grid": Rule(lambda grid: len(grid) > 0 and min(grid) > 0, "a non-empty list of values > 0", [0.0]),
            "max_iter": at_least(1),
            "folds": at_least(2),
        }


def fold_splits(fold_of: torch.Tensor, views: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, held-out rows) per fold over ``views`` stacked copies of the samples (view v of sample i is row
    ``v * samples + i``, the plain images first): a fold trains on every view of the other folds' images and scores
    the plain view of its own."""
    every_view = fold_of.repeat(views)
    return [
        (torch.nonzero(every_view != k).flatten().numpy(), torch.nonzero(fold_of == k).flatten().numpy())
        for k in range(int(fold_of.max()) + 1)
    ]


def fold_scores(model: LogisticRegressionCV) -> np.ndarray:
    """Held-out accuracy (folds, Cs): ``scores_`` as a dict of one array per class (scikit-learn before 1.10's
    attributes) or one array (folds, l1 ratios, Cs)."""
    scores = model.scores_
    grid = next(iter(scores.values())) if isinstance(scores, dict) else scores
    return np.asarray(grid).reshape(len(grid), -1)


@FUSIONS.register("logreg_cv", LogRegCVConfig)
class LogRegCV(FusionMethod):
    """Not a head trained by gradient steps: ``fit_predict`` fits scikit-learn's model on the labeled features."""

    fits_itself: ClassVar[bool] = True

    def __init__(self, cfg: LogRegCVConfig, feature_dims: list[int], num_classes: int) -> None:
        """Same signature as a head's: the stages build every method before any work."""
        self.cfg = cfg
        self.num_classes = num_classes

    def fit_predict(
        self, train: list[torch.Tensor], labels: torch.Tensor, test: list[torch.Tensor], seed: int
    ) -> Fitted:
        """``train``: per pretext, (views, samples, dim) labeled features; ``test``: per pretext, (samples, dim).
        BLAS runs on as many threads as the heads' intra-op ones (``train.num_threads`` in the stages)."""
        rows = torch.cat(train, dim=-1)
        views, samples, dim = rows.shape
        x, y = rows.reshape(views * samples, dim).numpy(), labels.repeat(views).numpy()
        folds = fold_count(labels, self.cfg.folds)
        with threadpool_limits(torch.get_num_threads()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # notices of defaults changing in later releases
            if folds == 0:
                c, accuracy = min(self.cfg.c_grid), None
                model = LogisticRegression(C=c, max_iter=self.cfg.max_iter).fit(x, y)
            else:
                splits = fold_splits(stratified_folds(labels, self.cfg.folds, seed), views)
                model = LogisticRegressionCV(
                    Cs=list(self.cfg.c_grid), cv=splits, scoring="accuracy", solver="lbfgs", max_iter=self.cfg.max_iter
                ).fit(x, y)
                c = float(np.ravel(model.C_)[0])
                held_out = np.array([len(held) for _, held in splits])
                accuracy = float(fold_scores(model)[:, list(self.cfg.c_grid).index(c)] @ held_out / samples)
            found = torch.from_numpy(model.predict_proba(torch.cat(test, 1).numpy()))
        probs = found.new_zeros(len(found), self.num_classes)  # a class without a labeled image: probability 0
        probs[:, torch.as_tensor(model.classes_)] = found
        selection = {
            "selected_l2": 1 / (2 * c * len(x)),  # the heads' L2 with the same optimum (see the module's docstring)
            "selected_c": c,
            "cv_accuracy": accuracy,
            "folds": folds,
            "selection": "cross-validation" if folds else "fixed: a class has one labeled image",
        }
        return Fitted(probs, None, selection, {"head_parameters": model.coef_.size + model.intercept_.size})
