"""The stacked head trainer: the direct product of linear heads equals running each member's own forward."""

from __future__ import annotations

import torch

from ssl_fusion.fusion.concat import ConcatConfig, ConcatFusion
from ssl_fusion.fusion.training import HeadStack


def test_linear_heads_stacked_as_one_product_give_each_members_own_logits():
    """Three concat heads with different weights: the stacked product (members, batch, classes) equals each head's
    forward on the same features, in eval mode (no dropout), to float precision."""
    torch.manual_seed(0)
    cfg = ConcatConfig(name="concat")
    heads = [ConcatFusion(cfg, [6, 4], num_classes=3) for _ in range(3)]
    features = [torch.randn(7, 6), torch.randn(7, 4)]
    stack = HeadStack(heads)
    stacked = stack.logits(features)
    own = torch.stack([head.eval()(features) for head in heads])
    assert stacked.shape == (3, 7, 3)
    torch.testing.assert_close(stacked, own)


def test_an_mlp_head_falls_back_to_running_each_member():
    """With a hidden layer the head has no stacked product; the stack still gives each member's own logits."""
    torch.manual_seed(0)
    cfg = ConcatConfig(name="concat", hidden=5)
    heads = [ConcatFusion(cfg, [6], num_classes=3) for _ in range(2)]
    assert heads[0].stacked_logits({}, [torch.randn(2, 6)]) is None
    features = [torch.randn(4, 6)]
    torch.testing.assert_close(
        HeadStack(heads).logits(features), torch.stack([head.eval()(features) for head in heads])
    )
