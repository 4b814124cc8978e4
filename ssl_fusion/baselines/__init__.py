"""Reference methods that train on the labeled images rather than on cached features; each registers in ``FUSIONS``."""

import sys

from ssl_fusion.runtime.registry import import_submodules

import_submodules(sys.modules[__name__])
