"""Device and precision choice: ``auto`` picks bf16 on the CPU only where the CPU computes in bf16."""

from __future__ import annotations

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
