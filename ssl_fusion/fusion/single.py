"""One pretext alone (``fusion.pretext=<name>``): the per-encoder baseline every fusion is compared with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ssl_fusion.fusion import FUSIONS
from ssl_fusion.fusion.concat import LinearConfig, LinearFusion
from ssl_fusion.runtime.errors import UserError


@dataclass
class SingleConfig(LinearConfig):
    pretext: Optional[str] = None


@FUSIONS.register("single", SingleConfig)
class SingleFusion(LinearFusion):
    """A linear head (or MLP) on the features of ``fusion.pretext`` alone."""

    reads_one_pretext = True
    hidden_options = ("pretext",)

    @classmethod
    def inputs(cls, cfg: SingleConfig, pretexts: list[str]) -> list[str]:
        if cfg.pretext is None:
            raise UserError(f"fusion=single needs fusion.pretext=<name>; one of: {', '.join(pretexts)}")
        return [cfg.pretext]

    @classmethod
    def variants(cls, cfg: SingleConfig, pretexts: list[str]) -> list[tuple[SingleConfig, list[str]]]:
        """One head per pretext."""
        return [(dataclasses.replace(cfg, pretext=name), [name]) for name in pretexts]
