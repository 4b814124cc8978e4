"""``supervised_scratch``: the encoder trained from scratch, with augmentation, on the labeled images only.

The reference a fusion of frozen pretext features has to beat: the same labeled subset, the same
test split and the same encoder architecture, but no pretext and no unlabeled image. It trains on
images, not on cached features, so the fuse stage hands it the stage context (``needs_images``).
Protocol as for the heads: the number of steps is chosen on the same stratified validation part
of the labeled set, then the network is retrained on all labeled images for that many steps, along the
very learning-rate schedule it was validated with (the cosine over ``steps``, stopped at the chosen step;
``refit: false`` keeps the best validation checkpoint instead: early stopping, half the time).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from ssl_fusion.baselines import BASELINES
from ssl_fusion.config import LabelsConfig, as_plain
from ssl_fusion.data.augment import random_shift_flip
from ssl_fusion.data.splits import EvaluationConfig, split_validation
from ssl_fusion.evaluation.probe import extract_features
from ssl_fusion.evaluation.result import FuseResult, Predictions, titled
from ssl_fusion.fusion import FusionMethod, schedule_rules
from ssl_fusion.fusion.protocol import changed_options
from ssl_fusion.fusion.training import score, split_metrics
from ssl_fusion.models.encoders import EncoderConfig, build_encoder
from ssl_fusion.runtime.checks import Checked, Rule, at_least, within
from ssl_fusion.runtime.device import autocast, grad_scaler, prepare_model
from ssl_fusion.runtime.errors import UserError

if TYPE_CHECKING:  # the stages hand their context in; importing them here would be a cycle
    from ssl_fusion.stages.context import StageContext

log = logging.getLogger("sslfuse")


@dataclass
class SupervisedScratchConfig(Checked):
    section: ClassVar[str] = "fusion"
    name: str = MISSING
    steps: int = 1500  # optimizer steps of the selection run; the best count on validation is refit
    eval_every: int = 100
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05  # AdamW (decoupled)
    max_shift: float = 0.1  # random shift by up to this fraction of the image size; half of each batch mirrored
    val_fraction: float = 0.2
    refit: bool = True  # false: keep the best validation checkpoint (trained on the fit part only)

    def rules(self) -> dict[str, Rule]:
        return {
            **schedule_rules(self.steps),
            "weight_decay": at_least(0),
            "max_shift": within(0, 0.5, "[)"),
            "val_fraction": within(0, 1, "()"),
        }


@dataclass
class Selection:
    """The step count chosen on the validation part, and its score there."""

    steps: int
    val_accuracy: float
    val_nll: float


EvalHook = Callable[[int, nn.Sequential], None]


def train_network(
    cfg: SupervisedScratchConfig,
    encoder_cfg: EncoderConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    on_eval: Optional[EvalHook] = None,
) -> tuple[nn.Sequential, list[float]]:
    """Encoder + linear classifier trained on augmented uint8 ``images`` for the first ``steps`` (<= ``cfg.steps``)
    AdamW steps of the cosine schedule over ``cfg.steps``: a run stopped early takes the same learning rate at
    every step as the full one. ``on_eval(step, network)`` every ``cfg.eval_every`` steps. Returns the network
    and the loss curve."""
    if not 1 <= steps <= cfg.steps:
        raise ValueError(f"steps must be in [1, cfg.steps] = [1, {cfg.steps}], got {steps}")
    torch.manual_seed(seed)
    encoder = build_encoder(encoder_cfg, images.shape[1])
    encoder.set_statistics(images)
    network = prepare_model(nn.Sequential(encoder, nn.Linear(encoder.out_dim, num_classes)), device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    scaler = grad_scaler(device, dtype)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(cfg.batch_size, len(labels))
    losses = []
    network.train()
    for step in range(1, steps + 1):
        index = torch.randperm(len(labels), generator=generator)[:batch_size]
        batch = random_shift_flip(images[index].to(device).float().div_(255), cfg.max_shift)
        with autocast(device, dtype):
            logits = network(batch.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        losses.append(loss.item())
        if on_eval is not None and step % cfg.eval_every == 0:
            on_eval(step, network)
            network.train()
    network.eval()
    return network, losses


def predict_proba(
    network: nn.Sequential, images: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    encoder, classifier = network
    features = extract_features(encoder, images, 1024, device, dtype)
    with torch.no_grad():
        return classifier(features.to(device)).float().softmax(1).cpu()


def fit_selected(
    cfg: SupervisedScratchConfig,
    encoder_cfg: EncoderConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> tuple[nn.Sequential, Selection, list[float]]:
    """Choose the step count on the heads' validation split of the labeled set, then refit on all of it along the
    selection run's schedule up to that step (or keep the best validation checkpoint). Returns the network, the
    selection and the final loss curve."""
    fit, val = split_validation(labels, cfg.val_fraction, seed)
    if len(fit) == 0:
        raise UserError(
            f"fusion=supervised_scratch: all {len(labels)} labeled images go to validation (fusion.val_fraction="
            f"{cfg.val_fraction}, at least one per class), none is left to train on; give more labels "
            "(labels.per_class >= 2)"
        )
    best: Optional[Selection] = None
    best_state: Optional[dict[str, torch.Tensor]] = None

    def record(step: int, network: nn.Sequential) -> None:
        nonlocal best, best_state
        accuracy, nll = score(predict_proba(network, images[val], device, dtype), labels[val])
        log.info("supervised_scratch step %d/%d: validation accuracy %.4f", step, cfg.steps, accuracy)
        if best is None or (accuracy, -nll) > (best.val_accuracy, -best.val_nll):
            best = Selection(step, accuracy, nll)
            best_state = None if cfg.refit else copy.deepcopy(network.state_dict())

    network, losses = train_network(
        cfg, encoder_cfg, images[fit], labels[fit], num_classes, cfg.steps, device, dtype, seed, record
    )
    assert best is not None
    if not cfg.refit:
        network.load_state_dict(best_state)
        return network, best, losses[: best.steps]
    network, losses = train_network(cfg, encoder_cfg, images, labels, num_classes, best.steps, device, dtype, seed)
    return network, best, losses


@BASELINES.register("supervised_scratch", SupervisedScratchConfig)
class SupervisedScratch(FusionMethod):
    """Not a head over features: ``evaluate`` trains on the stage's images and returns a fuse result record."""

    needs_images: ClassVar[bool] = True

    def __init__(
        self, cfg: SupervisedScratchConfig, feature_dims: Optional[list[int]] = None, num_classes: int = 0
    ) -> None:
        """Same signature as a head's (dims are unused): the stages build every method before any work."""
        self.cfg = cfg

    def evaluate(
        self, ctx: StageContext, labels_cfg: LabelsConfig, seed: int, evaluation: Optional[EvaluationConfig] = None
    ) -> FuseResult:
        """Train on the protocol's labeled subset for ``seed``, score on the evaluation split (default: test): the
        same record as a head's."""
        evaluation = evaluation or EvaluationConfig()
        data = ctx.data
        labeled = evaluation.labeled(labels_cfg, data.train_labels, seed)
        dev = evaluation.dev_rows(data.train_labels)
        evaluated = torch.arange(len(data.test_labels)) if dev is None else dev
        images, eval_labels = (
            (data.test_images, data.test_labels) if dev is None else (data.train_images[dev], data.train_labels[dev])
        )
        started = time.perf_counter()
        network, selection, losses = fit_selected(
            self.cfg,
            ctx.encoder_cfg,
            data.train_images[labeled],
            data.train_labels[labeled],
            data.num_classes,
            ctx.device,
            ctx.dtype,
            seed,
        )
        probs = predict_proba(network, images, ctx.device, ctx.dtype)
        options = changed_options(self.cfg, BASELINES)
        return FuseResult(
            method=f"{titled(self.cfg.name, options)}({ctx.encoder_cfg.name})",
            title=titled(self.cfg.name, options),
            family=self.cfg.name,
            options=options,
            pretexts=[],
            classes=data.classes,
            labels=labels_cfg.fields(labeled, seed, data.train_labels),
            metrics=split_metrics(evaluation.split, probs, eval_labels),
            selection={
                "selected_l2": None,  # no L2 grid: a fixed AdamW weight decay (fusion_config)
                "selected_steps": selection.steps,
                "val_accuracy": selection.val_accuracy,
                "selection": "validation split" if self.cfg.refit else "validation split, best checkpoint",
            },
            split=evaluation.split,
            evaluation=evaluation.record(evaluated, eval_labels),
            details={
                "first_loss": losses[0],
                "final_loss": losses[-1],
                "fit_seconds": time.perf_counter() - started,
                "fusion_config": as_plain(self.cfg),
            },
            predictions=Predictions(probs.argmax(1).numpy(), eval_labels.numpy()),
        )
