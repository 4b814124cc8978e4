"""Device and precision choice: ``auto`` picks bf16 on the CPU only where the CPU computes in bf16."""

from __future__ import annotations

import types

import pytest
import torch

from ssl_fusion.runtime import device as device_module
from ssl_fusion.runtime.device import resolve_device, resolve_precision
from ssl_fusion.runtime.errors import UserError

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_on_cpu_follows_native_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU) == expected


def test_explicit_precisions_are_kept_on_cpu(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    assert resolve_precision("fp32", CPU) == torch.float32


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: resolve_precision("fp16", CPU), "needs device=cuda"),
        (lambda: resolve_precision("half", CPU), "auto, bf16, fp16, fp32"),
        (lambda: resolve_device("tpu"), "auto, cpu, cuda"),
    ],
)
def test_bad_choices_name_what_is_allowed(call, words):
    with pytest.raises(UserError, match=words):
        call()


def test_auto_device_falls_back_to_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize("dtype, scaled", [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)])
def test_only_fp16_gets_a_loss_scaler(dtype, scaled):
    assert device_module.grad_scaler(CPU, dtype).is_enabled() == scaled


def fake_gpu(monkeypatch, major: int, emulates_bf16: bool = True) -> list:
    """torch.cuda as a machine with one GPU of compute capability ``major``.x shows it (torch's own
    ``is_bf16_supported`` runs on it); the list records the CUDA calls that choose or ask the current device."""
    calls: list = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls.append(("current_device",)) or 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulates_bf16)
    return calls


@pytest.mark.parametrize(
    "major, expected",
    [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)],  # V100/T4 (7.x) emulate bf16; A100, H100 do not
)
def test_auto_precision_on_gpus_takes_bf16_only_where_it_is_native(monkeypatch, major, expected):
    fake_gpu(monkeypatch, major, emulates_bf16=True)
    dtype = resolve_precision("auto", torch.device("cuda"))
    assert dtype == expected
    assert device_module.grad_scaler(torch.device("cuda"), dtype).is_enabled() == (dtype == torch.float16)


def test_explicit_bf16_on_a_gpu_is_kept_where_emulated_and_refused_where_impossible(monkeypatch):
    fake_gpu(monkeypatch, 7, emulates_bf16=True)
    assert resolve_precision("bf16", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) == torch.float32
    fake_gpu(monkeypatch, 6, emulates_bf16=False)
    with pytest.raises(UserError, match="precision=bf16 is not supported by this GPU"):
        resolve_precision("bf16", torch.device("cuda"))


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_under_torchrun_each_process_takes_and_sets_its_local_gpu_before_any_other_cuda_call(monkeypatch, name):
    calls = fake_gpu(monkeypatch, 8)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    device = resolve_device(name)
    assert device == torch.device("cuda", 3)
    resolve_precision("auto", device)
    assert calls[0] == ("set_device", torch.device("cuda", 3)) and ("current_device",) in calls[1:]


def test_a_single_process_takes_the_current_gpu_and_sets_none(monkeypatch):
    calls = fake_gpu(monkeypatch, 8)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("auto") == torch.device("cuda") and calls == []
