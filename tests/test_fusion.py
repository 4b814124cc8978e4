from __future__ import annotations

import torch

from ssl_fusion.config import LabelsConfig
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.fusion.attention import AttentionConfig, AttentionFusion
from ssl_fusion.fusion.concat import ConcatConfig, ConcatFusion
from ssl_fusion.fusion.protocol import fuse_once, method_label


def informative_and_noise(n_train: int = 600, n_test: int = 400) -> dict[str, FeatureSet]:
    """One pretext whose features carry the class, one whose features are pure noise."""
    generator = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(5, 32, generator=generator)
    train_labels, test_labels = torch.arange(n_train) % 5, torch.arange(n_test) % 5

    def informative(labels):
        return centers[labels] + torch.randn(len(labels), 32, generator=generator)

    def noise(labels):
        return torch.randn(len(labels), 48, generator=generator)

    return {
        "good": FeatureSet(informative(train_labels), informative(test_labels), train_labels, test_labels),
        "noise": FeatureSet(noise(train_labels), noise(test_labels), train_labels, test_labels),
    }


def test_attention_weights_are_a_distribution_per_sample():
    head = AttentionFusion(AttentionConfig(name="attention"), [32, 48, 16], num_classes=5)
    features = [torch.randn(10, 32), torch.randn(10, 48), torch.randn(10, 16)]
    weights = head.pretext_weights(features)
    assert weights.shape == (10, 3)
    assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(10))
    assert head(features).shape == (10, 5)


def test_attention_combining_by_concat_with_equal_weights_is_the_concat_head():
    cfg = AttentionConfig(name="attention", combine="concat")
    head = AttentionFusion(cfg, [32, 48], num_classes=5).eval()
    torch.nn.init.zeros_(head.scorer[-1].weight)  # equal scores: equal weights
    concat = ConcatFusion(ConcatConfig(name="concat"), [32, 48], num_classes=5).eval()
    with torch.no_grad():
        concat.classifier.weight.copy_(torch.cat([c.weight for c in head.classifiers], dim=1))
        concat.classifier.bias.copy_(sum(c.bias for c in head.classifiers))
    features = [torch.randn(10, 32), torch.randn(10, 48)]
    assert torch.allclose(head.pretext_weights(features), torch.full((10, 2), 0.5))
    assert torch.allclose(head(features), concat(features), atol=1e-5)


def test_attention_learns_and_shifts_weight_to_the_informative_pretext():
    features = informative_and_noise()
    result = fuse_once(features, AttentionConfig(name="attention", screen=False), LabelsConfig(fraction=0.2), seed=0)
    assert result["final_loss"] < result["first_loss"]
    assert result["test_accuracy"] > 0.9
    assert result["mean_pretext_weights"]["good"] > 0.6


def test_method_names_show_the_options_changed_from_the_yaml():
    features = informative_and_noise()
    assert method_label(AttentionConfig(name="attention"), features) == "attention(good+noise)"
    assert method_label(AttentionConfig(name="attention", combine="concat", temperature=0.5), features) == (
        "attention[temperature=0.5,combine=concat](good+noise)"
    )


def test_fusion_is_deterministic_for_a_seed():
    features = informative_and_noise()
    cfg = ConcatConfig(name="concat")
    first = fuse_once(features, cfg, LabelsConfig(fraction=0.05), seed=3)
    again = fuse_once(features, cfg, LabelsConfig(fraction=0.05), seed=3)
    assert first["test_accuracy"] == again["test_accuracy"] and first["final_loss"] == again["final_loss"]
