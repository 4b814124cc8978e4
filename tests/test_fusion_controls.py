"""The controls of the attention head: ``attention scorer=uniform`` (attention without attention), ``concat
pretext_dropout`` (its dropout without attention) and the plain reference ``logreg_cv``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from test_fusion import shared_task

from ssl_fusion.config import CONF_DIR, LabelsConfig, load_option
from ssl_fusion.data.splits import stratified_folds
from ssl_fusion.evaluation.reference import concatenated
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.attention import AttentionConfig, AttentionFusion
from ssl_fusion.fusion.concat import ConcatConfig, ConcatFusion
from ssl_fusion.fusion.logreg_cv import fold_splits
from ssl_fusion.fusion.protocol import fuse_result, method_title
from ssl_fusion.fusion.training import HeadStack
from ssl_fusion.runtime.errors import UserError

DIMS = [32, 48, 16]

pytestmark = pytest.mark.usefixtures("one_thread")


def random_features(batch: int = 64) -> list[torch.Tensor]:
    return [torch.randn(batch, dim) for dim in DIMS]


def uniform_attention(dropout: float) -> AttentionFusion:
    return AttentionFusion(AttentionConfig(name="attention", scorer="uniform", pretext_dropout=dropout), DIMS, 5)


def concat_like(attention: AttentionFusion, dropout: float) -> ConcatFusion:
    """A ``concat`` head with ``attention``'s per-pretext classifiers side by side and its bias."""
    concat = ConcatFusion(ConcatConfig(name="concat", pretext_dropout=dropout), DIMS, 5)
    with torch.no_grad():
        concat.classifier.weight.copy_(torch.cat([c.weight for c in attention.classifiers], dim=1))
        concat.classifier.bias.copy_(attention.bias)
    return concat


@pytest.mark.parametrize("yaml", ["concat", "attention", "logreg_cv"])
def test_yaml_lists_every_field_with_its_default(yaml):
    config_cls = FUSIONS.get(yaml).config_cls
    defaults = OmegaConf.to_container(OmegaConf.structured(config_cls(name=yaml)))
    assert OmegaConf.to_container(OmegaConf.load(CONF_DIR / "fusion" / f"{yaml}.yaml")) == defaults


