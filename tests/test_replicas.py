"""Replicas (``<pretext>@<k>`` in ``pretexts``): the same recipe pretrained again with the seed encoder_seed +
``REPLICA_SEED_STRIDE`` k, a width control without diversity of pretext."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import sslfuse
from omegaconf import OmegaConf

from ssl_fusion.config import REPLICA_SEED_STRIDE, replica_seed
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import sources
from ssl_fusion.stages.declaration import StudyConfig, check_study
from ssl_fusion.store.files import MANIFEST

ALLOWED = r"a replica is <pretext>@<k>, k a positive integer, of a pretext \(.*\), pretrained with seed encoder_seed"


def test_a_replica_is_the_pretext_with_a_seed_a_stride_away():
    (plain, replica) = sources.feature_sources(OmegaConf.create({"pretexts": ["simclr", "simclr@2"]}))
    assert (plain.name, plain.pretext, plain.replica) == ("simclr", "simclr", 0)
    assert (replica.name, replica.pretext, replica.replica) == ("simclr@2", "simclr", 2)
    assert replica_seed(7, 2) == 7 + 2 * REPLICA_SEED_STRIDE == 2007


@pytest.mark.parametrize(
    "entry, message",
    [
        ("simclr@0", f"pretexts: 'simclr@0' is not a replica; {ALLOWED}"),
        ("simclr@x", f"pretexts: 'simclr@x' is not a replica; {ALLOWED}"),
        ("simclr@01", f"pretexts: 'simclr@01' is not a replica; {ALLOWED}"),
        ("simclr@", f"pretexts: 'simclr@' is not a replica; {ALLOWED}"),
        ("nope@1", f"pretexts: 'nope@1' is not a replica; {ALLOWED}"),
        ("r18@1", f"pretexts: 'r18@1' replicates 'r18', made elsewhere with no pretraining seed; {ALLOWED}"),
    ],
)
def test_a_bad_replica_is_refused_in_one_line_naming_pretexts(entry, message):
    node = {"pretexts": ["rotation", entry], "external": {"r18": {"arch": "torchvision:resnet18"}}}
    with pytest.raises(UserError, match=message) as refused:
        sources.feature_sources(OmegaConf.create(node))
    assert "\n" not in str(refused.value)


def test_a_study_accepts_replicas_and_refuses_a_bad_one():
    study = {
        "datasets": ["synthetic"],
        "pretexts": ["rotation", "rotation@1"],
        "controls": ["random", "random@1"],
        "encoder_seeds": [0],
        "label_seeds": [0],
        "regimes": [{"fraction": 0.01}],
        "heads": ["concat"],
        "claims": [
            {"method": "concat", "reference": "best-single", "regime": "1%", "direction": "greater", "margin": 0.0}
        ],
        "references": ["best-single"],
    }
    node = OmegaConf.merge(OmegaConf.structured(StudyConfig), study)
    assert check_study(node).main.pretexts == ["rotation", "rotation@1", "random", "random@1"]
    node.pretexts = ["rotation", "rotation@0"]
    with pytest.raises(UserError, match="study.pretexts: 'rotation@0' is not a replica"):
        check_study(node)


@pytest.mark.slow
def test_a_run_over_a_pretext_and_its_replica_fuses_two_encoders_the_replica_that_of_its_seed(tmp_path):
    """``run`` pretrains both (seeds 0 and 1000: two encoders with other weights), the result names both entries, and
    ``sslfuse pretrain`` with the replica's seed finds the replica's encoder stored under the same name; ``cache``
    names the command that makes a missing replica."""
    sslfuse(
        "run",
        "preset=smoke",
        "pretexts=[rotation,rotation@1]",
        "fusions=[concat]",
        "seeds=[0]",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    encoders = sorted((tmp_path / "outputs" / "artifacts" / "encoders").glob("rotation-*"))
    seeds = {json.loads((folder / MANIFEST).read_text())["config"]["seed"]: folder.name for folder in encoders}
    assert sorted(seeds) == [0, REPLICA_SEED_STRIDE]
    first, replica = (torch.load(folder / "encoder.pt", weights_only=True) for folder in encoders)
    assert any(not torch.equal(first[key], replica[key]) for key in first)
    (result,) = (tmp_path / "run" / "fuse").glob("*/seed0/results.json")
    assert json.loads(result.read_text())["pretexts"] == ["rotation", "rotation@1"]

    direct = sslfuse("pretrain", "preset=smoke", "pretext=rotation", f"seed={REPLICA_SEED_STRIDE}", cwd=tmp_path)
    assert f"encoder {seeds[REPLICA_SEED_STRIDE]} (reused)" in direct.stdout, direct.stdout
    missing = sslfuse("cache", "preset=smoke", "pretexts=[rotation,rotation@2]", cwd=tmp_path, check=False)
    assert missing.returncode == 2
    assert "make it with: sslfuse pretrain pretext=rotation seed=2000 preset=smoke" in missing.stderr, missing.stderr
