"""The gate, static, moe, mean and ensemble heads, and the LogME score."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from test_fusion import LABELS, N_TEST, fused, shared_task

from ssl_fusion.config import CONF_DIR
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


pytestmark = pytest.mark.usefixtures("one_thread")


def random_features(batch: int = 10) -> list[torch.Tensor]:
    return [torch.randn(batch, dim) for dim in DIMS]


def fit(features: dict[str, FeatureSet], cfg: FusionConfig) -> dict:
    """The head alone, without the screen (which would leave the noise pretexts out before it trains), with the
    labels of the shared results; it trains, and it is above 0.5 on the 2000 test samples: more than 30 standard
    errors (0.9 points) above chance, which needs the informative pretext (test_fusion's
    ``test_every_head_learns_from_the_informative_pretext_among_noise`` checks the YAML configs on the shared fits)."""
    result = fuse_once(features, dataclasses.replace(cfg, screen=False), LABELS, seed=0)
    assert result["final_loss"] < result["first_loss"]
    assert result["test_accuracy"] > 0.5, result["test_accuracy"]
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


def test_static_l1_learns_from_the_informative_pretext_and_weighs_it_more():
    """Both l1 weights start at 0.5 (``1 / pretexts``); trained with the screen off, the good pretext's ends higher
    (good 0.89, noise 0.63 at seed 0), and the head is above 0.5 (0.709; see ``fit``)."""
    weights = fit(shared_task(), StaticConfig(name="static", mode="l1"))["mean_pretext_weights"]
    assert weights["good"] > weights["noise"], weights


def test_gates_are_independent_per_sample_sigmoids():
    """Each gate is its own sigmoid: in (0, 1), different between samples (unlike static's weights), and not a
    softmax over pretexts (a sample's gates do not sum to 1). That the trained gates favour the good pretext is
    checked with every weighted head in test_fusion (a sign only: see there why no margin)."""
    torch.manual_seed(0)
    head = GateFusion(GateConfig(name="gate"), DIMS, num_classes=5).eval()
    gates = head.pretext_weights(random_features())
    assert gates.shape == (10, 3)
    assert ((gates > 0) & (gates < 1)).all()
    assert (gates.std(0) > 1e-3).all()  # per sample, unlike static
    assert ((gates.sum(1) - 1).abs() > 1e-3).all()


def test_static_softmax_weights_are_shared_and_learn_the_informative_pretext():
    """One set of weights for every sample: the same row for any batch, and, trained, the same mean weight over the
    test samples of every class. They start equal (zero logits: 1/3 each of three, 0.5 each of the task's two);
    trained with the screen off they give the good pretext more than 0.55 (0.652 at seed 0, 0.65-0.83 on seeds 0-4):
    a weight shared by every sample has no test-sampling error, so the margin only has to cover the seed."""
    head = StaticFusion(StaticConfig(name="static"), DIMS, num_classes=5)
    assert torch.equal(head.pretext_weights(random_features())[0], torch.full((3,), 1 / 3))
    torch.nn.init.normal_(head.raw)
    weights = head.pretext_weights(random_features())
    assert weights.shape == (10, 3)
    assert torch.equal(weights, weights[:1].expand(10, -1))
    assert head.regularization() == 0
    result = fused("static", screen=False)
    learned = result["mean_pretext_weights"]
    assert learned["good"] > 0.55, learned
    for per_class in result["pretext_weights_per_class"].values():
        assert per_class == pytest.approx(learned, abs=1e-6)


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


@pytest.mark.slow
def test_moe_routes_to_the_informative_pretext_among_three():
    """The good pretext comes last: the zero-initialised router's ties pick the first two, so an untrained router
    gives it gate 0 everywhere and only learned routing reaches it. Trained with the screen off, it gets more than
    half of the mean gate (0.600 at seed 0; 0.56-0.60 on seeds 0-2), more than both noise pretexts together."""
    base = shared_task()
    generator = torch.Generator().manual_seed(1)
    good = base["good"]
    train, test = torch.randn(len(good.train), 16, generator=generator), torch.randn(N_TEST, 16, generator=generator)
    noise2 = FeatureSet(train, test, good.train_labels, good.test_labels)
    features = {"noise": base["noise"], "noise2": noise2, "good": good}
    untrained = MoEFusion(MoEConfig(name="moe", top_k=2), [48, 16, 32], num_classes=5).eval()
    assert (untrained.pretext_weights([f.test for f in features.values()])[:, 2] == 0).all()
    weights = fit(features, MoEConfig(name="moe", top_k=2))["mean_pretext_weights"]
    assert weights["good"] > 0.5, weights


def test_ensemble_returns_log_of_mean_member_probabilities():
    head = EnsembleFusion(EnsembleConfig(name="ensemble"), DIMS, num_classes=5).eval()
    features = random_features()
    out = head(features)
    assert torch.allclose(out.exp().sum(1), torch.ones(10))
    members = torch.stack([F.softmax(c(f), dim=1) for c, f in zip(head.classifiers, features)]).mean(0)
    assert torch.allclose(out, members.log(), atol=1e-6)
    assert head.pretext_weights(features) is None


@pytest.mark.parametrize(
    "name, options, key",
    [
        ("moe", {"top_k": 0}, "fusion.top_k"),
        ("moe", {"top_k": 4}, "fusion.top_k"),  # more than the 3 pretexts: refused by the head, which knows them
        ("static", {"mode": "max"}, "fusion.mode"),
        ("static", {"weight_lr_scale": 0.0}, "fusion.weight_lr_scale"),
    ],
)
def test_bad_values_are_user_errors_naming_the_key(name, options, key):
    with pytest.raises(UserError, match=key):
        FUSIONS.get(name).impl(FUSIONS.get(name).config_cls(name=name, **options), DIMS, 5)


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
    features = 3 * F.one_hot(labels).float() @ torch.randn(3, d, generator=generator) + torch.randn(
        n, d, generator=generator
    )
    assert logme_evidence(features, labels) == pytest.approx(direct_logme(features, labels), abs=1e-4)


def test_logme_prefers_informative_features_to_random_ones():
    good = shared_task()["good"]
    random = torch.randn(good.train.shape, generator=torch.Generator().manual_seed(2))
    assert logme_evidence(good.train, good.train_labels) > logme_evidence(random, good.train_labels)


def test_logme_prefers_true_labels_to_shuffled_ones():
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(500) % 10
    features = F.one_hot(labels).float() @ torch.randn(10, 64, generator=generator) + 0.1 * torch.randn(
        500, 64, generator=generator
    )
    shuffled = labels[torch.randperm(500, generator=generator)]
    assert logme_evidence(features, labels) > logme_evidence(features, shuffled)
