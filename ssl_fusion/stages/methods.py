"""Every method ``fusion=<name>`` and ``fusions=[...]`` can name, in one registry: the heads over cached features
(``FUSIONS``) and the baselines that train on the labeled images (``BASELINES``). The stages look methods up here
only; the packages below them know their own registry and import nothing above it."""

from __future__ import annotations

from ssl_fusion.baselines import BASELINES
from ssl_fusion.fusion import FUSIONS, FusionMethod
from ssl_fusion.runtime.registry import Registry

METHODS: Registry[type[FusionMethod]] = Registry.union("fusion", FUSIONS, BASELINES)


def lookup_method(name: str) -> type[FusionMethod]:
    """The head or baseline class registered as ``name``; a one-line UserError listing all of them otherwise."""
    return METHODS.get(name).impl
