"""The config contract: every typed config refuses a value its rules refuse, in one line naming the full key and what
is allowed, wherever it is built; and no package below the stages imports the stages or the baselines."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from omegaconf import OmegaConf

from ssl_fusion.config import CacheConfig, LabelsConfig, ProbeConfig, TrainOverrides, as_plain, check_names, load_option
from ssl_fusion.data.datasets import DATASETS
from ssl_fusion.data.splits import EvaluationConfig
from ssl_fusion.models.encoders import ENCODERS
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.runtime.checks import Checked, Rule
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.registry import Registry
from ssl_fusion.runtime.tracking import TRACKERS
from ssl_fusion.stages.methods import METHODS

PACKAGE = Path(__file__).resolve().parent.parent / "ssl_fusion"
REGISTRIES: list[Registry] = [DATASETS, ENCODERS, PRETEXTS, METHODS, TRACKERS]
SECTIONS: list[type[Checked]] = [CacheConfig, TrainOverrides, LabelsConfig, ProbeConfig, EvaluationConfig]
BELOW_THE_STAGES = ["fusion", "evaluation", "data", "models", "store", "runtime", "pretexts", "report", "config.py"]


Build = Callable[[Checked, str, Any], Checked]


def from_registry(registry: Registry) -> Build:
    """Build an option with ``key`` set to ``value`` as the stages do: its YAML's node through ``typed_config``."""
    return lambda config, key, value: registry.typed_config({**as_plain(config), key: value}, key=registry.kind)


def from_node(config: Checked, key: str, value: Any) -> Checked:
    """Build a section with ``key`` set to ``value`` as the stages do: ``OmegaConf.to_object`` of its node."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(type(config)), {key: value}))


def typed_configs() -> Iterator[tuple[str, Checked, Build]]:
    """(id, config as the user gets it by default, how the stages build it): every registered option's YAML, and
    every section's defaults."""
    for registry in REGISTRIES:
        for name in registry.names():
            yield f"{registry.kind}={name}", load_option(registry, name), from_registry(registry)
    for section in SECTIONS:
        yield section.section, section(), from_node


def declared_rules() -> Iterator[Any]:
    for label, config, build in typed_configs():
        for key, rule in config.rules().items():
            yield pytest.param(config, key, rule, build, id=f"{label}:{key}")


def assert_one_line_naming(refused: pytest.ExceptionInfo, config: Checked, key: str, rule: Rule) -> None:
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{config.section}.{key}"), message
    assert rule.allowed in message, message


def test_every_typed_config_declares_its_rules_the_one_way():
    """A new option or section cannot skip the mechanism, and the contract below is not empty."""
    for registry in REGISTRIES:
        for name in registry.names():
            assert issubclass(registry.get(name).config_cls, Checked), name
    assert len(list(declared_rules())) >= 60


@pytest.mark.parametrize(("config", "key", "rule", "build"), list(declared_rules()))
def test_a_value_a_rule_refuses_fails_in_one_line_naming_the_full_key(config, key, rule, build):
    """Each declared rule, broken with its ``bad`` value: refused when built directly and when built from a config
    node, in one line naming ``<section>.<key>`` and what is allowed. The default passes its own rules."""
    assert rule.ok(getattr(config, key)), (key, getattr(config, key))
    with pytest.raises(UserError) as direct:
        dataclasses.replace(config, **{key: rule.bad})
    assert_one_line_naming(direct, config, key, rule)
    with pytest.raises(UserError) as built:
        build(config, key, rule.bad)
    assert_one_line_naming(built, config, key, rule)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: METHODS.typed_config({"name": "attention", "lr": 0}, key="fusion"), "fusion.lr must be > 0, got 0.0"),
        (
            lambda: METHODS.typed_config({"name": "concat", "eval_every": 500}, key="fusion"),
            "fusion.eval_every must be in [1, fusion.steps] = [1, 200], got 500",
        ),
        (
            lambda: METHODS.typed_config({"name": "select", "by": "best"}, key="fusion"),
            "fusion.by: 'best' is not one of val, logme, knn, oracle",
        ),
        (
            lambda: METHODS.typed_config({"name": "supervised_scratch", "max_shift": 0.7}, key="fusion"),
            "fusion.max_shift must be in [0, 0.5), got 0.7",
        ),
        (
            lambda: PRETEXTS.typed_config({"name": "inpainting", "fill": "noise"}),
            "pretext.fill: 'noise' is not one of zero, mean",
        ),
        (
            lambda: PRETEXTS.typed_config({"name": "relative_location", "jitter": -2}),
            "pretext.jitter must be >= 0, got -2",
        ),
        (
            lambda: DATASETS.typed_config({"name": "image_folder", "channels": 2}),
            "dataset.channels: 2 is not one of 1, 3",
        ),
        (lambda: DATASETS.typed_config({"name": "synthetic", "max_test": 0}), "dataset.max_test must be > 0, got 0"),
        (lambda: CacheConfig(batch_size=0), "cache.batch_size must be > 0, got 0"),
        (lambda: CacheConfig(views=-1), "cache.views must be >= 0 (0: no augmented views), got -1"),
        (lambda: TrainOverrides(epochs=0), "train.epochs must be > 0, got 0"),
        (
            lambda: TrainOverrides(checkpoint_every_minutes=math.nan),
            "train.checkpoint_every_minutes must be >= 0 (0 or null: at epoch ends only), got nan",
        ),
        (lambda: LabelsConfig(fraction=1.5), "labels.fraction must be in (0, 1], got 1.5"),
        (lambda: ProbeConfig(k=0), "probe.k must be >= 1, got 0"),
    ],
)
def test_known_bad_values_give_these_messages(make, message):
    with pytest.raises(UserError) as refused:
        make()
    assert str(refused.value) == message


