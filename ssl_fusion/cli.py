"""The ``sslfuse`` command: ``sslfuse <stage> key=value ...``; each stage is a Hydra app."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import NoReturn, Sequence

from ssl_fusion import __version__
from ssl_fusion.runtime.errors import UserError

STAGES = {
    "pretrain": "train one encoder on a pretext task and store it   (sslfuse pretrain pretext=rotation)",
    "cache": "write frozen features of stored encoders            (sslfuse cache pretexts=[rotation,simclr])",
    "fuse": "train a fusion head on cached features, evaluate    (sslfuse fuse fusion=attention labels.fraction=0.01)",
    "run": "pretrain + cache what is missing, fuse, print table (sslfuse run, sslfuse run preset=smoke)",
    "report": "aggregate results under a folder into tables       (sslfuse report outputs/multirun/...)",
    "study": "run what a declared study lacks, judge its claims   (sslfuse study study=smoke)",
}

USAGE = (
    "usage: sslfuse <stage> [key=value ...] [--cfg job] [-m]\n\nstages:\n"
    + "\n".join(f"  {name:<9} {text}" for name, text in STAGES.items())
    + "\n\n`sslfuse <stage> --help` shows a stage's config and options; `-m` runs a Hydra multirun sweep; "
    "`sslfuse --version` prints the version."
)


def one_line(text: str) -> str:
    """Hydra's multi-line messages folded into one line (option lists joined by commas)."""
    text = text.split("Config search path")[0]
    head, _, options = text.partition("Available options in")
    folded = " ".join(line.strip() for line in head.splitlines() if line.strip())
    if options:
        group, _, names = options.partition(":")
        folded += f"; valid options for{group}: " + ", ".join(names.split())
    return folded


def allowed_keys(
    stage: str, full_key: str, choices: list[str], kind: object = None, searched: Sequence[str] = ()
) -> str:
    """'; allowed keys under X: ...' for an unknown key, from the stage's config with only the user's ``choices`` of
    config groups (``study=smoke``: a group without a default must be chosen; ``searched``: the search path override
    where they are); for a key of an item of a typed list, whose ``full_key`` OmegaConf gives without the list, the
    fields of the item's type ``kind``."""
    import dataclasses

    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf

    from ssl_fusion.config import CONF_DIR

    parent = full_key.rpartition(".")[0]
    groups = [o for o in choices if "." not in o.partition("=")[0] and (CONF_DIR / o.partition("=")[0]).is_dir()]
    try:
        node = compose(config_name=stage, overrides=[*groups, *searched])
    except HydraException:
        return ""
    node = OmegaConf.select(node, parent) if parent else node
    if dataclasses.is_dataclass(kind) and not (isinstance(node, DictConfig) and OmegaConf.get_type(node) is kind):
        return f"; allowed keys of a {kind.__name__}: {', '.join(f.name for f in dataclasses.fields(kind))}"
    if not isinstance(node, DictConfig):
        return ""
    return f"; allowed keys under {parent or 'the top level'}: {', '.join(str(k) for k in node.keys())}"


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """For a sweep (``key=a,b``), override lists that between them use every swept value once (the other
    sweeps at their first value): enough to check that every job's config composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [None] for o in parsed]
    base = [o.input_line if v[0] is None else f"{o.get_key_element()}={v[0]}" for o, v in zip(parsed, values)]
    jobs = [base]
    for i, (override, options) in enumerate(zip(parsed, values)):
        jobs += [[*base[:i], f"{override.get_key_element()}={value}", *base[i + 1 :]] for value in options[1:]]
    return jobs


def group_choice_problem(overrides: list[str]) -> str | None:
    """An option of a config group given as a path (``pretext=../preset/smoke``), which Hydra would read as the
    option, in one line listing the group's options (a dict or list set on a key of the group's name is no option)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ssl_fusion.config import CONF_DIR
    from ssl_fusion.runtime.registry import check_plain_name, is_plain_name

    for override in OverridesParser.create().parse_overrides(overrides):
        group, name = override.key_or_group, override.value()
        if isinstance(name, str) and is_plain_name(group) and (CONF_DIR / group).is_dir():
            try:
                check_plain_name(group, name, sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml")))
            except UserError as err:
                return str(err)
    return None


# Hydra's flags that show something instead of running (it composes or answers them itself), and those that choose
# another primary config: the stage's config is not composed before them
NOT_COMPOSED = ("help", "hydra_help", "info", "shell_completion", "config_path", "config_name", "experimental_rerun")


def hydra_flags(args: list[str]) -> argparse.Namespace:
    """``args`` read by Hydra's own parser of its flags and overrides; what it refuses (a flag among the overrides)
    in one line."""
    from hydra._internal.utils import get_args_parser

    def refuse(message: str) -> NoReturn:
        raise UserError(f"{message} (Hydra's flags, such as --config-dir, go before or after the key=value overrides)")

    parser = get_args_parser()
    parser.error = refuse
    return parser.parse_args(args)


def search_path(config_dir: str | None, overrides: list[str]) -> list[str]:
    """What Hydra adds to the stage's search path: ``--config-dir`` (which must exist), then ``hydra.searchpath``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    folders = []
    if config_dir is not None:
        folder = os.path.abspath(config_dir)
        if not os.path.isdir(folder):
            raise UserError(f"--config-dir: no folder '{folder}'")
        folders.append(f"file://{folder}")
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.get_key_element() == "hydra.searchpath" and isinstance(override.value(), list):
            folders += override.value()
    return folders


def composition_problem(stage: str, args: list[str]) -> str | None:
    """Compose the stage's config with the user's overrides the way Hydra will (with the folders ``--config-dir`` and
    ``hydra.searchpath`` add), and describe a failure in one line (a misspelled key, a wrong type, an unknown option);
    with ``-m``, every swept value is checked. Hydra's flags that show something are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        OmegaConfBaseException,
    )

    from ssl_fusion.config import CONF_DIR
    from ssl_fusion.runtime.search_path import searchpath_override

    try:
        flags = hydra_flags(args)
    except UserError as err:
        return str(err)
    if any(getattr(flags, flag) for flag in NOT_COMPOSED):
        return None
    overrides = [arg for arg in flags.overrides if not arg.lstrip("+~").startswith("hydra.")]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name=stage):
        try:
            searched = searchpath_override(search_path(flags.config_dir, flags.overrides))
            for job in sweep_jobs(overrides) if flags.multirun else [overrides]:
                problem = group_choice_problem(job)
                if problem:
                    return problem
                compose(config_name=stage, overrides=[*job, *searched])
        except UserError as err:
            return str(err)
        except (HydraException, OmegaConfBaseException) as err:
            cause = err.__cause__
            if cause is None:
                return one_line(str(err))
            message = (
                one_line(str(err).split("To append to your config")[0])
                + f" ({one_line(str(cause).split('full_key')[0])})"
            )
            if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
                message += allowed_keys(stage, cause.full_key, job, getattr(cause, "object_type", None), searched)
            return message
    return None


