"""``deterministic=true``: cuBLAS's workspace fixed before CUDA starts, and the pretexts that torch cannot train
deterministically on CUDA refused in one line before training (tested on the CPU with a CUDA device object: the
refusal comes before anything is moved to it)."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from ssl_fusion.config import CONF_DIR, TrainOverrides, load_option
from ssl_fusion.data.datasets import load_dataset
from ssl_fusion.models.encoders import ENCODERS, SmallCNNConfig, build_encoder
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.runtime.determinism import refuse_nondeterministic
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import context
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.pretrain import train_encoder
from ssl_fusion.store.artifacts import pretext_recipe

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
DECODING = {"colorization", "denoising", "inpainting"}  # the pretexts whose decoder resizes bilinearly


@pytest.fixture(autouse=True)
def deterministic_mode_restored():
    yield
    torch.use_deterministic_algorithms(False)


def pretrain_config(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="pretrain", overrides=["preset=smoke", *overrides])


@pytest.mark.parametrize("given, kept", [(None, ":4096:8"), (":16:8", ":16:8")])
def test_the_cublas_workspace_is_fixed_before_the_device_is_chosen(monkeypatch, given, kept):
    """Known truth: torch's deterministic CUDA matmuls need CUBLAS_WORKSPACE_CONFIG set before cuBLAS starts; the
    device is the stage's first touch of CUDA, and a user's own value is kept."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    if given:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", given)
    seen = []
    monkeypatch.setattr(
        context, "resolve_device", lambda name: seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG")) or CPU
    )
    context.open_context(pretrain_config("deterministic=true"), 0)
    assert seen == [kept] and torch.are_deterministic_algorithms_enabled()


def test_a_job_without_deterministic_turns_it_off(monkeypatch):
    """A multirun's jobs share the process: the next job's deterministic=false is not left on by the one before."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    context.open_context(pretrain_config("deterministic=true"), 0)
    context.open_context(pretrain_config("deterministic=false"), 0)
    assert not torch.are_deterministic_algorithms_enabled()


def small_rgb_data():
    return load_dataset({"name": "synthetic", "n_train": 32, "n_test": 16, "channels": 3, "image_size": 32}, None)


def built(name: str) -> torch.nn.Module:
    pretext_cls = PRETEXTS.get(name).impl
    recipe = pretext_cls.adapt(pretext_recipe(name, TrainOverrides()), small_rgb_data()[1])
    return pretext_cls(recipe, build_encoder(SmallCNNConfig(name="small_cnn"), 3))


@pytest.mark.parametrize("name", PRETEXTS.names())
def test_only_the_decoding_pretexts_are_refused_on_cuda(name):
    """Paired comparison: the same model refused on CUDA with deterministic algorithms on, and nowhere else."""
    model = built(name)
    for deterministic, device in [(False, CUDA), (True, CPU)]:
        torch.use_deterministic_algorithms(deterministic)
        refuse_nondeterministic(model, device, f"pretext {name}")
    torch.use_deterministic_algorithms(True)
    if name not in DECODING:
        refuse_nondeterministic(model, CUDA, f"pretext {name}")
        return
    with pytest.raises(UserError, match=f"deterministic=true: pretext {name} trains through VectorDecoder") as err:
        refuse_nondeterministic(model, CUDA, f"pretext {name}")
    assert "\n" not in str(err.value) and "deterministic=false, or device=cpu" in str(err.value)


def test_pretraining_is_refused_before_anything_moves_to_the_gpu():
    dataset_cfg, data = small_rgb_data()
    encoder_cfg = load_option(ENCODERS, "small_cnn")
    ctx = StageContext(dataset_cfg, data, encoder_cfg, CUDA, torch.float32, None, TrainOverrides(), 0)
    torch.use_deterministic_algorithms(True)
    with pytest.raises(UserError, match="pretext inpainting trains through VectorDecoder"):
        train_encoder(ctx, pretext_recipe("inpainting", TrainOverrides()), "inpainting-test")
