"""What every stage starts from: the checked config pieces, the dataset, the device and the store."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ssl_fusion.config import TrainOverrides, as_plain, check_seeds, load_option
from ssl_fusion.data.datasets import (
    DATASETS,
    DatasetConfig,
    ImageData,
    data_root,
    load_dataset,
    location_key,
    with_location,
)
from ssl_fusion.data.datasets.image_folder import ImageFolderConfig, stream_image_folder
from ssl_fusion.models.encoders import ENCODERS, EncoderConfig
from ssl_fusion.runtime.determinism import set_deterministic
from ssl_fusion.runtime.device import configure_backends, resolve_device, resolve_precision
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.tracking import Tracker
from ssl_fusion.store.files import ArtifactStore

log = logging.getLogger("sslfuse")


@dataclass
class StageContext:
    dataset_cfg: DatasetConfig
    data: ImageData
    encoder_cfg: EncoderConfig
    device: torch.device
    dtype: torch.dtype
    store: ArtifactStore
    overrides: TrainOverrides
    seed: int  # the pretraining seed of the encoders this stage makes or reads
    pretrain_dataset_cfg: Optional[DatasetConfig] = None  # None: encoders are pretrained on ``data``
    pretrain_data: Optional[ImageData] = None
    tracker: Tracker = dataclasses.field(default_factory=Tracker)  # where pretraining is recorded (default: nowhere)
    backends: dict[str, bool] = dataclasses.field(default_factory=dict)  # ``configure_backends``'s flags

    @property
    def fingerprints(self) -> dict[str, str]:
        return self.data.fingerprints

    @property
    def pretraining(self) -> ImageData:
        """The images sslfuse's own encoders are pretrained on: ``pretrain_dataset``, else the downstream data."""
        return self.pretrain_data if self.pretrain_data is not None else self.data

    def for_pretraining(self) -> StageContext:
        """This context with the pretraining data as its data: what pretraining reads."""
        if self.pretrain_data is None:
            return self
        return dataclasses.replace(self, dataset_cfg=self.pretrain_dataset_cfg, data=self.pretrain_data)


@functools.lru_cache(maxsize=4)
def _load_dataset_cached(
    dataset_yaml: str, data_dir: str | None, stream: bool, key: str = "dataset"
) -> tuple[DatasetConfig, ImageData]:
    """Jobs of one multirun share the process: decode each dataset once."""
    return open_dataset(OmegaConf.create(dataset_yaml), data_dir, stream, key)


def open_dataset(node, data_dir: str | None, stream: bool, key: str = "dataset") -> tuple[DatasetConfig, ImageData]:
    """``load_dataset``, except for an image folder: its files are listed, then left on disk for the stage to read
    batch by batch when ``stream``, else decoded (``FolderData.materialise``); either way its fingerprints hash the
    files, so that streamed and decoded give the same artifact keys. In-memory datasets are tensors either way.
    ``data_dir``: the folder used when the dataset's own ``data_dir`` is unset; ``key``: the config key named in
    errors."""
    given = DATASETS.typed_config(node, key=key)
    if not isinstance(given, ImageFolderConfig):
        return load_dataset(node, data_dir, key)
    cfg = with_location(given, data_dir)
    folder = stream_image_folder(cfg, data_root(cfg.data_dir, location_key(key, given, data_dir)))
    return cfg, folder if stream else folder.materialise()


def open_context(
    cfg: DictConfig, encoder_seed: int, stream: bool = False, tracker: Optional[Tracker] = None
) -> StageContext:
    """Check the shared keys, load the dataset, pick device and precision; ``encoder_seed`` picks the encoders.
    ``stream``: leave an image folder on disk (``open_dataset``), for a stage that only encodes its images;
    ``tracker``: where the encoders it pretrains are recorded (None: nowhere)."""
    check_seeds(cfg)
    overrides: TrainOverrides = OmegaConf.to_object(cfg.train)
    OmegaConf.to_object(cfg.probe)  # refuses a probe option out of range before any work
    if overrides.num_threads:
        torch.set_num_threads(overrides.num_threads)
    set_deterministic(cfg.deterministic)
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    backends = configure_backends(device, cfg.deterministic)
    encoder_cfg = ENCODERS.typed_config(cfg.encoder, key="encoder")
    dataset_cfg, data = _load_dataset_cached(OmegaConf.to_yaml(cfg.dataset), cfg.data_dir, stream)
    log.info(
        "dataset %s: %d train / %d test images, %d classes, %dx%d px, %d channel(s); device %s, precision %s",
        dataset_cfg.name,
        len(data.train_labels),
        len(data.test_labels),
        data.num_classes,
        *data.image_size,
        data.channels,
        device,
        str(dtype).removeprefix("torch."),
    )
    pretrain_cfg, pretrain_data = pretraining_dataset(cfg, dataset_cfg, stream)
    return StageContext(
        dataset_cfg,
        data,
        encoder_cfg,
        device,
        dtype,
        ArtifactStore(cfg.artifacts_dir),
        overrides,
        encoder_seed,
        pretrain_cfg,
        pretrain_data,
        tracker or Tracker(),
        backends,
    )


def pretraining_dataset(
    cfg: DictConfig, dataset_cfg: DatasetConfig, stream: bool = False
) -> tuple[Optional[DatasetConfig], Optional[ImageData]]:
    """``pretrain_dataset`` (an option's name, or a dataset config) when it names other data than ``dataset``;
    (None, None) when it is unset or the same. It is read from its own ``pretrain_dataset.data_dir``, else from
    ``outputs/data``: the top-level ``data_dir`` is the downstream dataset's."""
    node = cfg.get("pretrain_dataset")
    if node is None:
        return None, None
    try:
        typed = pretraining_config(node)
        if same_data(typed, dataset_cfg):
            return None, None
        yaml = OmegaConf.to_yaml(OmegaConf.structured(typed))
        pretrain_cfg, pretrain_data = _load_dataset_cached(yaml, None, stream, "pretrain_dataset")
    except UserError as err:
        raise err if str(err).startswith("pretrain_dataset") else UserError(f"pretrain_dataset: {err}") from None
    log.info(
        "pretraining dataset %s: %d train images, %dx%d px, %d channel(s)",
        pretrain_cfg.name,
        len(pretrain_data.train_labels),
        *pretrain_data.image_size,
        pretrain_data.channels,
    )
    return pretrain_cfg, pretrain_data


def pretraining_config(node) -> DatasetConfig:
    """``pretrain_dataset`` as a typed dataset config: a dataset's name (its YAML as is) or a config with a name."""
    if isinstance(node, str):
        return load_option(DATASETS, node)
    if OmegaConf.is_dict(node) or isinstance(node, dict):
        return DATASETS.typed_config(node, key="pretrain_dataset")
    raise UserError(
        f"pretrain_dataset must be a dataset's name ({', '.join(DATASETS.names())}) or a dataset config "
        f"such as {{name:fashion_mnist,data_dir:<folder>}}, got {node!r}"
    )


def same_data(pretrain_cfg: DatasetConfig, dataset_cfg: DatasetConfig) -> bool:
    """Whether ``pretrain_dataset`` names the downstream dataset: the same config, where an unset ``data_dir`` means
    the downstream dataset's folder."""
    plain = as_plain(pretrain_cfg)
    if pretrain_cfg.data_dir is None:
        plain["data_dir"] = dataset_cfg.data_dir
    return plain == as_plain(dataset_cfg)
