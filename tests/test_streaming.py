"""An image folder streamed from disk while caching: the same features and keys as the folder decoded in memory,
with or without DataLoader workers, and a fingerprint that follows the files' bytes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_fusion.config import CacheConfig, TrainOverrides
from ssl_fusion.data.datasets.image_folder import (
    FolderData,
    FolderImages,
    ImageFolderConfig,
    stream_image_folder,
)
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.models.external import ExternalEncoderConfig
from ssl_fusion.pretexts import Pretext
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.progress import image_progress
from ssl_fusion.stages.caching import ensure_external_features, write_split, write_views
from ssl_fusion.stages.context import StageContext, open_dataset
from ssl_fusion.stages.pretrain import train_encoder
from ssl_fusion.store.artifacts import pretext_recipe
from ssl_fusion.store.files import ArtifactStore

R18 = ExternalEncoderConfig(arch="torchvision:resnet18")


def write_folder(root, classes=3, total=40, size=12) -> None:
    """``total`` random RGB PNGs of ``size`` px spread over ``classes`` class folders (seeded)."""
    generator = np.random.default_rng(0)
    for index in range(total):
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")


def open_folder(root, **options) -> FolderData:
    return stream_image_folder(ImageFolderConfig(name="image_folder", image_size=12, **options), root)


def context(data, store) -> StageContext:
    return StageContext(
        ImageFolderConfig(name="image_folder"),
        data,
        SmallCNNConfig(name="small_cnn"),
        torch.device("cpu"),
        torch.float32,
        ArtifactStore(store),
        TrainOverrides(),
        0,
    )


def cached(ctx: StageContext, num_workers: int) -> tuple[str, dict[str, np.ndarray]]:
    """The external resnet18's features of both splits (random weights, seeded), and the artifact's name."""
    torch.manual_seed(0)
    name, _, reused = ensure_external_features(ctx, "r18", R18, batch_size=16, num_workers=num_workers)
    assert not reused
    folder = ctx.store.folder("features", name)
    return name, {split: np.load(folder / f"{split}.npy") for split in ("train", "test")}


def test_the_streamed_folder_caches_the_features_and_key_of_the_folder_in_memory(tmp_path):
    write_folder(tmp_path / "images")
    folder = open_folder(tmp_path / "images")
    assert isinstance(folder.train_images, FolderImages) and folder.train_images.shape == (32, 3, 12, 12)
    in_memory = folder.materialise()
    assert isinstance(in_memory.train_images, torch.Tensor) and in_memory.fingerprints == folder.fingerprints
    streamed_name, streamed = cached(context(folder, tmp_path / "streamed"), num_workers=0)
    memory_name, memory = cached(context(in_memory, tmp_path / "memory"), num_workers=0)
    assert streamed_name == memory_name  # a fuse of the decoded folder finds the streamed cache
    for split in ("train", "test"):
        assert streamed[split].shape == (len(folder.split(split)[1]), 512)
        np.testing.assert_array_equal(streamed[split], memory[split])


def test_the_decoded_folder_holds_the_pixels_of_the_files(tmp_path):
    write_folder(tmp_path, total=6, size=12)
    folder = open_folder(tmp_path, test_fraction=0.5)
    decoded = folder.materialise().train_images
    for index, file in enumerate(folder.train_images.files):
        assert torch.equal(decoded[index], torch.from_numpy(np.array(Image.open(tmp_path / file))).permute(2, 0, 1))


def tiny_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    encoder.out_dim = 4
    return encoder


def test_workers_give_the_features_of_the_stage_process(tmp_path):
    write_folder(tmp_path / "images")
    ctx = context(open_folder(tmp_path / "images"), tmp_path / "store")
    encoder = tiny_encoder()
    features = {}
    for workers in (0, 2):
        scratch = tmp_path / f"workers{workers}"
        scratch.mkdir()
        with image_progress(enabled=False) as progress:
            write_split(ctx, encoder, "train", 5, scratch, progress, Pretext, num_workers=workers)
        features[workers] = np.load(scratch / "train.npy")
    assert features[0].shape == (32, 4) and np.abs(features[0]).sum() > 0
    np.testing.assert_array_equal(features[0], features[2])


def test_augmented_views_of_the_streamed_folder_are_those_of_the_folder_in_memory(tmp_path):
    write_folder(tmp_path / "images")
    folder = open_folder(tmp_path / "images")
    cache = CacheConfig(batch_size=8, views=2, num_workers=2)
    views = {}
    for name, data in (("streamed", folder), ("memory", folder.materialise())):
        scratch = tmp_path / f"{name}-views"
        scratch.mkdir()
        with image_progress(enabled=False) as progress:
            write_views(context(data, tmp_path / name), tiny_encoder(), Pretext, cache, scratch, progress)
        views[name] = np.load(scratch / "train_views.npy")
    assert views["streamed"].shape == (2, 32, 4) and not np.array_equal(views["streamed"][0], views["streamed"][1])
    np.testing.assert_array_equal(views["streamed"], views["memory"])


def test_the_fingerprint_follows_the_files_bytes(tmp_path):
    write_folder(tmp_path)
    first = open_folder(tmp_path).fingerprints
    assert open_folder(tmp_path).fingerprints == first  # nothing changed: the same key, the cache is reused
    (target,) = [file for file in sorted(tmp_path.rglob("*.png")) if file.name == "7.png"]
    pixels = np.array(Image.open(target))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(target)
    changed = open_folder(tmp_path).fingerprints
    assert changed != first
    assert (
        open_dataset({"name": "image_folder", "image_size": 12}, str(tmp_path), stream=False)[1].fingerprints == changed
    )


def test_an_image_broken_past_its_header_is_refused_in_one_line_while_streaming(tmp_path):
    write_folder(tmp_path / "images")
    broken = tmp_path / "images/class1/4.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header reads, the pixels do not
    ctx = context(open_folder(tmp_path / "images", test_fraction=0.5), tmp_path / "store")
    with pytest.raises(UserError, match=r"cannot read image '.*4\.png'") as caught:
        cached(ctx, num_workers=2)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pretraining_on_a_streamed_folder_learns_the_weights_of_the_folder_in_memory(tmp_path, num_workers):
    """Two steps of rotation pretraining read from disk batch by batch (in the same seeded order, by 0 or 2
    workers) end with exactly the encoder trained on the decoded folder: the same images, order and augmentations."""
    write_folder(tmp_path / "images", total=48)
    streamed = open_folder(tmp_path / "images")
    recipe = dataclasses.replace(pretext_recipe("rotation", TrainOverrides()), batch_size=8, epochs=1)

    def trained(data, store: str) -> dict[str, torch.Tensor]:
        ctx = dataclasses.replace(
            context(data, tmp_path / store), overrides=TrainOverrides(max_steps_per_epoch=2, num_workers=num_workers)
        )
        encoder, result = train_encoder(ctx, recipe, "rotation-test")
        assert len(result.epoch_losses) == 1
        return encoder.state_dict()

    from_disk, in_memory = trained(streamed, "disk"), trained(streamed.materialise(), "memory")
    assert from_disk.keys() == in_memory.keys()
    assert all(torch.equal(from_disk[key], in_memory[key]) for key in in_memory)
    untrained = build_encoder(SmallCNNConfig(name="small_cnn"), 3).state_dict()
    assert any(not torch.equal(from_disk[key], untrained[key]) for key in untrained if key.endswith("weight"))
