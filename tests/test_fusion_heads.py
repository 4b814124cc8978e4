"""The gate, static, moe, mean and ensemble heads, and the LogME score."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from test_fusion import informative_and_noise

from ssl_fusion.config import CONF_DIR, LabelsConfig
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.evaluation.logme import logme_evidence
from ssl_fusion.fusion import FUSIONS, FusionConfig
from ssl_fusion.fusion.ensemble import EnsembleConfig, EnsembleFusion
from ssl_fusion.fusion.gate import GateConfig, GateFusion
from ssl_fusion.fusion.mean import MeanConfig
from ssl_fusion.fusion.moe import MoEConfig, MoEFusion
from ssl_fusion.fusion.protocol import fuse_once
from ssl_fusion.fusion.static import StaticConfig, StaticFusion
from ssl_fusion.runtime.errors import UserError

NEW_HEADS = ["gate", "static", "moe", "mean", "ensemble"]
DIMS = [32, 48, 16]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The heads are tiny: on a busy machine extra intra-op threads only spin (about 7x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_features(batch: int = 10) -> list[torch.Tensor]:
    return [torch.randn(batch, dim) for dim in DIMS]


def fit(features: dict[str, FeatureSet], cfg: FusionConfig) -> dict:
    """The head alone, without the screen (which would leave the noise pretexts out before it trains)."""
    result = fuse_once(features, dataclasses.replace(cfg, screen=False), LabelsConfig(fraction=0.2), seed=0)
    assert result["final_loss"] < result["first_loss"]
    assert result["test_accuracy"] > 0.9, result["test_accuracy"]
    return result


@pytest.mark.parametrize("name", NEW_HEADS)
def test_yaml_lists_every_field_with_its_default(name):
    config_cls = FUSIONS.get(name).config_cls
    defaults = OmegaConf.to_container(OmegaConf.structured(config_cls(name=name)))
    assert OmegaConf.to_container(OmegaConf.load(CONF_DIR / "fusion" / f"{name}.yaml")) == defaults


@pytest.mark.parametrize(
    "cfg",
    [
        GateConfig(name="gate"),
        StaticConfig(name="static"),
        StaticConfig(name="static", mode="l1"),
        MoEConfig(name="moe"),
        MeanConfig(name="mean"),
        EnsembleConfig(name="ensemble"),
    ],
    ids=["gate", "static_softmax", "static_l1", "moe", "mean", "ensemble"],
)
def test_output_is_batch_by_classes(cfg):
    head = FUSIONS.get(cfg.name).impl(cfg, DIMS, num_classes=5)
    assert head(random_features()).shape == (10, 5)
    head.eval()
    assert head(random_features(7)).shape == (7, 5)


@pytest.mark.parametrize(
    "cfg",
    [MeanConfig(name="mean"), EnsembleConfig(name="ensemble"), StaticConfig(name="static", mode="l1")],
    ids=["mean", "ensemble", "static_l1"],
)
def test_head_learns_from_the_informative_pretext(cfg):
    result = fit(informative_and_noise(), cfg)
    assert result["test_accuracy"] > 0.9 and result["final_loss"] < result["first_loss"], result


def test_gates_are_per_sample_in_zero_one_and_favour_the_informative_pretext():
    head = GateFusion(GateConfig(name="gate"), DIMS, num_classes=5).eval()
    gates = head.pretext_weights(random_features())
    assert gates.shape == (10, 3)
    assert ((gates > 0) & (gates < 1)).all()
    assert (gates.std(0) > 0).all()  # per sample, unlike static
    weights = fit(informative_and_noise(), GateConfig(name="gate"))["mean_pretext_weights"]
    assert weights["good"] > weights["noise"] + 0.2, weights


def test_static_softmax_weights_are_shared_sum_to_one_and_learn_the_informative_pretext():
    head = StaticFusion(StaticConfig(name="static"), DIMS, num_classes=5)
    torch.nn.init.normal_(head.raw)
    weights = head.pretext_weights(random_features())
    assert weights.shape == (10, 3)
    assert torch.allclose(weights.sum(1), torch.ones(10))
    assert torch.equal(weights, weights[:1].expand(10, -1))
    assert head.regularization() == 0
    learned = fit(informative_and_noise(), StaticConfig(name="static"))["mean_pretext_weights"]
    assert sum(learned.values()) == pytest.approx(1)
    assert learned["good"] > 0.6, learned


def test_static_l1_penalises_the_non_negative_weights():
    cfg = StaticConfig(name="static", mode="l1", l1_weight=0.5)
    head = StaticFusion(cfg, DIMS, num_classes=5)
    with torch.no_grad():
        head.raw.copy_(torch.tensor([0.1, -0.2, 0.03]))
    weights = head.pretext_weights(random_features())[0]
    assert torch.allclose(weights, torch.tensor([1.0, 0.0, 0.3]))  # weight_lr_scale * raw, clipped at 0
    assert head.regularization().item() == pytest.approx(0.5 * 1.3)


def test_moe_keeps_exactly_top_k_pretexts_per_sample():
    head = MoEFusion(MoEConfig(name="moe", top_k=2, feature_dropout=0.0), DIMS, num_classes=5)
    torch.nn.init.normal_(head.gate.weight)
    head.eval()
    features = random_features(50)
    gates = head.pretext_weights(features)
    assert gates.shape == (50, 3)
    assert ((gates > 0).sum(1) == 2).all()
    assert torch.allclose(gates.sum(1), torch.ones(50))
    assert len({tuple(row) for row in (gates > 0).tolist()}) > 1  # the choice depends on the sample
    head.train()
    assert torch.equal(head.pretext_weights(features), gates)  # reported gates are noise-free
    assert not torch.equal(head(features), head(features))  # training adds gate noise


@pytest.mark.parametrize("top_k, penalty", [(3, 0.0), (1, 2.0)])
def test_moe_balance_term_is_the_squared_variation_of_mean_gates(top_k, penalty):
    # The router starts at zero: top_k=3 gives uniform gates; top_k=1 sends every sample to one pretext,
    # mean gates (1, 0, 0), whose squared coefficient of variation is 2.
    head = MoEFusion(MoEConfig(name="moe", top_k=top_k, balance_weight=0.5), DIMS, num_classes=5).eval()
    head(random_features())
    assert head.regularization().item() == pytest.approx(0.5 * penalty, abs=1e-6)


def test_moe_routes_to_the_informative_pretext_among_three():
    base = informative_and_noise()
    generator = torch.Generator().manual_seed(1)
    good = base["good"]
    train, test = torch.randn(600, 16, generator=generator), torch.randn(400, 16, generator=generator)
    noise2 = FeatureSet(train, test, good.train_labels, good.test_labels)
    # Last: the zero-initialised router's ties pick the first two, so only learned routing reaches it.
    features = {"noise": base["noise"], "noise2": noise2, "good": good}
    weights = fit(features, MoEConfig(name="moe", top_k=2))["mean_pretext_weights"]
    assert sum(weights.values()) == pytest.approx(1)
    assert weights["good"] > max(weights["noise"], weights["noise2"]), weights


def test_ensemble_returns_log_of_mean_member_probabilities():
    head = EnsembleFusion(EnsembleConfig(name="ensemble"), DIMS, num_classes=5).eval()
    features = random_features()
    out = head(features)
    assert torch.allclose(out.exp().sum(1), torch.ones(10))
    members = torch.stack([F.softmax(c(f), dim=1) for c, f in zip(head.classifiers, features)]).mean(0)
    assert torch.allclose(out, members.log(), atol=1e-6)
    assert head.pretext_weights(features) is None


@pytest.mark.parametrize(
    "cfg, key",
    [
        (MoEConfig(name="moe", top_k=0), "fusion.top_k"),
        (MoEConfig(name="moe", top_k=4), "fusion.top_k"),
        (StaticConfig(name="static", mode="max"), "fusion.mode"),
        (StaticConfig(name="static", weight_lr_scale=0.0), "fusion.weight_lr_scale"),
    ],
)
def test_bad_values_are_user_errors_naming_the_key(cfg, key):
    with pytest.raises(UserError, match=key):
        FUSIONS.get(cfg.name).impl(cfg, DIMS, 5)


def direct_logme(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Maximise log N(y; 0, I/beta + F F^T/alpha) over (alpha, beta) per class with L-BFGS; mean / n."""
    n = len(labels)
    gram = features.double() @ features.double().T
    evidences = []
    for cls in labels.unique():
        y = (labels == cls).double()
        log_params = torch.zeros(2, dtype=torch.float64, requires_grad=True)

        def negative_evidence() -> torch.Tensor:
            alpha, beta = log_params.exp()
            cov = torch.eye(n, dtype=torch.float64) / beta + gram / alpha
            return -torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(y)

        optimizer = torch.optim.LBFGS(
            [log_params], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = negative_evidence()
            loss.backward()
            return loss

        optimizer.step(closure)
        evidences.append(-negative_evidence().item() / n)
    return sum(evidences) / len(evidences)


@pytest.mark.parametrize("n, d, seed", [(12, 3, 12), (10, 16, 2)])  # more samples than dimensions, and fewer
def test_logme_matches_a_direct_maximisation_of_the_evidence(n, d, seed):
    # Every class is predictable, so each maximum is interior (for a class the features cannot predict
    # alpha runs off to infinity, where LogME's 1e-5 guards stop it early; these seeds have none).
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    features = 3 * F.one_hot(labels).float() @ torch.randn(3, d, generator=generator) + torch.randn(n, d, generator=generator)
    assert logme_evidence(features, labels) == pytest.approx(direct_logme(features, labels), abs=1e-4)


def test_logme_prefers_informative_features_to_random_ones():
    good = informative_and_noise()["good"]
    random = torch.randn(good.train.shape, generator=torch.Generator().manual_seed(2))
    assert logme_evidence(good.train, good.train_labels) > logme_evidence(random, good.train_labels)


def test_logme_prefers_true_labels_to_shuffled_ones():
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(500) % 10
    features = F.one_hot(labels).float() @ torch.randn(10, 64, generator=generator) + 0.1 * torch.randn(500, 64, generator=generator)
    shuffled = labels[torch.randperm(500, generator=generator)]
    assert logme_evidence(features, labels) > logme_evidence(features, shuffled)
