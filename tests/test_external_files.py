"""Encoders declared once, in a file ``external/<name>.yaml`` found on Hydra's search path (the package's
``conf/external/``, a user's ``--config-dir``): listed by name in ``pretexts`` on every stage, the same encoder as
the one the ``+external.<name>.*`` keys declare, command-line keys over the file's, bad files refused in one line."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from conftest import REPO, sslfuse
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from ssl_fusion.cli import composition_problem
from ssl_fusion.config import CONF_DIR, check_external, external_files
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import sources
from ssl_fusion.stages import study as _  # noqa: F401 (registers the study stage's schema, as the CLI does)

SMALL = ["preset=smoke", "dataset.n_train=64", "dataset.n_test=32", "precision=fp32"]
FUSE = ["fusion=concat", "labels.per_class=5"]


def declare(folder: Path, name: str, keys: dict) -> Path:
    """``<folder>/external/<name>.yaml`` holding ``keys``; the folder, to give as ``--config-dir``."""
    (folder / "external").mkdir(parents=True, exist_ok=True)
    (folder / "external" / f"{name}.yaml").write_text(yaml.safe_dump(keys))
    return folder


def as_keys(name: str, keys: dict) -> list[str]:
    """The same declaration as ``+external.<name>.<key>=<value>`` overrides."""
    return [f"+external.{name}.{key}={value}" for key, value in keys.items()]


def features_named(printed: str, name: str) -> list[str]:
    """The features artifacts a ``sslfuse cache`` run printed for ``name``, each with what it did."""
    return [line.split(": ")[0] for line in printed.splitlines() if line.startswith(f"features {name}-")]


def result(folder: Path) -> tuple[dict, list]:
    """A fuse's ``results.json`` without its timing, and its predicted classes."""
    record = json.loads((folder / "results.json").read_text())
    predicted = np.load(folder / "predictions.npz")["predicted"].tolist()
    return {key: value for key, value in record.items() if not key.endswith("_seconds")}, predicted


@pytest.mark.slow
def test_a_declared_encoder_is_the_same_encoder_as_its_keys_on_cache_fuse_and_run(tmp_path):
    """Paired: a checkpoint declared in ``mine/external/r18.yaml`` and listed by name only, then the same keys on the
    command line. The keys find the features the file cached (with the command fuse suggests: the same key, reused),
    and a fuse of each gives the same result; ``run`` finds the file too. A key on the command line replaces the
    file's: another size, another key."""
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    keys = {"arch": "torchvision:resnet18", "checkpoint": str(tmp_path / "r18.pth"), "image_size": 32}
    mine = ["--config-dir", str(declare(tmp_path / "mine", "r18", keys))]

    uncached = sslfuse("fuse", *SMALL, "pretexts=[r18]", *FUSE, *mine, cwd=tmp_path, check=False).stderr
    suggested = shlex.split(uncached.partition("make them with: ")[2])  # the command names the user's folder
    assert suggested[:2] == ["sslfuse", "cache"] and suggested[-1] == f"--config-dir={tmp_path / 'mine'}"
    by_file = sslfuse(*suggested[1:], cwd=tmp_path).stdout
    by_keys = sslfuse("cache", *SMALL, "pretexts=[r18]", *as_keys("r18", keys), "hydra.run.dir=c2", cwd=tmp_path)
    (computed,) = features_named(by_file, "r18")
    assert computed.endswith("(computed)")
    assert features_named(by_keys.stdout, "r18") == [computed.replace("(computed)", "(reused)")]

    sslfuse("fuse", *SMALL, "pretexts=[r18]", *FUSE, "hydra.run.dir=f1", *mine, cwd=tmp_path)
    sslfuse("fuse", *SMALL, "pretexts=[r18]", *FUSE, *as_keys("r18", keys), "hydra.run.dir=f2", cwd=tmp_path)
    assert result(tmp_path / "f1") == result(tmp_path / "f2")
    assert result(tmp_path / "f1")[0]["method"] == "concat(r18)"

    ran = sslfuse(
        "run", *SMALL, "pretexts=[r18]", "fusions=[concat]", "seeds=[0]", "hydra.run.dir=r", *mine, cwd=tmp_path
    )
    assert "r18: external encoder, features reused" in ran.stdout

    resized = sslfuse(
        "cache", *SMALL, "pretexts=[r18]", "+external.r18.image_size=24", "hydra.run.dir=c3", *mine, cwd=tmp_path
    ).stdout
    (other,) = features_named(resized, "r18")
    assert other.endswith("(computed)") and other.split()[1] != computed.split()[1]
    manifest = json.loads((tmp_path / "outputs/artifacts/features" / other.split()[1] / "manifest.json").read_text())
    assert manifest["config"]["external"]["conversion"]["size"] == "28x28 -> 24x24"