JOBLIB, SUBMITIT = "hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher"
# hydra/launcher options (conf/hydra/launcher/ and the plugins' own) and the plugin each needs
LAUNCHER_PLUGINS = {
    "local": JOBLIB,
    "joblib": JOBLIB,
    "slurm": SUBMITIT,
    "submitit_slurm": SUBMITIT,
    "submitit_local": SUBMITIT,
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def launch_problem(stage: str, args: list[str]) -> str | None:
    """A stage torchrun cannot split, or a Hydra launcher whose plugin is not installed, in one line."""
    from ssl_fusion.runtime import distributed

    if distributed.launched() and stage not in distributed.STAGES:
        return f"only {' and '.join(distributed.STAGES)} run under torchrun; start {stage} as one process"
    for arg in args:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra/launcher" and value in LAUNCHER_PLUGINS and not installed(LAUNCHER_PLUGINS[value]):
            return f"hydra/launcher={value} needs its Hydra plugin: pip install 'sslfuse[launchers]'"
    return None


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] in ("-V", "--version"):
        print(f"sslfuse {__version__}")
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"sslfuse: error: unknown stage '{stage}'; valid stages: {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    if stage == "report":
        from ssl_fusion.report import tables as report

        try:
            report.main(rest)
        except UserError as err:
            print(f"sslfuse report: error: {err}", file=sys.stderr)
            sys.exit(2)
        return
    module = importlib.import_module(f"ssl_fusion.stages.{stage}")
    problem = launch_problem(stage, rest) or composition_problem(stage, rest)
    if problem:
        print(f"sslfuse {stage}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    from ssl_fusion.runtime.distributed import hydra_overrides

    sys.argv = [f"sslfuse-{stage}", *rest, *hydra_overrides()]
    module.main()


if __name__ == "__main__":
    main()
