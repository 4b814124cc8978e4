"""Name -> (config dataclass, implementation) registries for datasets, encoders, pretexts and fusions.

Each option is one module that registers itself with a decorator; the packages import all their
modules, so adding an option means adding its module and its YAML in ``conf/<group>/``.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_fusion.runtime.errors import UserError

T = TypeVar("T")


def is_plain_name(name: str) -> bool:
    """Whether ``name`` names an option and no path: no separator, not hidden, not ``.`` or ``..``."""
    return not re.search(r"[/\\]", name) and not name.startswith(".")


def check_plain_name(kind: str, name: str, valid: list[str]) -> None:
    """Refuse an option name with path characters (``pretext=../preset/smoke``), which would read another group's
    file: one line listing the ``valid`` names of ``kind``."""
    if not is_plain_name(name):
        raise UserError(f"{kind}={name} is not a plain name; valid {kind} options: {', '.join(valid)}")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config_cls: type
    impl: T


class Registry(Generic[T]):
    """A named set of options of one kind (e.g. ``pretext``)."""

    def __init__(self, kind: str, parts: tuple[Registry[T], ...] = ()) -> None:
        self.kind = kind
        self._own: dict[str, Entry[T]] = {}
        self._parts = parts

    @classmethod
    def union(cls, kind: str, *parts: Registry[T]) -> Registry[T]:
        """The options of all ``parts`` under one ``kind``, as they are at each lookup (a name in two is refused)."""
        return cls(kind, parts)

    @property
    def _entries(self) -> dict[str, Entry[T]]:
        entries = dict(self._own)
        for part in self._parts:
            twice = set(entries) & set(part._entries)
            if twice:
                raise ValueError(f"{self.kind} '{min(twice)}' is registered twice")
            entries.update(part._entries)
        return entries

    def register(self, name: str, config_cls: type) -> Callable[[T], T]:
        def add(impl: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._own[name] = Entry(name, config_cls, impl)
            return impl

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry[T]:
        entries = self._entries
        if name not in entries:
            raise UserError(f"unknown {self.kind} '{name}'; valid {self.kind}s: {', '.join(self.names())}")
        return entries[name]

    def typed_config(self, node: DictConfig | dict, key: str | None = None) -> Any:
        """Check ``node`` against its option's dataclass and return an instance of it.

        A misspelled key or a value of the wrong type becomes a one-line UserError naming the key; a value out of
        range, the one its dataclass's rules give (``ssl_fusion.runtime.checks``).
        """
        key = key or self.kind
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        if "name" not in plain:
            raise UserError(f"{key}: no 'name' given; valid {self.kind}s: {', '.join(self.names())}")
        entry = self.get(plain["name"])
        try:
            merged = OmegaConf.merge(OmegaConf.structured(entry.config_cls), plain)
            return OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            bad_key = getattr(err, "full_key", None) or getattr(err, "key", "?")
            allowed = ", ".join(f.name for f in entry.config_cls.__dataclass_fields__.values())
            reason = str(err).splitlines()[0]
            raise UserError(f"{key}.{bad_key}: {reason} ({self.kind} '{entry.name}' accepts: {allowed})") from None


def import_submodules(package: ModuleType) -> None:
    """Import every module of ``package`` so that their ``register`` decorators run."""
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
