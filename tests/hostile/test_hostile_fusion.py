"""Hostile inputs to the fusion heads and their options: a diverging head, label ids that are not 0..K-1, arrays
that do not fit together, seeds out of range and option names with path characters. Each is refused in one line
(a UserError, or exit code 2 with one line on stderr and nothing written) or, for labels, gives the same task."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import sslfuse
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

from ssl_fusion.cli import group_choice_problem
from ssl_fusion.config import LabelsConfig, check_seeds, load_option
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.protocol import fuse_arrays, fuse_once
from ssl_fusion.runtime.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

BIG_SEED = 2**63
SEED_RANGE = r"must be an integer in \[-4294967295, 4294967295\]"
LABELS = LabelsConfig(fraction=0.1)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: the first 1,000 images to train on, the other 797 to test."""
    images, labels = load_digits(return_X_y=True)
    return images[:1000], labels[:1000], images[1000:], labels[1000:]


def one_line_refusal(proc) -> str:
    """The stderr line of a refused command, after checking that it is one line, exit code 2, no traceback."""
    line = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "\n" not in line and "Traceback" not in line, line
    return line


# Item 4: a diverging head stops, naming the head and the option to change.


@pytest.mark.parametrize("fusion", ["concat", "attention", "ensemble"])
def test_a_head_whose_loss_is_not_finite_stops_naming_the_head_and_fusion_lr(digits, fusion):
    train, labels, test, test_labels = digits
    with pytest.raises(UserError, match=rf"fusion head {fusion} diverged: .* lower fusion\.lr \(now 1e\+30\)"):
        fuse_arrays({"px": train}, labels, {"px": test}, test_labels, fusion, {"lr": 1e30}, fraction=0.1)


@pytest.mark.slow
def test_fuse_with_a_diverging_lr_exits_in_one_line_and_writes_no_result(smoke_workspace):
    proc = sslfuse(
        "fuse",
        "preset=smoke",
        "fusion=concat",
        "fusion.lr=1e30",
        "hydra.run.dir=diverged",
        cwd=smoke_workspace,
        check=False,
    )
    line = one_line_refusal(proc)
    assert "fusion head concat diverged" in line and "fusion.lr" in line
    assert not list((smoke_workspace / "diverged").glob("results.*"))


# Item 5: labels are encoded as scikit-learn does; what cannot be encoded is refused.


@pytest.mark.parametrize(
    "relabel",
    [
        pytest.param(lambda y: y + 5, id="shifted-by-5"),
        pytest.param(lambda y: y - 1, id="from-minus-1"),
        pytest.param(lambda y: np.array([f"digit {d}" for d in y]), id="strings"),
        pytest.param(lambda y: 10 * y.astype(float), id="sparse-floats"),
    ],
)
def test_any_label_ids_give_the_same_task_as_0_to_k_minus_1(digits, relabel):
    """Accuracy and macro-F1 are the same as with labels 0..9 (today labels + 5 make 15 classes of which 5 are
    never seen, and predictions land in them); ``classes`` lists the labels given, in sorted order."""
    train, labels, test, test_labels = digits
    plain = fuse_arrays({"px": train}, labels, {"px": test}, test_labels, "concat", fraction=0.1)
    renamed = fuse_arrays({"px": train}, relabel(labels), {"px": test}, relabel(test_labels), "concat", fraction=0.1)
    assert (renamed["test_accuracy"], renamed["test_macro_f1"]) == (plain["test_accuracy"], plain["test_macro_f1"])
    assert renamed["classes"] == sorted(set(relabel(labels).tolist()))
    assert plain["classes"] == list(range(10))


def test_the_per_class_pretext_weights_are_keyed_by_the_labels_given(digits):
    train, labels, test, test_labels = digits
    names = np.array(list("abcdefghij"))
    result = fuse_arrays(
        {"px": train, "half": train[:, :32]},
        names[labels],
        {"px": test, "half": test[:, :32]},
        names[test_labels],
        "attention",
        {"steps": 20, "eval_every": 10},
        fraction=0.05,
    )
    assert sorted(result["pretext_weights_per_class"]) == list("abcdefghij")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            lambda tr, y, te, yt: (tr, y, te[:, :10], yt),
            r"test features of 'px' have 10 columns, train features 64",
            id="width-mismatch",
        ),
        pytest.param(
            lambda tr, y, te, yt: (tr, y, te, np.where(yt == 3, 11, yt)),
            r"test labels hold classes never seen in train: 11",
            id="unseen-test-class",
        ),
        pytest.param(
            lambda tr, y, te, yt: (tr, y[:, None], te, yt), r"train_labels must be one label per row", id="labels-2d"
        ),
    ],
)
def test_arrays_that_do_not_fit_together_are_refused_in_one_line(digits, change, message):
    train, labels, test, test_labels = change(*digits)
    with pytest.raises(UserError, match=message) as refused:
        fuse_arrays({"px": train}, labels, {"px": test}, test_labels, "concat", fraction=0.1)
    assert "\n" not in str(refused.value)


