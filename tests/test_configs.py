"""Every config in conf/ composes, and every option's YAML matches its typed schema."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ssl_fusion.config import CONF_DIR, load_option
from ssl_fusion.data.datasets import DATASETS
from ssl_fusion.models.encoders import ENCODERS
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.tracking import TRACKERS
from ssl_fusion.stages import register_schemas  # noqa: F401  (registers the stage schemas)
from ssl_fusion.stages.methods import METHODS

REGISTRIES = {"dataset": DATASETS, "encoder": ENCODERS, "pretext": PRETEXTS, "fusion": METHODS, "tracking": TRACKERS}
STAGES = ["pretrain", "cache", "fuse", "run"]


def compose_stage(stage: str, overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name=stage, overrides=overrides)


@pytest.mark.parametrize("group", sorted(REGISTRIES))
def test_each_option_has_a_yaml_and_each_yaml_an_option(group):
    yamls = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert yamls == REGISTRIES[group].names()
    for name in yamls:
        typed = REGISTRIES[group].typed_config(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
        assert typed.name == name


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("preset", [None, "smoke", "full"])
def test_stage_configs_compose(stage, preset):
    cfg = compose_stage(stage, [f"preset={preset}"] if preset else [])
    assert cfg.dataset.name == ("synthetic" if preset == "smoke" else "fashion_mnist")
    assert cfg.artifacts_dir == "outputs/artifacts"


@pytest.mark.parametrize("group", ["dataset", "encoder"])
def test_every_dataset_and_encoder_composes_in_run(group):
    for name in REGISTRIES[group].names():
        cfg = compose_stage("run", [f"{group}={name}"])
        assert REGISTRIES[group].typed_config(cfg[group]).name == name


def test_every_pretext_and_fusion_composes_in_its_stage():
    for name in PRETEXTS.names():
        assert compose_stage("pretrain", [f"pretext={name}"]).pretext.name == name
    for name in METHODS.names():
        assert compose_stage("fuse", [f"fusion={name}"]).fusion.name == name


def test_typo_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_stage("fuse", ["labels.fractoin=0.1"])
    with pytest.raises(ConfigCompositionException):
        compose_stage("fuse", ["seed=abc"])


def test_option_schema_rejects_wrong_type_with_the_key():
    with pytest.raises(UserError, match=r"pretext.temperature"):
        PRETEXTS.typed_config({"name": "simclr", "temperature": "warm"})
    with pytest.raises(UserError, match="unknown fusion 'attn'.*attention"):
        load_option(METHODS, "attn")


def test_train_overrides_change_the_recipe():
    from ssl_fusion.config import TrainOverrides
    from ssl_fusion.store.artifacts import pretext_recipe

    base = pretext_recipe("simclr", TrainOverrides())
    assert pretext_recipe("simclr", TrainOverrides(epochs_scale=4.0)).epochs == 4 * base.epochs
    assert pretext_recipe("simclr", TrainOverrides(epochs=1, epochs_scale=4.0)).epochs == 1
    assert pretext_recipe("simclr", TrainOverrides(batch_size=32)).batch_size == 32


def test_a_method_entry_with_options_is_its_yaml_with_those_values_and_is_titled_as_written():
    """``attention[scorer_hidden=8,screen=false]`` is attention's YAML with two values replaced, YAML-typed; a table
    titles the result with those options, and that title read back as an entry is the same head."""
    from ssl_fusion.fusion.protocol import method_title
    from ssl_fusion.stages.run import planned_heads

    default = load_option(METHODS, "attention")
    (fusion, used), *_ = planned_heads(["attention[scorer_hidden=8,screen=false]"], ["rotation", "simclr"])
    assert (fusion.scorer_hidden, fusion.screen) == (8, False)
    assert {k: v for k, v in vars(fusion).items() if k not in ("scorer_hidden", "screen")} == {
        k: v for k, v in vars(default).items() if k not in ("scorer_hidden", "screen")
    }
    assert used == ["rotation", "simclr"]
    title = method_title(fusion, {"rotation": _Views(), "simclr": _Views()})
    assert title == "attention[screen=False,scorer_hidden=8]"
    assert planned_heads([title], ["rotation", "simclr"])[0][0] == fusion  # the title, as an entry, is the same head


class _Views:
    train_views = None


@pytest.mark.parametrize(
    ("entry", "names"),
    [
        ("attention[nope=1]", "'nope' is not an option"),
        ("attention[temperature=0]", "fusion.temperature"),
        ("attention[scorer_hidden]", "is not <option>=<value>"),
        ("attention[[x]]", "<name>[<option>=<value>,...]"),
    ],
)
def test_a_bad_method_entry_is_refused_in_one_line_naming_the_option(entry, names):
    from ssl_fusion.stages.run import planned_heads

    with pytest.raises(UserError, match=names.replace("[", r"\[").replace("]", r"\]")) as err:
        planned_heads([entry], ["rotation"])
    assert "\n" not in str(err.value)
