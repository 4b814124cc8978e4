"""``sslfuse pretrain``: train one encoder on a pretext task and store it with a kNN probe in its manifest, its
per-epoch history (loss, throughput, probes every ``probe.every_epochs``) and a plot of that history beside it."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig

from ssl_fusion.config import ProbeConfig, as_plain
from ssl_fusion.data.batches import resident
from ssl_fusion.evaluation.probe import (
    extract_features,
    knn_accuracy,
    linear_probe_accuracy,
    probe_subset,
)
from ssl_fusion.models.encoders import Encoder, build_encoder
from ssl_fusion.pretexts import PRETEXTS, Pretext, PretextConfig
from ssl_fusion.pretexts.trainer import EpochRecord, TrainResult, train_pretext, write_failure
from ssl_fusion.runtime import distributed
from ssl_fusion.runtime.determinism import refuse_nondeterministic
from ssl_fusion.runtime.device import prepare_model
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import stage_app
from ssl_fusion.stages.context import StageContext, open_context
from ssl_fusion.stages.tracking import stage_tracker, track_pretraining
from ssl_fusion.store.artifacts import ENCODERS_KIND, encoder_artifact, with_overrides

log = logging.getLogger("sslfuse")

CURVE = "pretraining_curve.png"  # beside the encoder's manifest: its loss and probes per epoch


def probe_encoder(
    ctx: StageContext,
    encoder: Encoder,
    probe: ProbeConfig,
    encoder_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, float]:
    """The standard frozen-feature protocols on (seeded random subsets of) the labeled training and test sets:
    kNN (weighted cosine vote) and a linear probe (L2 logistic regression), both on the stage's device where the
    features stay. ``encoder_input`` (the pretext's) turns the images into what the encoder was trained on."""
    data = ctx.data
    train_images, train_labels = probe_subset(data.train_images, data.train_labels, probe.max_train)
    test_images, test_labels = probe_subset(data.test_images, data.test_labels, probe.max_test)
    bank = extract_features(encoder, train_images, 1024, ctx.device, ctx.dtype, encoder_input, keep_on_device=True)
    queries = extract_features(encoder, test_images, 1024, ctx.device, ctx.dtype, encoder_input, keep_on_device=True)
    return {
        "knn_accuracy": knn_accuracy(bank, train_labels, queries, test_labels, k=probe.k, num_classes=data.num_classes),
        "linear_accuracy": linear_probe_accuracy(bank, train_labels, queries, test_labels, l2=probe.linear_l2),
    }


@dataclass
class History:
    """An encoder's per-epoch history, gathered through the trainer's ``on_epoch`` hook: each trained epoch's record
    and, after every ``probe.every_epochs``-th epoch but the last (probed once trained), the probe scores then."""

    probe: ProbeConfig
    entries: list[dict] = field(default_factory=list)

    def hook(
        self, ctx: StageContext, encoder: Encoder, pretext_cls: type[Pretext], epochs: int
    ) -> Callable[[EpochRecord], None]:
        every = 0 if pretext_cls.ignores_images else self.probe.every_epochs

        def on_epoch(record: EpochRecord) -> None:
            entry = asdict(record)
            if every and record.epoch % every == 0 and record.epoch < epochs:
                entry.update(probe_encoder(ctx, encoder, self.probe, pretext_cls.encoder_input))
                log.info("after epoch %d: %s", record.epoch, probe_summary(entry))
            self.entries.append(entry)

        return on_epoch

    def manifest(self, epoch_losses: list[float], final_probes: dict[str, Optional[float]]) -> list[dict]:
        """One entry per epoch: the loss, the throughput and time of the epochs trained by this run (not those a
        resumed run finished before), the probe scores where measured, the final ones on the last epoch."""
        trained = {entry["epoch"]: entry for entry in self.entries}
        entries = [trained.get(epoch, {"epoch": epoch, "loss": loss}) for epoch, loss in enumerate(epoch_losses, 1)]
        if entries and final_probes["knn_accuracy"] is not None:
            entries[-1] = {**entries[-1], **final_probes}
        return entries


def train_encoder(
    ctx: StageContext, recipe: PretextConfig, name: str, history: Optional[History] = None
) -> tuple[Encoder, TrainResult]:
    """Build and pretrain the encoder of ``recipe``; ``history``, if given, gathers its epochs."""
    pretext_cls: type[Pretext] = PRETEXTS.get(recipe.name).impl
    recipe = pretext_cls.adapt(recipe, ctx.data)
    pretext_cls.check(recipe, ctx.data)
    torch.manual_seed(ctx.seed)
    encoder = build_encoder(ctx.encoder_cfg, ctx.data.channels)
    encoder.set_statistics(ctx.data.train_images, pretext_cls.encoder_input)
    pretext = pretext_cls(recipe, encoder)
    refuse_nondeterministic(pretext, ctx.device, f"pretext {recipe.name}")
    model = prepare_model(pretext, ctx.device)
    if not pretext_cls.trains:
        return encoder, TrainResult()
    if ctx.overrides.compile:
        encoder.compile()  # in place: the pretext's calls run the compiled forward, the state dict keeps its keys
    checkpoint = ctx.store.root / "checkpoints" / name / "last.pt"
    result = train_pretext(
        model,
        resident(ctx.data.train_images, ctx.device),
        ctx.data.train_labels,
        recipe,
        ctx.device,
        ctx.dtype,
        ctx.seed,
        checkpoint,
        ctx.overrides.max_steps_per_epoch,
        ctx.overrides.num_workers,
        ctx.overrides.checkpoint_every_minutes,
        ctx.overrides.checkpoint_every_steps,
        None if history is None else history.hook(ctx, encoder, pretext_cls, recipe.epochs),
    )
    return encoder, result


def ensure_encoder(ctx: StageContext, recipe: PretextConfig, probe: ProbeConfig) -> tuple[str, dict, bool]:
    """The stored encoder for this recipe: reused when present, else trained, probed and published.

    Returns its artifact name, its manifest and whether it was reused. Under torchrun every rank
    trains; rank 0 alone holds the store lock, decides, probes and publishes.
    """
    name = encoder_artifact(ctx, recipe, ctx.overrides.max_steps_per_epoch)
    with distributed.main_only(ctx.store.lock(ENCODERS_KIND, name)):
        manifest = distributed.on_main(lambda: ctx.store.manifest(ENCODERS_KIND, name))
        if manifest is not None:
            log.info("reused encoder %s (no pretraining)", name)
            return name, manifest, True
        log.info("pretraining encoder %s", name)
        started = time.perf_counter()
        history = History(probe)
        encoder, result = train_encoder(ctx, recipe, name, history)
        if distributed.is_main():
            manifest = publish_encoder(ctx, recipe, probe, name, encoder, result, history, started)
    return name, distributed.broadcast(manifest), False


def publish_encoder(
    ctx: StageContext,
    recipe: PretextConfig,
    probe: ProbeConfig,
    name: str,
    encoder: Encoder,
    result: TrainResult,
    history: History,
    started: float,
) -> dict:
    """Probe the trained encoder, store it with its manifest and the plot of its history, and drop its checkpoint;
    returns the manifest."""
    pretext_cls: type[Pretext] = PRETEXTS.get(recipe.name).impl
    if pretext_cls.ignores_images:
        probes = {"knn_accuracy": None, "linear_accuracy": None}
    else:
        probes = probe_encoder(ctx, encoder, probe, pretext_cls.encoder_input)
        log.info(
            "encoder %s: kNN probe %.4f, linear probe %.4f", name, probes["knn_accuracy"], probes["linear_accuracy"]
        )
    epochs = history.manifest(result.epoch_losses, probes)
    with ctx.store.staging(ENCODERS_KIND, name) as scratch:
        save_weights(encoder, scratch / "encoder.pt", ctx.store.root / ENCODERS_KIND)
        if epochs:
            save_curve(epochs, name, scratch / CURVE)
        manifest = ctx.store.publish(
            ENCODERS_KIND,
            name,
            scratch,
            {
                "config": {
                    "pretext": as_plain(recipe),
                    "encoder": as_plain(ctx.encoder_cfg),
                    "seed": ctx.seed,
                    "dataset": ctx.dataset_cfg.name,
                    "max_steps_per_epoch": ctx.overrides.max_steps_per_epoch,
                    "batch_size_per_device": ctx.overrides.batch_size_per_device,
                    "lr_scaling": ctx.overrides.lr_scaling,
                    "uses_labels": pretext_cls.uses_labels,
                    "input": pretext_cls.encoder_input_kind,
                },
                "data": {
                    "train": ctx.fingerprints["train"],
                    "channels": ctx.data.channels,
                    "image_size": list(ctx.data.image_size),
                    "n_train": len(ctx.data.train_labels),
                },
                "metrics": {
                    "epoch_losses": result.epoch_losses,
                    "final_loss": (result.epoch_losses or [None])[-1],
                    "history": epochs,
                    **probes,
                    "probe": as_plain(probe),
                },
                "timings": {
                    "train_seconds": result.seconds,
                    "total_seconds": time.perf_counter() - started,
                    "images_per_second": result.images_per_second,
                    "resumed_at_epoch": result.resumed_at_epoch,
                    "resumed_at_step": result.resumed_at_step,
                },
                "runtime": {
                    "device": str(ctx.device),
                    "precision": str(ctx.dtype).removeprefix("torch."),
                    "torch": torch.__version__,
                    "processes": distributed.world_size(),
                    "batch_per_process": result.batch_per_process,
                    "compile": ctx.overrides.compile,
                    **ctx.backends,
                },
            },
        )
    shutil.rmtree(ctx.store.root / "checkpoints" / name, ignore_errors=True)
    return manifest


def save_weights(encoder: Encoder, path: Path, store: Path) -> None:
    """The encoder's weights at ``path``, written through an open file: its failed write raises the OSError (a full
    disk) that ``torch.save`` given a path turns into a bare RuntimeError; refused in one line naming ``store``."""
    try:
        with open(path, "wb") as handle:
            torch.save({k: v.cpu() for k, v in encoder.state_dict().items()}, handle)
    except OSError as err:
        raise UserError(write_failure("the encoder", store, err)) from None


def save_curve(epochs: list[dict], name: str, path: Path) -> None:
    """The plot of the history at ``path``. Its module is imported here: plotting shapes no encoder, so the report
    layer stays out of the code an encoder's key hashes and out of the stages' imports."""
    from ssl_fusion.report.curves import plot_pretraining
    from ssl_fusion.report.figures import save_figure

    save_figure(plot_pretraining(epochs, name), path)


def probe_summary(metrics: dict) -> str:
    if metrics["knn_accuracy"] is None:
        return "no probe (image-free control)"
    return f"kNN probe {metrics['knn_accuracy']:.4f}, linear probe {metrics['linear_accuracy']:.4f}"


@stage_app("pretrain")
def main(cfg: DictConfig) -> None:
    ctx = open_context(cfg, cfg.seed, stream=True, tracker=stage_tracker(cfg)).for_pretraining()
    recipe = with_overrides(PRETEXTS.typed_config(cfg.pretext, key="pretext"), ctx.overrides)
    with distributed.process_group(ctx.device) as device:
        ctx.device = device
        name, manifest, reused = ensure_encoder(ctx, recipe, cfg.probe)
        if not distributed.is_main():
            return
    if not reused:
        track_pretraining(ctx.tracker, ctx.store.folder(ENCODERS_KIND, name), manifest)
    metrics = manifest["metrics"]
    print(
        f"encoder {name} ({'reused' if reused else 'trained'}): {probe_summary(metrics)}, "
        f"final loss {metrics['final_loss']}; stored in {ctx.store.folder(ENCODERS_KIND, name)}"
    )