def feature_sets(train_labels: torch.Tensor, test_labels: torch.Tensor) -> dict[str, FeatureSet]:
    generator = torch.Generator().manual_seed(0)
    return {
        "px": FeatureSet(
            torch.randn(len(train_labels), 8, generator=generator),
            torch.randn(len(test_labels), 8, generator=generator),
            train_labels,
            test_labels,
        )
    }


@pytest.mark.parametrize(
    ("train_labels", "test_labels", "message"),
    [
        pytest.param(
            torch.arange(200) % 4 - 1, torch.arange(40) % 4 - 1, r"class ids must be >= 0, got -1", id="negative"
        ),
        pytest.param(
            torch.arange(200) % 4,
            torch.arange(40) % 5,
            r"test labels hold classes never seen in train: 4",
            id="unseen-test-class",
        ),
    ],
)
def test_the_stage_path_refuses_label_ids_it_cannot_use_as_class_indices(train_labels, test_labels, message):
    """``fuse_once`` reads labels as class indices (the datasets give 0..K-1): others are refused before any fit."""
    with pytest.raises(UserError, match=message):
        fuse_once(feature_sets(train_labels, test_labels), load_option(FUSIONS, "concat"), LABELS, 0)


def test_fuse_once_names_the_classes_by_their_ids_unless_given_names():
    labels = torch.arange(200) % 4
    cfg = dataclasses.replace(load_option(FUSIONS, "concat"), steps=20, eval_every=10)
    assert fuse_once(feature_sets(labels, labels[:40]), cfg, LABELS, 0)["classes"] == ["0", "1", "2", "3"]
    named = fuse_once(feature_sets(labels, labels[:40]), cfg, LABELS, 0, classes=["cat", "dog", "owl", "emu"])
    assert named["classes"] == ["cat", "dog", "owl", "emu"]


# Item 12: seeds out of range and option names with path characters.


@pytest.mark.parametrize("seed", [BIG_SEED, -BIG_SEED - 1, 2**32])
def test_fuse_arrays_refuses_a_seed_out_of_range(digits, seed):
    train, labels, test, test_labels = digits
    with pytest.raises(UserError, match=rf"seed {SEED_RANGE}, got {seed}"):
        fuse_arrays({"px": train}, labels, {"px": test}, test_labels, "concat", seed=seed)


SEEDS_OUT_OF_RANGE = [
    ("fuse", "seed", BIG_SEED),
    ("pretrain", "seed", -BIG_SEED - 1),
    ("cache", "encoder_seed", BIG_SEED),
    ("run", "seeds", [0, BIG_SEED]),
    ("run", "encoder_seeds", [BIG_SEED]),
]


@pytest.mark.parametrize(("stage", "key", "value"), SEEDS_OUT_OF_RANGE)
def test_every_seed_key_is_checked_before_any_work(stage, key, value):
    with pytest.raises(UserError, match=rf"{key} {SEED_RANGE}, got -?92233720368547758"):
        check_seeds(OmegaConf.create({"seed": 0, "encoder_seed": 0, key: value}))


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "key", "value"), SEEDS_OUT_OF_RANGE)
def test_a_seed_out_of_range_is_refused_in_one_line(tmp_path, stage, key, value):
    override = f"{key}={value}".replace(" ", "")
    line = one_line_refusal(sslfuse(stage, "preset=smoke", override, "hydra.run.dir=out", cwd=tmp_path, check=False))
    assert f"{key} must be an integer in [-4294967295, 4294967295]" in line
    assert not (tmp_path / "outputs").exists()


OPTION_PATHS = [
    ("pretrain", "pretext=../preset/smoke", "rotation"),
    ("fuse", "fusion=/etc/passwd", "concat"),
    ("run", "dataset=../pretext/rotation", "fashion_mnist"),
    ("cache", "encoder=..\\encoder\\small_cnn", "small_cnn"),
    ("pretrain", "preset=../fusion/concat", "smoke"),
]


@pytest.mark.parametrize(("stage", "override", "valid"), OPTION_PATHS)
def test_an_option_name_with_path_characters_is_found_listing_the_valid_ones(stage, override, valid):
    group, _, name = override.partition("=")
    problem = group_choice_problem(["preset=smoke", override])
    assert f"{group}={name} is not a plain name" in problem and valid in problem
    assert group_choice_problem(["preset=smoke", f"{group}={valid}", "pretexts=[rotation]"]) is None


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "override", "valid"), OPTION_PATHS)
def test_an_option_name_with_path_characters_is_refused_in_one_line(tmp_path, stage, override, valid):
    line = one_line_refusal(sslfuse(stage, override, cwd=tmp_path, check=False))
    group, _, name = override.partition("=")
    assert f"{group}={name} is not a plain name" in line and valid in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_swept_option_name_with_path_characters_is_refused(tmp_path):
    line = one_line_refusal(
        sslfuse("pretrain", "-m", "preset=smoke", "pretext=rotation,../preset/smoke", cwd=tmp_path, check=False)
    )
    assert "pretext=../preset/smoke is not a plain name" in line
