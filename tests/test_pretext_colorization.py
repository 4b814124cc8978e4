from __future__ import annotations

import copy

import pytest
import torch
from pretext_check import CPU, assert_loss_falls, knn_of, tiny_encoder

from ssl_fusion.data.datasets import ImageData, load_dataset
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.pretexts.colorization import (
    AB_SCALE,
    ColorizationConfig,
    colorization_pairs,
    lab_to_rgb,
    rgb_to_lab,
)
from ssl_fusion.pretexts.trainer import train_pretext
from ssl_fusion.runtime.device import resolve_precision
from ssl_fusion.runtime.errors import UserError


def colour(*rgb: float) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    "rgb, lab",
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
        ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),
        ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
        ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0)),
    ],
)
def test_rgb_to_lab_matches_reference_values(rgb, lab):
    assert torch.allclose(rgb_to_lab(colour(*rgb)).flatten(), torch.tensor(lab), atol=0.01)


def test_lab_to_rgb_inverts_rgb_to_lab_even_under_bf16_autocast():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16)
    images[0] = 0.0  # the linear segments near black
    images[1] = 1.0
    assert torch.allclose(lab_to_rgb(rgb_to_lab(images)), images, atol=1e-3)
    with torch.autocast("cpu", torch.bfloat16):
        lab = rgb_to_lab(images)
    assert lab.dtype == torch.float32 and torch.allclose(lab, rgb_to_lab(images))


def test_the_encoder_sees_no_colour_and_the_target_is_the_true_ab():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 12, 12)
    lightness, ab = colorization_pairs(images)
    assert lightness.shape == images.shape and ab.shape == (6, 2, 12, 12)
    assert torch.equal(lightness[:, 0], lightness[:, 1]) and torch.equal(lightness[:, 0], lightness[:, 2])
    assert torch.allclose(lightness[:, 0] * 100, rgb_to_lab(images)[:, 0])
    assert ab.abs().max() <= 1
    # L from the input and the target's a, b give back the original colours.
    restored = lab_to_rgb(torch.cat([lightness[:, :1] * 100, ab * AB_SCALE], dim=1))
    assert torch.allclose(restored, images, atol=1e-3)
    # Gray images have no colour to predict.
    _, gray_ab = colorization_pairs(images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1))
    assert gray_ab.abs().max() < 1e-3


def test_a_few_steps_lower_the_loss_under_bf16_channels_last():
    torch.manual_seed(0)
    _, data = load_dataset({"name": "synthetic", "channels": 3, "n_train": 64, "n_test": 8, "image_size": 16}, None)
    images = data.train_images.float() / 255
    encoder = tiny_encoder(3)
    model = PRETEXTS.get("colorization").impl(ColorizationConfig(name="colorization"), encoder)
    model = model.to(memory_format=torch.channels_last)
    assert_loss_falls(model, images, data.train_labels, 0.5, bf16=True)


def test_check_refuses_a_grayscale_dataset():
    check = PRETEXTS.get("colorization").impl.check
    _, rgb = load_dataset({"name": "synthetic", "channels": 3, "n_train": 8, "n_test": 8}, None)
    check(ColorizationConfig(name="colorization"), rgb)
    _, gray = load_dataset({"name": "synthetic", "channels": 1, "n_train": 8, "n_test": 8}, None)
    with pytest.raises(UserError, match=r"^pretext colorization needs RGB images \(3 channels\), but the dataset has 1 channel") as err:
        check(ColorizationConfig(name="colorization"), gray)
    assert "\n" not in str(err.value)


def coloured_classes() -> ImageData:
    """40 synthetic RGB classes: each class prototype is its own colour pattern, so colour follows the class (and its lightness)."""
    _, data = load_dataset(
        {"name": "synthetic", "channels": 3, "num_classes": 40, "n_train": 2000, "n_test": 500, "image_size": 16, "noise": 0.4}, None
    )
    return data


def as_lightness(data: ImageData) -> ImageData:
    """The same images as the colorization encoder's input: L / 100 in all three channels, as uint8."""

    def lightness(images: torch.Tensor) -> torch.Tensor:
        return (colorization_pairs(images.float() / 255)[0] * 255).round().to(torch.uint8).contiguous()

    return ImageData(lightness(data.train_images), data.train_labels, lightness(data.test_images), data.test_labels, data.classes)


@pytest.fixture(scope="module")
def coloured_knn(tmp_path_factory) -> dict:
    """After a short colorization pretraining on RGB images: the epoch losses and the kNN accuracies
    (trained, untrained) with RGB inputs and with the lightness inputs the pretext trains on."""
    data = coloured_classes()
    torch.manual_seed(0)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn"), data.channels)
    encoder.set_statistics(data.train_images)
    untrained = copy.deepcopy(encoder)
    recipe = ColorizationConfig(name="colorization", epochs=6, batch_size=64, lr=0.005)
    model = PRETEXTS.get("colorization").impl(recipe, encoder).to(memory_format=torch.channels_last)
    checkpoint = tmp_path_factory.mktemp("colorization") / "ckpt.pt"
    result = train_pretext(model, data.train_images, data.train_labels, recipe, CPU, resolve_precision("auto", CPU), 0, checkpoint)
    lightness = as_lightness(data)
    return {
        "losses": result.epoch_losses,
        "rgb": (knn_of(encoder, data), knn_of(untrained, data)),
        "lightness": (knn_of(encoder, lightness), knn_of(untrained, lightness)),
    }


def test_short_pretraining_on_coloured_classes_learns_lightness_features(coloured_knn):
    trained, untrained = coloured_knn["lightness"]
    # Measured (seed 0): kNN 0.740 trained vs 0.586 untrained on lightness inputs, epoch loss 0.222 -> 0.197.
    assert coloured_knn["losses"][-1] < 0.95 * coloured_knn["losses"][0], coloured_knn
    assert trained > untrained + 0.07, coloured_knn


@pytest.mark.xfail(
    strict=True,
    reason="the encoder never sees colour while pretraining, but the probe and the cache feed it RGB: "
    "measured kNN 0.680 trained vs 0.842 untrained on RGB inputs",
)
def test_short_pretraining_on_coloured_classes_keeps_rgb_knn(coloured_knn):
    trained, untrained = coloured_knn["rgb"]
    assert trained >= untrained - 0.02, coloured_knn
