"""Config files found where Hydra finds them: the package's ``conf/``, then the folders a user adds with
``--config-dir`` or ``hydra.searchpath`` (``external/<name>.yaml``: an encoder declared once).

The search path is the running stage's (a Hydra app's): outside one, no file is found.
"""

from __future__ import annotations

from typing import Any, Iterable

import yaml
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_fusion.runtime.errors import UserError


def searchpath_override(paths: Iterable[str]) -> list[str]:
    """``hydra.searchpath=[...]`` over ``paths`` (none: no override). Hydra reads ``hydra.searchpath`` afresh for each
    composition, so a composition within a stage is given the stage's own."""
    quoted = ["'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'" for path in paths]
    return [f"hydra.searchpath=[{','.join(quoted)}]"] if quoted else []


def stage_searchpath() -> list[str]:
    """The running stage's ``hydra.searchpath`` as an override (``searchpath_override``); [] outside a stage."""
    return searchpath_override(HydraConfig.get().searchpath) if HydraConfig.initialized() else []


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (its ``<group>/<name>.yaml`` files) on the running stage's search
    path, sorted; [] outside a stage."""
    if not GlobalHydra.instance().is_initialized():
        return []
    loader = GlobalHydra.instance().config_loader()
    return sorted(loader.get_group_options(group, overrides=stage_searchpath()))


def load_group_option(group: str, name: str) -> dict[str, Any]:
    """The keys of option ``name`` of ``group`` as Hydra composes it (interpolations resolved); a one-line UserError
    naming the file when it is no YAML mapping."""
    try:
        node = OmegaConf.select(compose(overrides=[*stage_searchpath(), f"+{group}={name}"]), group)
        keys = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        raise UserError(f"{group}/{name}.yaml: {' '.join(str(err).split('Config search path')[0].split())}") from None
    if not isinstance(keys, dict):
        raise UserError(f"{group}/{name}.yaml: holds {type(keys).__name__}, not keys")
    return keys
