from __future__ import annotations

import copy

import pytest
import torch
from pretext_check import CPU, assert_loss_falls, knn_of, tiny_encoder

from ssl_fusion.config import ProbeConfig, TrainOverrides
from ssl_fusion.data.datasets import ImageData, load_dataset
from ssl_fusion.data.datasets.synthetic import SyntheticConfig
from ssl_fusion.evaluation.probe import extract_features
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.pretexts.colorization import (
    AB_SCALE,
    Colorization,
    ColorizationConfig,
    colorization_pairs,
    lab_to_rgb,
    rgb_to_lab,
)
from ssl_fusion.pretexts.trainer import train_pretext
from ssl_fusion.runtime.device import resolve_precision
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.caching import ensure_features, stored_pretext
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.pretrain import ensure_encoder, probe_encoder
from ssl_fusion.store.artifacts import (
    load_encoder,
    load_features,
    pretext_recipe,
)
from ssl_fusion.store.files import ArtifactStore


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
    with pytest.raises(
        UserError, match=r"^pretext colorization needs RGB images \(3 channels\), but the dataset has 1 channel"
    ) as err:
        check(ColorizationConfig(name="colorization"), gray)
    assert "\n" not in str(err.value)


def coloured_classes() -> ImageData:
    """40 synthetic RGB classes: each class prototype is its own colour pattern, so colour follows the class (and its
    lightness)."""
    _, data = load_dataset(
        {
            "name": "synthetic",
            "channels": 3,
            "num_classes": 40,
            "n_train": 2000,
            "n_test": 500,
            "image_size": 16,
            "noise": 0.4,
        },
        None,
    )
    return data


def as_lightness(data: ImageData) -> ImageData:
    """The same images as the colorization encoder's input: L / 100 in all three channels, as uint8."""

    def lightness(images: torch.Tensor) -> torch.Tensor:
        return (colorization_pairs(images.float() / 255)[0] * 255).round().to(torch.uint8).contiguous()

    return ImageData(
        lightness(data.train_images), data.train_labels, lightness(data.test_images), data.test_labels, data.classes
    )


def probe_context(data: ImageData) -> StageContext:
    return StageContext(
        SyntheticConfig(name="synthetic"),
        data,
        SmallCNNConfig(name="small_cnn"),
        CPU,
        resolve_precision("auto", CPU),
        None,
        TrainOverrides(),
        0,
    )


@pytest.fixture(scope="module")
def coloured_knn(tmp_path_factory) -> dict:
    """After a short colorization pretraining on RGB images: the epoch losses and the kNN accuracies
    (trained, untrained) with the lightness inputs the pretext trains on, and from the probe of the pretraining
    stage given the RGB dataset."""
    data = coloured_classes()
    torch.manual_seed(0)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn"), data.channels)
    encoder.set_statistics(data.train_images, Colorization.encoder_input)
    untrained = copy.deepcopy(encoder)
    recipe = ColorizationConfig(name="colorization", epochs=6, batch_size=64, lr=0.005)
    model = PRETEXTS.get("colorization").impl(recipe, encoder).to(memory_format=torch.channels_last)
    checkpoint = tmp_path_factory.mktemp("colorization") / "ckpt.pt"
    result = train_pretext(
        model, data.train_images, data.train_labels, recipe, CPU, resolve_precision("auto", CPU), 0, checkpoint
    )
    lightness = as_lightness(data)
    whole = ProbeConfig(max_train=None, max_test=None)
    probe = [
        probe_encoder(probe_context(data), e, whole, Colorization.encoder_input)["knn_accuracy"]
        for e in (encoder, untrained)
    ]
    return {
        "losses": result.epoch_losses,
        "lightness": (knn_of(encoder, lightness), knn_of(untrained, lightness)),
        "probe": tuple(probe),
    }


@pytest.mark.slow
def test_short_pretraining_on_coloured_classes_learns_lightness_features(coloured_knn):
    trained, untrained = coloured_knn["lightness"]
    # Measured (seed 0): kNN 0.738 trained vs 0.580 untrained on lightness inputs, epoch loss 0.222 -> 0.197.
    assert coloured_knn["losses"][-1] < 0.95 * coloured_knn["losses"][0], coloured_knn
    assert trained > untrained + 0.07, coloured_knn


@pytest.mark.slow
def test_the_probe_of_an_rgb_dataset_feeds_the_encoder_lightness(coloured_knn):
    """The pretraining stage's probe gets the RGB dataset and gives the encoder the lightness it was trained on."""
    trained, untrained = coloured_knn["probe"]
    # Measured (seed 0): kNN 0.740 trained vs 0.572 untrained (fed RGB, the trained encoder had 0.694 vs 0.842).
    assert trained > untrained + 0.07, coloured_knn
    assert trained == pytest.approx(coloured_knn["lightness"][0], abs=0.02), coloured_knn  # uint8 rounding aside


def test_the_pretext_names_the_encoder_input_and_other_pretexts_keep_the_images():
    images = torch.rand(4, 3, 8, 8)
    assert Colorization.encoder_input_kind == "lightness"
    assert torch.equal(Colorization.encoder_input(images), colorization_pairs(images)[0])
    rotation = PRETEXTS.get("rotation").impl
    assert rotation.encoder_input_kind == "images" and rotation.encoder_input(images) is images


@pytest.mark.slow
def test_the_stored_encoder_is_cached_on_lightness_of_the_rgb_images(tmp_path):
    """Pretraining stores a colorization encoder whose statistics are those of lightness and whose manifest records
    it; the cache stage, given the RGB dataset, stores the features of the lightness images."""
    _, data = load_dataset({"name": "synthetic", "channels": 3, "n_train": 64, "n_test": 32, "image_size": 16}, None)
    ctx = StageContext(
        SyntheticConfig(name="synthetic"),
        data,
        SmallCNNConfig(name="small_cnn", widths=[8, 16]),
        CPU,
        torch.float32,
        ArtifactStore(tmp_path),
        TrainOverrides(epochs=1, batch_size=32, max_steps_per_epoch=2),
        0,
    )
    name, manifest, _ = ensure_encoder(ctx, pretext_recipe("colorization", ctx.overrides), ProbeConfig())
    assert manifest["config"]["input"] == "lightness" and manifest["data"]["channels"] == 3
    features_name, _, _ = ensure_features(ctx, name, 16)
    cached = load_features(ctx.store, features_name)

    encoder = load_encoder(ctx.store, name).eval()
    assert torch.equal(encoder.mean[0, 0], encoder.mean[0, 1]) and torch.equal(encoder.mean[0, 0], encoder.mean[0, 2])
    for images, features in ((data.train_images, cached.train), (data.test_images, cached.test)):
        with torch.no_grad():
            expected = encoder(colorization_pairs(images.float() / 255)[0])
        rgb = extract_features(encoder, images, 16, CPU, torch.float32)
        assert torch.allclose(features, expected, rtol=2e-3, atol=2e-3), (
            (features - expected).abs().max()
        )  # stored as float16
        assert (features - rgb).abs().max() > 0.1 * rgb.abs().max()


def test_the_cache_refuses_an_encoder_recorded_as_trained_on_another_input():
    assert stored_pretext({"pretext": {"name": "colorization"}, "input": "lightness"}, "colorization-0") is Colorization
    with pytest.raises(
        UserError, match=r"^encoder 'colorization-0' was trained on images, but pretext 'colorization' feeds"
    ):
        stored_pretext({"pretext": {"name": "colorization"}, "input": "images"}, "colorization-0")
