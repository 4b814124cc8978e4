"""LogME (You et al., ICML 2021): how well frozen features suit a labelled task, without training a head.

For each class, the one-hot column ``y`` is fit by Bayesian linear regression ``y = F w + noise`` with
prior ``w ~ N(0, 1/alpha)`` and noise ``N(0, 1/beta)``; the log marginal likelihood (evidence) is
maximised over alpha and beta by MacKay's fixed-point updates, computed on the SVD of ``F`` so each
iteration costs O(min(n, d)). The score is the maximised evidence averaged over classes, divided by n.
"""

from __future__ import annotations

import math

import torch

MAX_ITERATIONS = 100
TOLERANCE = 1e-6


def logme_evidence(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` of the maximised log evidence per sample (higher is better)."""
    f = features.double()
    n, d = f.shape
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    sigma = s.square().unsqueeze(1)  # (k, 1): eigenvalues of F^T F; the other d - k are zero
    targets = (labels.unsqueeze(1) == labels.unique().unsqueeze(0)).double()  # (n, classes)
    x2 = (u.T @ targets).square()  # (k, classes): targets in the singular basis
    outside = targets.square().sum(0) - x2.sum(0)  # part of each target outside the span of F
    alpha = torch.ones(targets.shape[1], dtype=torch.float64)
    beta = torch.ones_like(alpha)

    def fit(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Effective number of parameters, |m|^2 and residual |y - F m|^2 of the posterior mean m."""
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum(0)
        m2 = (sigma * x2 / (sigma + t).square()).sum(0)
        res2 = (x2 * (t / (sigma + t)).square()).sum(0) + outside
        return gamma, m2, res2

    for _ in range(MAX_ITERATIONS):
        gamma, m2, res2 = fit(alpha, beta)
        new_alpha, new_beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
        change = ((new_alpha / new_beta) / (alpha / beta) - 1).abs().max()
        alpha, beta = new_alpha, new_beta
        if change <= TOLERANCE:
            break
    _, m2, res2 = fit(alpha, beta)
    log_det = torch.log(alpha + beta * sigma).sum(0) + (d - len(s)) * torch.log(alpha)
    evidence = (
        d / 2 * torch.log(alpha)
        + n / 2 * torch.log(beta)
        - alpha / 2 * m2
        - beta / 2 * res2
        - log_det / 2
        - n / 2 * math.log(2 * math.pi)
    )
    return float((evidence / n).mean())
