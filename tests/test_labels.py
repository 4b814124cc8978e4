from __future__ import annotations

import hashlib
import json

import pytest
import torch
from test_fusion import informative_and_noise

from ssl_fusion.config import LabelsConfig, load_option
from ssl_fusion.data.splits import labeled_subset, regime_name, stratified_subset
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.protocol import fuse_once
from ssl_fusion.runtime.errors import UserError

LABELS = torch.cat([torch.full((n,), c) for c, n in enumerate([1000, 500, 200])])[
    torch.randperm(1700, generator=torch.Generator().manual_seed(3))
]


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


def test_a_published_split_file_gives_exactly_its_images(tmp_path):
    """``labels.indices_file`` (one index per line, or a JSON list) is the labeled subset, whatever the seed; the result
    names the file as its regime and hashes exactly those indices."""
    chosen = [int(i) for i in torch.randperm(600, generator=torch.Generator().manual_seed(0))[:40]]
    lines, listed = tmp_path / "split.txt", tmp_path / "split.json"
    lines.write_text("\n".join(map(str, chosen)) + "\n")
    listed.write_text(json.dumps(chosen))
    expected = torch.tensor(sorted(chosen))
    assert torch.equal(LabelsConfig(indices_file=str(lines)).subset(LABELS, seed=0), expected)
    assert torch.equal(LabelsConfig(indices_file=str(listed)).subset(LABELS, seed=5), expected)
    result = fuse_once(
        informative_and_noise(), load_option(FUSIONS, "concat"), LabelsConfig(indices_file=str(lines)), seed=1
    )
    assert result["n_labeled"] == 40 and result["regime"] == "split.txt" and result["labels_indices_file"] == str(lines)
    assert result["labeled_indices_sha256"] == hashlib.sha256(expected.numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no file"),
        ("", "needs at least one index"),
        ("3\nseven\n", "not a JSON list or one integer index per line"),
        ("[1, 2.5]", "each an integer"),
        ("0\n1700\n", "index 1700 is outside the training split"),
        ("-1\n", "index -1 is outside the training split"),
        ("4\n9\n4\n", "index 4 is listed more than once"),
    ],
)
def test_a_bad_split_file_is_refused_in_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "split.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as refused:
        labeled_subset(LABELS, 0.01, None, str(path), seed=0)
    assert "labels.indices_file" in str(refused.value) and "\n" not in str(refused.value)
