"""``sslfuse cache``: frozen features of each stored encoder for the train and test splits, written once (the
work is in ``stages/caching.py``; this module is the stage's Hydra glue over the feature sources)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ssl_fusion.config import CacheConfig
from ssl_fusion.runtime import distributed
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import stage_app
from ssl_fusion.stages.context import open_context
from ssl_fusion.stages.sources import feature_sources


@stage_app("cache")
def main(cfg: DictConfig) -> None:
    sources = feature_sources(cfg)
    cache: CacheConfig = OmegaConf.to_object(cfg.cache)
    if cache.views and distributed.launched():
        raise UserError("cache.views is cached by one process; run it without torchrun")
    for source in sources:
        source.check_views(cache, "cache")
    ctx = open_context(cfg, cfg.encoder_seed, stream=True)
    for source in sources:
        source.check_cacheable(ctx)
    for source in (s for s in sources if not s.cached_by_every_rank):
        for line in source.cache(ctx, cache):
            print(line)
    with distributed.process_group(ctx.device) as device:
        ctx.device = device
        for source in (s for s in sources if s.cached_by_every_rank):
            for line in source.cache(ctx, cache):
                if distributed.is_main():
                    print(line)
