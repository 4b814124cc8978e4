"""The sslfuse stages, each a Hydra app over the configs in ``conf/``."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssl_fusion.config import CONF_DIR, register_schemas
from ssl_fusion.runtime.errors import UserError

register_schemas()


def report_user_error(stage: str, err: UserError) -> None:
    """One line on stderr, exit code 2: the way every stage answers a mistake the user can fix."""
    print(f"sslfuse {stage}: error: {err}", file=sys.stderr)
    sys.exit(2)


def stage_app(config_name: str) -> Callable[[Callable[[DictConfig], None]], Callable[[], None]]:
    """``hydra.main`` over ``conf/<config_name>.yaml`` that turns a UserError into one line on stderr."""

    def decorate(task: Callable[[DictConfig], None]) -> Callable[[], None]:
        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> None:
            try:
                task(cfg)
            except UserError as err:
                report_user_error(config_name, err)

        return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(guarded)

    return decorate


def run_dir() -> str:
    return HydraConfig.get().runtime.output_dir


def search_path_arguments() -> list[str]:
    """This run's own config folders as arguments of another command, to go last: its ``hydra.searchpath`` and
    ``--config-dir`` (where files such as ``external/<name>.yaml`` are found)."""
    hydra_config = HydraConfig.get()
    folders = [
        f"--config-dir={source.path}"
        for source in hydra_config.runtime.config_sources
        if source.provider == "command-line"
    ]
    return [*(o for o in hydra_config.overrides.hydra if o.lstrip("+~").startswith("hydra.searchpath=")), *folders]


def user_overrides(drop: tuple[str, ...], rename: dict[str, str] | None = None) -> list[str]:
    """This run's command-line overrides without the keys in ``drop`` and with keys renamed as in
    ``rename``, then its config folders (``search_path_arguments``): the arguments for a suggested command of another
    stage."""
    kept = []
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.partition("=")
        bare = key.lstrip("+~")
        if bare.startswith(("hydra.", *drop)):
            continue
        kept.append(f"{key[: len(key) - len(bare)]}{(rename or {}).get(bare, bare)}={value}")
    return [*kept, *search_path_arguments()]
