"""Reference methods that train on the labeled images rather than on cached features, each registered in
``BASELINES``. Their options live beside the heads' in ``conf/fusion/``: the stages look a method up in both
registries (``ssl_fusion.stages.methods``)."""

import sys

from ssl_fusion.fusion import FusionMethod
from ssl_fusion.runtime.registry import Registry, import_submodules

BASELINES: Registry[type[FusionMethod]] = Registry("fusion")

import_submodules(sys.modules[__name__])