def test_uniform_attention_trains_no_scorer_and_its_weights_are_exactly_uniform_at_eval():
    """No scorer parameter: exactly concat's parameter count (the learned scorer adds one score per pretext and
    feature). At eval the weights are 1/P exactly; in training each sample's are 1/kept on the pretexts it kept."""
    torch.manual_seed(0)
    head = uniform_attention(0.5)
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in concat_like(head, 0.5).parameters())
    assert not any("scorer" in name for name, _ in head.named_parameters())
    torch.nn.init.normal_(head.classifiers[0].weight)
    features = random_features()
    assert torch.equal(head.eval().pretext_weights(features), torch.full((64, 3), 1 / 3))
    weights = head.train().pretext_weights(features)
    kept = weights > 0
    assert kept.any(1).all() and not kept.all()  # never all dropped; at p = 0.5 some are
    assert torch.allclose(weights, kept.float() / kept.sum(1, keepdim=True), atol=0, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_concat_with_pretext_dropout_has_the_logits_of_uniform_attention(dropout):
    """Known truth, by construction: with the same per-pretext weights and bias, ``concat``'s rescaled blocks give
    ``P · Σ_p (1/kept) z_p + b`` over the kept pretexts, attention's logits with uniform weights, for the same
    random state (both draw the mask with ``dropped_pretexts``); and both ``Σ_p z_p + b`` at eval."""
    torch.manual_seed(0)
    attention = uniform_attention(dropout)
    for classify in attention.classifiers:
        torch.nn.init.normal_(classify.weight)
    torch.nn.init.normal_(attention.bias)
    concat = concat_like(attention, dropout)
    features = random_features()
    torch.manual_seed(1)
    trained_attention = attention.train()(features)
    torch.manual_seed(1)
    trained_concat = concat.train()(features)
    assert torch.allclose(trained_attention, trained_concat, atol=1e-5)
    assert torch.allclose(attention.eval()(features), concat.eval()(features), atol=1e-5)
    if dropout:
        assert not torch.allclose(trained_concat, concat(features), atol=1e-3)  # the dropout acts in training


def test_concat_trains_on_its_stacked_path_with_pretext_dropout():
    """The stack's fast path (``stacked_logits``, one matrix product over the members) gives each member the
    logits of its own ``forward`` under the same random state: one mask, shared by the members."""
    torch.manual_seed(0)
    heads = [ConcatFusion(ConcatConfig(name="concat", pretext_dropout=0.5), DIMS, 5) for _ in range(3)]
    for head in heads:
        torch.nn.init.normal_(head.classifier.weight)
    stack, features = HeadStack(heads), random_features()
    torch.manual_seed(2)
    direct = stack.template.head.stacked_logits(
        {name.removeprefix("head."): p for name, p in stack.params.items()}, features
    )
    assert direct is not None
    for member, head in enumerate(heads):
        torch.manual_seed(2)
        assert torch.allclose(direct[member], head.train()(features), atol=1e-5)


def test_uniform_attention_and_concat_with_the_same_pretext_dropout_predict_alike():
    """Paired comparison on the shared task (2000 test samples), the protocol run end to end. The two are one
    function class with one objective: the same weights (attention's per-pretext classifiers are concat's blocks),
    an unpenalised bias in both, the same L2 on the same weights, the same zero start, Adam, and the same masks from
    the same random state. They differ only in the order of floating-point sums, so they choose the same setting
    and agree on every test prediction (measured: all 2000, p = 0.5 and 0.3 at seed 1); the bound allows 10 samples
    (0.5%) to flip at near ties."""
    results = {}
    for name, options in (("attention", {"scorer": "uniform"}), ("concat", {})):
        cfg = dataclasses.replace(load_option(FUSIONS, name), screen=False, pretext_dropout=0.5, **options)
        results[name] = fuse_result(shared_task(), cfg, LabelsConfig(fraction=0.05), seed=1)
    attention, concat = results["attention"], results["concat"]
    assert attention.selection["selected_l2"] == concat.selection["selected_l2"]
    assert attention.selection["selected_steps"] == concat.selection["selected_steps"]
    agree = (attention.predictions.predicted == concat.predictions.predicted).mean()
    assert agree >= 0.995, agree
    assert abs(attention.accuracy - concat.accuracy) <= 0.005


def test_titles_show_the_changed_options_and_defaults_change_nothing():
    features = shared_task()
    assert method_title(load_option(FUSIONS, "concat"), features) == "concat"
    assert method_title(load_option(FUSIONS, "attention"), features) == "attention"
    assert method_title(ConcatConfig(name="concat", pretext_dropout=0.5), features) == "concat[pretext_dropout=0.5]"
    uniform = dataclasses.replace(load_option(FUSIONS, "attention"), scorer="uniform")
    assert method_title(uniform, features) == "attention[scorer=uniform]"
    assert method_title(load_option(FUSIONS, "logreg_cv"), features) == "logreg_cv"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-learn's notices of later defaults
@pytest.mark.parametrize("per_class", [10, 1])
def test_logreg_cv_predicts_as_scikit_learn_called_directly(per_class):
    """Known truth: scikit-learn's own ``LogisticRegressionCV`` on the same standardised, concatenated arrays with
    the heads' folds (seed 0) predicts every test sample alike, and its C is the one recorded. With one labeled
    image a class nothing is held out: ``LogisticRegression`` at the grid's smallest C, as recorded."""
    features = shared_task()
    cfg = load_option(FUSIONS, "logreg_cv")
    labels_cfg = LabelsConfig(fraction=None, per_class=per_class)
    result = fuse_result(features, cfg, labels_cfg, seed=0)
    train, labels, test = concatenated(list(features.values()), labels_cfg.subset(features["good"].train_labels, 0))
    if per_class == 1:
        model = LogisticRegression(C=min(cfg.c_grid), max_iter=cfg.max_iter).fit(train.numpy(), labels.numpy())
        assert result.selection["folds"] == 0 and result.selection["selected_c"] == min(cfg.c_grid)
    else:
        splits = fold_splits(stratified_folds(labels, cfg.folds, 0), 1)
        model = LogisticRegressionCV(Cs=cfg.c_grid, cv=splits, scoring="accuracy", max_iter=cfg.max_iter)
        model.fit(train.numpy(), labels.numpy())
        assert result.selection["folds"] == 5 and result.selection["selected_c"] == model.C_[0]
        assert result.selection["selected_l2"] == pytest.approx(1 / (2 * model.C_[0] * len(labels)))
    assert (result.predictions.predicted == model.predict(test.numpy())).all()
    assert result.accuracy == pytest.approx(model.score(test.numpy(), features["good"].test_labels.numpy()))
    assert result.pretexts == ["good", "noise"] and result.family == "logreg_cv" and not result.uses_test


def test_logreg_cv_holds_out_every_view_of_a_fold_and_scores_its_plain_images():
    fold_of = torch.tensor([0, 1, 0, 1])
    (train0, held0), (train1, held1) = fold_splits(fold_of, views=2)
    assert held0.tolist() == [0, 2] and train0.tolist() == [1, 3, 5, 7]
    assert held1.tolist() == [1, 3] and train1.tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize(
    "options, key",
    [({"c_grid": [0.0, 1.0]}, "fusion.c_grid"), ({"max_iter": 0}, "fusion.max_iter"), ({"folds": 1}, "fusion.folds")],
)
def test_a_bad_logreg_cv_option_fails_in_one_line_naming_the_key(options, key):
    with pytest.raises(UserError) as refused:
        FUSIONS.typed_config({"name": "logreg_cv", **options}, key="fusion")
    assert str(refused.value).startswith(key) and "\n" not in str(refused.value)


def test_a_bad_scorer_or_pretext_dropout_fails_naming_the_key():
    with pytest.raises(UserError, match=r"^fusion\.scorer: 'learnt' is not one of learned, uniform$"):
        FUSIONS.typed_config({"name": "attention", "scorer": "learnt"}, key="fusion")
    with pytest.raises(UserError, match=r"^fusion\.pretext_dropout must be in \[0, 1\)"):
        FUSIONS.typed_config({"name": "concat", "pretext_dropout": 1.0}, key="fusion")