@pytest.mark.slow
def test_the_packaged_random_resnet18_caches_offline(tmp_path):
    """``conf/external/resnet18_random.yaml``: torchvision's ResNet-18 with random weights, nothing downloaded."""
    printed = sslfuse("cache", *SMALL, "pretexts=[resnet18_random]", "hydra.run.dir=c", cwd=tmp_path).stdout
    (line,) = features_named(printed, "resnet18_random")
    manifest = tmp_path / "outputs/artifacts/features" / line.split()[1] / "manifest.json"
    assert json.loads(manifest.read_text())["config"]["external"]["format"] == "random weights"


@pytest.fixture
def search_path(tmp_path):
    """Hydra initialised over a folder of external encoder files (as a stage is over ``conf/`` and ``--config-dir``)."""
    declare(tmp_path, "good", {"arch": "torchvision:resnet18", "image_size": 32})
    declare(tmp_path, "misspelled", {"arch": "torchvision:resnet18", "size": 32})
    declare(tmp_path, "headless", {"checkpoint": None, "image_size": 32})
    declare(tmp_path, "rotation", {"arch": "torchvision:resnet18"})
    (tmp_path / "external" / "unclosed.yaml").write_text("arch: [torchvision:resnet18\n")
    with initialize_config_dir(version_base="1.3", config_dir=str(tmp_path)):
        yield tmp_path


def test_files_declare_the_encoders_pretexts_names_and_keys_replace_their_keys(search_path):
    assert external_files() == ["good", "headless", "misspelled", "rotation", "unclosed"]
    declared = check_external({}, PRETEXTS, ["good", "simclr"])
    assert list(declared) == ["good"] and declared["good"].image_size == 32
    assert check_external({"good": {"image_size": 24}}, PRETEXTS)["good"].image_size == 24
    assert check_external({}, PRETEXTS, ["simclr"]) == {}  # a file not listed is not read


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["misspelled"], r"^external/misspelled\.yaml: external\.misspelled\.size: not a key of an external encoder"),
        (["headless"], r"^external/headless\.yaml: external\.headless: give external\.headless\.arch"),
        (["rotation"], r"^'rotation' is a built-in pretext and the name of the file external/rotation\.yaml"),
        (["unclosed"], r"^external/unclosed\.yaml: while parsing a flow sequence .* line 2"),
    ],
)
def test_a_bad_file_is_refused_in_one_line_naming_it_and_the_key(search_path, names, message):
    with pytest.raises(UserError, match=message) as refused:
        check_external({}, PRETEXTS, names)
    assert "\n" not in str(refused.value)


def test_an_unknown_name_is_refused_listing_the_files_found(search_path):
    config = OmegaConf.create({"pretexts": ["god"], "external": {}, "imported": {}})
    with pytest.raises(
        UserError,
        match=r"unknown pretext 'god' in pretexts; .*; external files \(external/<name>\.yaml\): good, headless",
    ):
        sources.feature_sources(config)


