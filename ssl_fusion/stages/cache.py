"""``sslfuse cache``: frozen features of each stored encoder for the train and test splits, written once (the
work is in ``stages/caching.py``; this module is the stage's Hydra glue over the feature sources)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ssl_fusion.config import CacheConfig
from ssl_fusion.runtime import distributed
from ssl_fusion.stages import stage_app
from ssl_fusion.stages.context import open_context
from ssl_fusion.stages.sources import feature_sources


@stage_app("cache")
def main(cfg: DictConfig) -> None:
    """Under torchrun every source is cached by every rank, each on its own device, rank 0 publishing."""
    sources = feature_sources(cfg)
    cache: CacheConfig = OmegaConf.to_object(cfg.cache)
    for source in sources:
        source.check_views(cache, "cache")
    ctx = open_context(cfg, cfg.encoder_seed, stream=True)
    for source in sources:
        source.check_cacheable(ctx)
    with distributed.process_group(ctx.device) as device:
        ctx.device = device
        for source in sources:
            for line in source.cache(ctx, cache):
                if distributed.is_main():
                    print(line)
