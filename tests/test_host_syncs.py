"""No host sync in a training step: every pretext's step runs without the host waiting for the device (checked on
the CPU by the ops it dispatches, on a GPU by torch's sync debug mode), and the sync-free forms compute what the
former ones did (kept here as references: boolean masks, ``.any()``, constants made from Python numbers)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pretext_check import HostSyncs, assert_cuda_step_makes_no_host_sync, host_syncs_of_step, tiny_encoder

from ssl_fusion.config import load_option
from ssl_fusion.data.augment import color_jitter
from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.pretexts import PRETEXTS, Pretext
from ssl_fusion.pretexts.colorization import lab_to_rgb, rgb_to_lab
from ssl_fusion.pretexts.inpainting import patch_mask, reconstruction_loss
from ssl_fusion.pretexts.relative_location import NEIGHBOURS, grid_patches, relative_location_pseudo_labels
from ssl_fusion.pretexts.rotation import rotate_batch, rotation_pseudo_labels
from ssl_fusion.pretexts.simclr import nt_xent
from ssl_fusion.pretexts.vicreg import covariance_term

DATA = make_synthetic(SyntheticConfig(name="synthetic", n_train=8, n_test=2, image_size=32, channels=3), root=None)
# Every pretext that trains, with its configuration's other code paths; shuffled_labels has its own test below.
STEPS = [
    *((name, {}) for name in PRETEXTS.names() if PRETEXTS.get(name).impl.trains and name != "shuffled_labels"),
    ("rotation", {"all_rotations": False}),
    ("relative_location", {"all_neighbours": False}),
    ("inpainting", {"loss_on": "all", "fill": "zero"}),
    ("denoising", {"noise": "salt_pepper"}),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync debug mode needs a CUDA device")


def pretext(name: str, options: dict) -> Pretext:
    torch.manual_seed(0)
    cls = PRETEXTS.get(name).impl
    recipe = cls.adapt(load_option(PRETEXTS, name, options), DATA)
    cls.check(recipe, DATA)
    return cls(recipe, tiny_encoder(DATA.channels))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return DATA.train_images.float() / 255, DATA.train_labels


@pytest.mark.parametrize("name, options", STEPS)
def test_a_training_step_makes_no_host_sync(name, options):
    assert host_syncs_of_step(pretext(name, options), *batch()) == []


def test_shuffled_labels_syncs_only_to_check_its_batch_is_among_its_images():
    """Its lookup compares the batch's keys with the stored ones on the host, once a step, to refuse a foreign image."""
    assert host_syncs_of_step(pretext("shuffled_labels", {}), *batch()) == ["aten.equal.default"]


@needs_cuda
@pytest.mark.parametrize("name, options", STEPS)
def test_a_training_step_on_the_gpu_makes_no_host_sync(name, options):
    assert_cuda_step_makes_no_host_sync(pretext(name, options), *batch())


# The former forms, as they were: the references of the sync-free ones.


def masked_rotate_batch(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(images)
    for turns in range(4):
        chosen = quarter_turns == turns
        if chosen.any():
            out[chosen] = torch.rot90(images[chosen], turns, dims=(2, 3))
    return out


def copied_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    similarity = z @ z.t() / temperature
    similarity.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, partner)


def copied_color_jitter(images, brightness, contrast, saturation, grayscale_p):
    shape, device = (images.shape[0], 1, 1, 1), images.device
    out = images * torch.empty(shape, device=device).uniform_(1 - brightness, 1 + brightness)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * torch.empty(shape, device=device).uniform_(1 - contrast, 1 + contrast) + mean
    if images.shape[1] == 3:
        gray = (out * torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = gray + (out - gray) * torch.empty(shape, device=device).uniform_(1 - saturation, 1 + saturation)
        to_gray = torch.rand(shape, device=device) < grayscale_p
        out = torch.where(to_gray, gray.expand_as(out), out)
    return out.clamp(0, 1)


RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
D65_WHITE, EPSILON = (0.95047, 1.0, 1.08883), 6 / 29


def copied_mix_channels(matrix: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return (matrix.to(images.device, images.dtype).view(1, 3, 3, 1, 1) * images.unsqueeze(1)).sum(dim=2)


def copied_rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    rgb = rgb.float()
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))
    xyz = copied_mix_channels(RGB_TO_XYZ, linear) / torch.tensor(D65_WHITE, device=rgb.device).view(1, 3, 1, 1)
    f = torch.where(xyz > EPSILON**3, xyz.clamp_min(EPSILON**3).pow(1 / 3), xyz / (3 * EPSILON**2) + 4 / 29)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def copied_lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    lab = lab.float()
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > EPSILON, f.pow(3), 3 * EPSILON**2 * (f - 4 / 29))
    white = torch.tensor(D65_WHITE, device=lab.device).view(1, 3, 1, 1)
    linear = copied_mix_channels(torch.linalg.inv(RGB_TO_XYZ), xyz * white).clamp(0, 1)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.pow(1 / 2.4) - 0.055)


