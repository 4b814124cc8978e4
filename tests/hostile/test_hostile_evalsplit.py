"""Hostile inputs to the evaluation split: a split that does not exist, a dev fraction out of range or so large that
it empties a class, a dev seed out of range, a published label split that labels dev images. Each is refused in one
line naming the key (or file) and what is allowed, before any work, writing no result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import sslfuse
from omegaconf import OmegaConf

from ssl_fusion.config import LabelsConfig
from ssl_fusion.data.splits import EvaluationConfig
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.fuse import check_evaluation

SMOKE_TRAIN_LABELS = torch.arange(1024) % 4  # preset=smoke: synthetic, 1024 training images of 4 classes in turn

BAD_KEYS = [
    ("evaluation.split=val", "evaluation.split: 'val' is not one of test, dev"),
    ("evaluation.dev_fraction=0", "evaluation.dev_fraction must be in (0, 1), got 0.0"),
    ("evaluation.dev_fraction=1.5", "evaluation.dev_fraction must be in (0, 1), got 1.5"),
    ("evaluation.dev_seed=99999999999", "evaluation.dev_seed must be an integer in [-4294967295, 4294967295]"),
]


@pytest.mark.parametrize(("override", "message"), BAD_KEYS)
def test_an_evaluation_key_out_of_range_is_refused_naming_it(override, message):
    key, _, value = override.partition("=")
    node = OmegaConf.merge(OmegaConf.structured(EvaluationConfig), OmegaConf.from_dotlist([f"{key[11:]}={value}"]))
    with pytest.raises(UserError) as refusal:
        check_evaluation(node)
    assert message in str(refusal.value)


def indices_file(folder: Path, dev_image: bool) -> Path:
    """A published split of the smoke data: ten images of each class outside the dev part, plus one dev image."""
    dev = EvaluationConfig(split="dev").dev_rows(SMOKE_TRAIN_LABELS)
    keep = torch.ones(len(SMOKE_TRAIN_LABELS), dtype=torch.bool)
    keep[dev] = False
    chosen = torch.nonzero(keep).flatten()[:40].tolist() + ([int(dev[0])] if dev_image else [])
    path = folder / "idx.txt"
    path.write_text("\n".join(map(str, chosen)) + "\n")
    return path


REFUSED = [
    *BAD_KEYS,
    (
        "evaluation.split=dev evaluation.dev_fraction=0.999",
        "evaluation.dev_fraction=0.999 leaves class 0 no training image outside the dev split",
    ),
    ("evaluation.split=dev labels.indices_file=IDX", "lies in the dev split"),
]


def one_line_refusal(proc) -> str:
    line = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "\n" not in line and "Traceback" not in line, line
    return line


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["fuse", "run"])
@pytest.mark.parametrize(("overrides", "message"), REFUSED)
def test_fuse_and_run_refuse_in_one_line_before_any_work(tmp_path, stage, overrides, message):
    idx = indices_file(tmp_path, dev_image=True)
    args = [o.replace("IDX", str(idx)) for o in overrides.split()]
    proc = sslfuse(
        stage,
        "preset=smoke",
        *(["fusion=concat"] if stage == "fuse" else ["fusions=[concat]"]),
        *args,
        "hydra.run.dir=out",
        cwd=tmp_path,
        check=False,
    )
    line = one_line_refusal(proc)
    assert message in line, line
    if "IDX" in overrides:
        assert str(idx) in line
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("predictions.npz"))
    assert not (tmp_path / "outputs" / "artifacts").exists()  # nothing pretrained or cached


def test_an_indices_file_that_avoids_the_dev_split_passes_the_check(tmp_path):
    labels_cfg = LabelsConfig(indices_file=str(indices_file(tmp_path, dev_image=False)))
    assert len(EvaluationConfig(split="dev").labeled(labels_cfg, SMOKE_TRAIN_LABELS, seed=0)) == 40
    with pytest.raises(UserError, match="lies in the dev split"):
        EvaluationConfig(split="dev").labeled(
            LabelsConfig(indices_file=str(indices_file(tmp_path, dev_image=True))), SMOKE_TRAIN_LABELS, seed=0
        )
