"""``shuffled_labels``: the supervised recipe on labels permuted once, a trained encoder that learns nothing of the
classes (the control for negative transfer)."""

from __future__ import annotations

import pytest
import torch
from pretext_check import CPU, short_pretraining, tiny_encoder

from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.evaluation.probe import extract_features, linear_probe_accuracy
from ssl_fusion.pretexts.shuffled_labels import ShuffledLabels, ShuffledLabelsConfig, keyed_labels, shuffled_labels
from ssl_fusion.pretexts.supervised import SupervisedConfig
from ssl_fusion.runtime.device import resolve_precision


def small_data(n_train: int = 64, num_classes: int = 4):
    return make_synthetic(SyntheticConfig(name="synthetic", n_train=n_train, n_test=16, num_classes=num_classes), None)


def test_the_permutation_keeps_the_label_counts_is_fixed_by_its_seed_and_moves_labels():
    labels = torch.arange(1000) % 10
    permuted = shuffled_labels(labels, 0)
    assert torch.equal(permuted.bincount(), labels.bincount())
    assert torch.equal(permuted, shuffled_labels(labels, 0))
    assert not torch.equal(permuted, shuffled_labels(labels, 1))
    # A label independent of the true one agrees with it for about 1 image in 10 (100 of 1,000, SE 9.5).
    assert (permuted == labels).sum() < 200


def test_each_pretraining_image_gets_its_permuted_label_in_any_batch_order():
    """The loss finds each image's label by its pixels: a shuffled batch of the pretraining images gets exactly the
    permuted labels of those images, and an image not among them is refused."""
    data = small_data()
    recipe = ShuffledLabels.adapt(ShuffledLabelsConfig(name="shuffled_labels", label_seed=3), data)
    assert recipe.num_classes == 4 and recipe.label_seed == 3
    model = ShuffledLabels(recipe, tiny_encoder())
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    images = data.train_images[order].float() / 255
    assert torch.equal(model.labels_of(images), shuffled_labels(data.train_labels, 3)[order])
    with pytest.raises(ValueError, match="not among its pretraining images"):
        model.labels_of(1 - images[:2])


def test_identical_images_share_one_key_and_different_ones_do_not():
    data = small_data()
    images = torch.cat([data.train_images, data.train_images[:5]])
    keyed = keyed_labels(images, torch.cat([data.train_labels, data.train_labels[:5]]), 0)
    assert len(keyed.keys.unique()) == 64


def few_label_probe(encoder, data, per_class: int) -> float:
    """Linear-probe accuracy on the test images, trained on the first ``per_class`` training images of each class."""
    dtype = resolve_precision("auto", CPU)
    bank = extract_features(encoder, data.train_images, 1024, CPU, dtype)
    queries = extract_features(encoder, data.test_images, 1024, CPU, dtype)
    few = torch.cat([torch.nonzero(data.train_labels == c)[:per_class, 0] for c in range(data.num_classes)])
    return linear_probe_accuracy(bank[few], data.train_labels[few], queries, data.test_labels)


@pytest.mark.slow
def test_an_encoder_trained_on_shuffled_labels_probes_far_below_a_supervised_one(tmp_path):
    """The same encoder, seed, data and steps (4 epochs of 16 batches of 64 noisy synthetic images, 10 classes),
    trained on the true labels and on the shuffled ones, then probed linearly with 5 labels per class on 512 test
    images (the few-label regime the heads meet). Measured: supervised 0.797, shuffled labels 0.602 (the untrained
    encoder: 0.602). One accuracy's binomial SE on 512 images is about 0.02, the paired difference's below 0.03; the
    margin, 0.1 (51 images), is half the measured gap."""
    data = make_synthetic(SyntheticConfig(name="synthetic", n_train=1024, n_test=512, num_classes=10, noise=0.5), None)
    recipe = {"epochs": 4, "batch_size": 64, "lr": 0.01}
    supervised, _, _ = short_pretraining(SupervisedConfig(name="supervised", **recipe), data, tmp_path / "s")
    shuffled, _, losses = short_pretraining(
        ShuffledLabelsConfig(name="shuffled_labels", **recipe), data, tmp_path / "r"
    )
    assert losses[-1] > 2.0, losses  # ln 10 = 2.30: labels that carry nothing stay near chance
    assert few_label_probe(shuffled.encoder, data, 5) < few_label_probe(supervised.encoder, data, 5) - 0.1