def copied_relative_location_pseudo_labels(images, gap, jitter, all_neighbours):
    patches = grid_patches(images, gap, jitter)
    batch = images.shape[0]
    if all_neighbours:
        labels = torch.arange(len(NEIGHBOURS), device=images.device).expand(batch, -1)
    else:
        labels = torch.randint(0, len(NEIGHBOURS), (batch, 1), device=images.device)
    positions = torch.tensor(NEIGHBOURS, device=images.device)[labels]
    neighbours = patches[torch.arange(batch, device=images.device).unsqueeze(1), positions]
    return patches[:, 4], neighbours, labels


def masked_reconstruction_loss(reconstruction, images, mask):
    mask = mask.expand_as(images)
    return F.mse_loss(reconstruction[mask], images[mask])


def seeded(function, *args):
    torch.manual_seed(7)
    return function(*args)


def test_the_syncs_check_sees_the_former_forms():
    """Its footing: each former form is flagged, so an empty list above means the step avoids them."""
    images, turns = torch.rand(6, 1, 8, 8), torch.randint(0, 4, (6,))
    for former in (
        lambda: masked_rotate_batch(images, turns),
        lambda: copied_color_jitter(torch.rand(4, 3, 8, 8), 0.4, 0.4, 0.4, 0.2),
        lambda: copied_rgb_to_lab(torch.rand(2, 3, 8, 8)),
        lambda: copied_relative_location_pseudo_labels(torch.rand(2, 1, 27, 27), 1, 1, True),
        lambda: masked_reconstruction_loss(images, images, images > 0.5),
        lambda: torch.cov(torch.rand(4, 8)),
    ):
        with HostSyncs() as syncs:
            former()
        assert syncs.found, former


def test_rotation_picks_each_images_turn_as_the_masked_form_did():
    images = torch.rand(9, 2, 7, 7)
    for turns in (torch.randint(0, 4, (9,)), torch.arange(9) % 4, torch.zeros(9, dtype=torch.long)):
        assert torch.equal(rotate_batch(images, turns), masked_rotate_batch(images, turns))


@pytest.mark.parametrize("all_rotations", [True, False])
def test_rotation_pseudo_labels_are_the_former_ones_in_the_same_order(all_rotations):
    """All four rotations stay blockwise (the batch turned by 0, then 1, 2, 3 quarter turns), as before; one
    sampled turn per image draws the same labels from the same seed."""
    images = torch.rand(5, 3, 8, 8)
    rotated, turns = seeded(rotation_pseudo_labels, images, all_rotations)
    if all_rotations:
        expected_turns = torch.arange(4).repeat_interleave(5)
        expected = masked_rotate_batch(images.repeat(4, 1, 1, 1), expected_turns)
    else:
        expected_turns = seeded(torch.randint, 0, 4, (5,))
        expected = masked_rotate_batch(images, expected_turns)
    assert torch.equal(turns, expected_turns) and torch.equal(rotated, expected)


def test_nt_xent_and_its_partner_labels_are_the_former_ones():
    for n in (1, 2, 7):
        assert torch.equal(torch.arange(2 * n).roll(n), torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]))
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    assert torch.equal(nt_xent(z1, z2, 0.2), copied_nt_xent(z1, z2, 0.2))


def test_color_jitter_is_the_former_one_from_the_same_seed():
    images = torch.rand(16, 3, 8, 8)
    assert torch.equal(
        seeded(color_jitter, images, 0.4, 0.4, 0.4, 0.5), seeded(copied_color_jitter, images, 0.4, 0.4, 0.4, 0.5)
    )


def test_lab_conversions_are_the_former_ones():
    rgb = torch.rand(4, 3, 9, 9)
    lab = rgb_to_lab(rgb)
    assert torch.equal(lab, copied_rgb_to_lab(rgb))
    assert torch.equal(lab_to_rgb(lab), copied_lab_to_rgb(lab))


@pytest.mark.parametrize("all_neighbours", [True, False])
def test_relative_location_pairs_are_the_former_ones_from_the_same_seed(all_neighbours):
    images = torch.rand(3, 2, 30, 30)
    ours = seeded(relative_location_pseudo_labels, images, 1, 1, all_neighbours)
    former = seeded(copied_relative_location_pseudo_labels, images, 1, 1, all_neighbours)
    assert all(torch.equal(a, b) for a, b in zip(ours, former))


def test_the_masked_reconstruction_loss_and_its_gradient_are_the_former_ones():
    images = torch.rand(4, 3, 16, 16)
    mask = patch_mask(4, (16, 16), 4, 0.5, torch.device("cpu"))
    losses, grads = [], []
    for loss_of in (
        lambda r: reconstruction_loss(r, images, mask, "masked"),
        lambda r: masked_reconstruction_loss(r, images, mask),
    ):
        reconstruction = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        loss = loss_of(reconstruction)
        loss.backward()
        losses.append(loss.item())
        grads.append(reconstruction.grad)
    assert math.isclose(losses[0], losses[1], rel_tol=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-12)
    assert grads[0][~mask.expand_as(images)].abs().max() == 0  # the visible pixels get no gradient


def test_the_covariance_term_is_the_one_torch_cov_gives():
    z = torch.randn(32, 16) * torch.rand(16) + torch.rand(16)
    cov = torch.cov(z.t())
    expected = (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]
    assert torch.allclose(covariance_term(z), expected, rtol=1e-5)
