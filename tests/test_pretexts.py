from __future__ import annotations

import torch
import torch.nn.functional as F
from pretext_check import assert_loss_falls, prototype_images, tiny_encoder

from ssl_fusion.data.augment import color_jitter, random_resized_crop
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.pretexts.rotation import RotationConfig, rotation_pseudo_labels
from ssl_fusion.pretexts.simclr import SimCLRConfig, nt_xent, similarity_logits


def test_rotating_back_by_the_label_restores_the_image():
    images = torch.rand(5, 1, 12, 12)
    for all_rotations in (True, False):
        rotated, turns = rotation_pseudo_labels(images, all_rotations)
        originals = images.repeat(4, 1, 1, 1) if all_rotations else images
        assert rotated.shape == originals.shape
        for image, turn, original in zip(rotated, turns, originals):
            assert torch.equal(torch.rot90(image, -int(turn), dims=(1, 2)), original)
            if turn != 0:
                assert not torch.equal(image, original)


def test_all_rotations_gives_each_label_once_per_image():
    _, turns = rotation_pseudo_labels(torch.rand(6, 1, 8, 8), all_rotations=True)
    assert torch.bincount(turns).tolist() == [6, 6, 6, 6]


def test_nt_xent_matches_its_definition_on_orthogonal_views():
    # Two images, views equal and orthogonal: each view's partner has similarity 1/T, the other two 0.
    z = torch.eye(2, 4)
    expected = -torch.log(torch.exp(torch.tensor(5.0)) / (torch.exp(torch.tensor(5.0)) + 2))
    assert torch.allclose(nt_xent(z, z.clone(), temperature=0.2), expected)


def test_nt_xent_is_low_for_matching_views_and_high_for_random_ones():
    z = torch.randn(32, 16)
    matched = nt_xent(z, z + 0.01 * torch.randn_like(z), temperature=0.1)
    unmatched = nt_xent(z, torch.randn(32, 16), temperature=0.1)
    assert matched < 0.1 and unmatched > 3.0


def test_simclr_logits_and_loss_stay_float32_under_bf16_autocast():
    """Paired with an fp32 reference on the same (bf16, as a projector under autocast gives them) embeddings: within
    1e-5. The same product left to autocast is off by about 1e-2 (steps of 2^-7 near logits of 1 to 5), which
    shows the check can tell."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(64, 32).bfloat16(), torch.randn(64, 32).bfloat16()
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    reference = (z @ z.t() / 0.2).fill_diagonal_(float("-inf"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = similarity_logits(z1, z2, 0.2)
        loss = nt_xent(z1, z2, 0.2)
        rounded = z @ z.t() / 0.2
    off_diagonal = ~torch.eye(128, dtype=torch.bool)
    assert logits.dtype == loss.dtype == torch.float32
    assert (logits - reference)[off_diagonal].abs().max() < 1e-5
    assert (rounded.float() - reference)[off_diagonal].abs().max() > 3e-3
    assert abs(loss.item() - nt_xent(z1.float(), z2.float(), 0.2).item()) < 1e-5


def test_augmentations_keep_shape_and_range_and_vary_per_sample():
    images = torch.rand(8, 3, 16, 16)
    cropped = random_resized_crop(images, scale=(0.3, 1.0))
    jittered = color_jitter(images, 0.4, 0.4, 0.4, 0.2)
    for out in (cropped, jittered):
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    same = images[:1].expand(8, -1, -1, -1)
    views = random_resized_crop(same, scale=(0.3, 1.0))
    assert (views - views[:1]).abs().flatten(1).amax(1)[1:].min() > 0


def test_a_few_steps_lower_each_pretext_loss():
    torch.manual_seed(0)
    images, labels = prototype_images()
    for name, cfg in [("rotation", RotationConfig(name="rotation")), ("simclr", SimCLRConfig(name="simclr"))]:
        assert_loss_falls(PRETEXTS.get(name).impl(cfg, tiny_encoder()), images, labels, 0.85)


def test_small_cnn_runs_on_any_image_size_and_knows_its_input_channels():
    for channels in (1, 3):
        encoder = build_encoder(SmallCNNConfig(name="small_cnn"), channels).eval()
        assert encoder.channels == channels
        for size in (1, 7, 8, 28, 33):
            assert encoder(torch.rand(2, channels, size, size)).shape == (2, encoder.out_dim)
