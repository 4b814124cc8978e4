from __future__ import annotations

import pytest
import torch

from ssl_fusion.data.splits import regime_name, stratified_subset
from ssl_fusion.runtime.errors import UserError

LABELS = torch.cat([torch.full((n,), c) for c, n in enumerate([1000, 500, 200])])[torch.randperm(1700, generator=torch.Generator().manual_seed(3))]


def test_fraction_keeps_each_class_share():
    chosen = stratified_subset(LABELS, 0.1, None, seed=0)
    assert torch.bincount(LABELS[chosen]).tolist() == [100, 50, 20]
    assert len(set(chosen.tolist())) == len(chosen)


def test_per_class_takes_that_many_of_each():
    chosen = stratified_subset(LABELS, None, 7, seed=0)
    assert torch.bincount(LABELS[chosen]).tolist() == [7, 7, 7]


def test_tiny_fraction_keeps_at_least_one_per_class():
    chosen = stratified_subset(LABELS, 0.0001, None, seed=0)
    assert torch.bincount(LABELS[chosen]).tolist() == [1, 1, 1]


def test_same_seed_same_subset_other_seed_other_subset():
    first = stratified_subset(LABELS, 0.05, None, seed=1)
    assert torch.equal(first, stratified_subset(LABELS, 0.05, None, seed=1))
    assert not torch.equal(first, stratified_subset(LABELS, 0.05, None, seed=2))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_outside_unit_interval_is_refused(fraction):
    with pytest.raises(UserError, match=r"labels.fraction must be in \(0, 1\]"):
        stratified_subset(LABELS, fraction, None, seed=0)


def test_per_class_above_smallest_class_is_refused():
    with pytest.raises(UserError, match="smallest class"):
        stratified_subset(LABELS, None, 201, seed=0)


def test_regime_names():
    assert regime_name(0.01, None) == "1%"
    assert regime_name(0.01, 10) == "10/class"
