"""The plain reference every head is compared against: scikit-learn's ``LogisticRegressionCV`` on the concatenated,
standardised features of a labeled subset (``scripts/bench.py --only heads`` and
``scripts/reference/logreg_concat.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from sklearn.linear_model import LogisticRegressionCV

from ssl_fusion.data.features import FeatureSet


@dataclass
class ReferenceFit:
    """Test predictions of the fitted reference and the inverse regularisation strength its cross-validation chose."""

    predictions: torch.Tensor
    chosen_c: float

    def accuracy(self, test_labels: torch.Tensor) -> float:
        return float((self.predictions == test_labels).float().mean())


def fit_logistic_regression_cv(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor) -> ReferenceFit:
    """scikit-learn's ``LogisticRegressionCV(cv=5)`` (its grid of ten C values, lbfgs run to convergence) fit on
    ``train``, predicting ``test``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # notices of defaults changing in later scikit-learn releases
        model = LogisticRegressionCV(cv=5, max_iter=2000).fit(train.numpy(), labels.numpy())
    return ReferenceFit(torch.from_numpy(model.predict(test.numpy())).long(), float(model.C_[0]))


def logistic_regression_cv(
    train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor
) -> float:
    """Test accuracy of ``fit_logistic_regression_cv`` fit on ``train``."""
    return fit_logistic_regression_cv(train, labels, test).accuracy(test_labels)


def concatenated(features: list[FeatureSet], labeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``labeled`` train rows and the test rows of every feature set, each standardised by its train split's
    statistics (as the heads read them, plain images only) and concatenated; and the labeled rows' labels."""
    train = torch.cat([fs.labeled_rows(labeled)[0] for fs in features], 1)
    test = torch.cat([fs.standardized(fs.test) for fs in features], 1)
    return train, features[0].train_labels[labeled], test


def concat_logistic_regression_cv(features: list[FeatureSet], labeled: torch.Tensor) -> ReferenceFit:
    """``LogisticRegressionCV`` on the concatenated standardised features of the ``labeled`` subset."""
    train, labels, test = concatenated(features, labeled)
    return fit_logistic_regression_cv(train, labels, test)