def test_a_bad_file_stops_the_stage_in_one_line(tmp_path):
    mine = declare(tmp_path / "mine", "r18", {"arch": "torchvision:resnet18", "size": 32})
    refused = sslfuse("cache", *SMALL, "pretexts=[r18]", "--config-dir", str(mine), cwd=tmp_path, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "external/r18.yaml: external.r18.size: not a key of an external encoder" in refused.stderr


@pytest.mark.slow
def test_a_study_lists_declared_encoders_by_name_and_its_runs_find_them(tmp_path):
    """A study in the user's folder over an encoder declared there and the packaged random ResNet-18, by name only:
    its run jobs (started without the folder) get each file's keys, cache both and fuse them."""
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    mine = declare(tmp_path / "mine", "r18", {"arch": "torchvision:resnet18", "checkpoint": str(tmp_path / "r18.pth")})
    study = {
        "datasets": ["synthetic"],
        "pretexts": ["r18", "resnet18_random"],
        "encoder_seeds": [0],
        "label_seeds": [0, 1],
        "regimes": [{"per_class": 5}],
        "heads": ["concat"],
        "references": ["best-single"],
        "claims": [
            {"method": "concat", "reference": "best-single", "regime": "5/class", "direction": "greater", "margin": 0}
        ],
        "overrides": SMALL,
    }
    (mine / "study").mkdir()
    (mine / "study" / "declared.yaml").write_text(yaml.safe_dump(study))
    printed = sslfuse("study", "study=declared", "hydra.run.dir=s", "--config-dir", str(mine), cwd=tmp_path).stdout
    assert "r18: external encoder, features cached" in printed
    assert "resnet18_random: external encoder, features cached" in printed
    results = [json.loads(path.read_text()) for path in (tmp_path / "outputs/studies/declared").rglob("results.json")]
    assert sorted({result["method"] for result in results}) == [
        "concat(r18+resnet18_random)",
        "single(r18)",
        "single(resnet18_random)",
    ]
    assert "claim 1: concat" in printed


@pytest.mark.slow
def test_the_file_example_of_the_own_encoders_page_caches(tmp_path):
    """docs/own_encoders.md's file, written where its first line says, and its first command, run with a stand-in
    checkpoint of the same architecture (random weights) and a small size given as keys that replace the file's."""
    page = (REPO / "docs" / "own_encoders.md").read_text()
    example = re.search(r"```yaml\n# (?P<path>\S+)\n(?P<keys>.*?)```", page, re.S)
    command = shlex.split(re.search(r"```bash\n(sslfuse cache [^\n]*--config-dir[^\n]*)\n", page)[1])
    path = tmp_path / example["path"]
    path.parent.mkdir(parents=True)
    path.write_text(example["keys"])
    name = path.stem
    model = getattr(torchvision.models, yaml.safe_load(example["keys"])["arch"].partition(":")[2])()
    torch.save(model.state_dict(), tmp_path / "standin.pth")
    stand_in = [f"+external.{name}.checkpoint={tmp_path / 'standin.pth'}", f"+external.{name}.image_size=32"]
    printed = sslfuse(command[1], *SMALL, *stand_in, *command[2:], cwd=tmp_path).stdout
    assert len(features_named(printed, name)) == 1


def test_the_packaged_files_are_valid_declarations():
    """Every file of ``conf/external/`` passes the checks a stage makes when it reads one (the hub examples' weights
    are checked against the libraries' own lists, offline)."""
    pytest.importorskip("timm")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        names = external_files()
        declared = check_external({}, PRETEXTS, names)
    assert names == ["dinov2_vits14", "resnet18_random", "resnet50_imagenet"] and list(declared) == names
    assert declared["dinov2_vits14"].pretrained and declared["resnet50_imagenet"].weights == "IMAGENET1K_V2"
    assert declared["resnet18_random"].checkpoint is None and not declared["resnet18_random"].pretrained


def test_the_clis_check_composes_with_the_users_folders(tmp_path):
    """The one-line check before a stage starts composes with ``--config-dir`` and ``hydra.searchpath``: a study in
    the user's folder composes, and a misspelled key is still refused in one line there."""
    (tmp_path / "mine" / "study").mkdir(parents=True)
    (tmp_path / "mine" / "study" / "mine_only.yaml").write_text("datasets: [synthetic]\n")
    folder = str(tmp_path / "mine")
    assert "study/mine_only" in composition_problem("study", ["study=mine_only"])
    assert composition_problem("study", ["study=mine_only", "--config-dir", folder]) is None
    assert composition_problem("study", [f"--config-dir={folder}", "study=mine_only"]) is None
    assert composition_problem("study", ["study=mine_only", f"hydra.searchpath=[file://{folder}]"]) is None
    misspelled = composition_problem("study", ["study=mine_only", "amnd=x", "--config-dir", folder])
    assert "amnd" in misspelled and "\n" not in misspelled
    assert composition_problem("study", ["study=mine_only", "--config-dir", str(tmp_path / "absent")]) == (
        f"--config-dir: no folder '{tmp_path / 'absent'}'"
    )