@pytest.mark.parametrize(
    "make, field, edge",
    [
        (
            lambda: TrainOverrides(epochs=None, checkpoint_every_minutes=None, checkpoint_every_steps=None),
            "epochs",
            None,
        ),
        (lambda: LabelsConfig(fraction=None, per_class=3), "fraction", None),
        (lambda: CacheConfig(views=0, views_max_shift=0.0, num_workers=0), "views_max_shift", 0.0),
        (
            lambda: METHODS.typed_config(
                {"name": "attention", "eval_every": 200, "feature_dropout": 0.0}, key="fusion"
            ),
            "eval_every",
            200,
        ),
    ],
)
def test_values_at_the_edge_of_what_is_allowed_pass(make, field, edge):
    """A value on the boundary of a rule is built, and kept as given (not refused, not clamped)."""
    assert getattr(make(), field) == edge


def test_a_baseline_is_named_beside_the_heads():
    """``fusion=supervised_scratch`` and ``fusions=[...,supervised_scratch]`` find it; an unknown name lists it."""
    assert load_option(METHODS, "supervised_scratch").name == "supervised_scratch"
    assert check_names("fusions", ["concat", "supervised_scratch"], METHODS) == ["concat", "supervised_scratch"]
    with pytest.raises(UserError, match="unknown fusion 'scratch' in fusions; valid fusions: .*supervised_scratch"):
        check_names("fusions", ["concat", "scratch"], METHODS)


def imported_modules(source: str, package: str, with_type_only: bool = True) -> set[str]:
    """The absolute names of the modules that ``source``, a module of ``package``, imports (at any depth; in
    ``if TYPE_CHECKING:`` blocks too unless ``with_type_only`` is false)."""
    names = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and not with_type_only and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.update([module, *(f"{module}.{alias.name}" for alias in node.names)])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return names


def imports_of(path: Path, with_type_only: bool = True) -> set[str]:
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    return imported_modules(path.read_text(), package, with_type_only)


def upward(names: set[str]) -> set[str]:
    return {name for name in names if name.split(".")[:2] in (["ssl_fusion", "stages"], ["ssl_fusion", "baselines"])}


@pytest.mark.parametrize("part", BELOW_THE_STAGES)
def test_no_package_below_the_stages_imports_the_stages_or_the_baselines(part):
    files = [PACKAGE / part] if part.endswith(".py") else sorted((PACKAGE / part).rglob("*.py"))
    assert files
    found = {str(path.relative_to(PACKAGE)): upward(imports_of(path)) for path in files}
    assert {path: names for path, names in found.items() if names} == {}


def test_the_baselines_import_the_stages_for_type_hints_only_and_the_stages_import_them_for_no_side_effect():
    for path in sorted((PACKAGE / "baselines").rglob("*.py")):
        assert not {n for n in upward(imports_of(path, with_type_only=False)) if n.startswith("ssl_fusion.stages")}
    stages = imports_of(PACKAGE / "stages" / "__init__.py")
    assert not {name for name in stages if name.startswith("ssl_fusion.baselines")}


def test_the_import_walk_sees_an_upward_import():
    """The checks above can fail: a relative, a nested and a type-only import upward are all found."""
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..stages.context import StageContext\n"
        "def f():\n    import ssl_fusion.baselines\n"
    )
    assert upward(imported_modules(source, "ssl_fusion.store")) >= {"ssl_fusion.stages.context", "ssl_fusion.baselines"}
    assert upward(imported_modules(source, "ssl_fusion.store", with_type_only=False)) == {"ssl_fusion.baselines"}
