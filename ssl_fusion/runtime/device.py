"""Device and precision choice: CUDA when present, else the CPU; channels_last everywhere and bf16
autocast where the hardware computes in bf16 (on a CPU without native bf16, autocast emulates it and
runs several times slower than fp32)."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import ContextManager

import torch
from torch import nn

from ssl_fusion.runtime.distributed import launched
from ssl_fusion.runtime.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_device(name: str) -> torch.device:
    """The device this process computes on. Under torchrun it is the GPU of the process's ``LOCAL_RANK``, made the
    current device here, before anything touches CUDA: otherwise the first CUDA call of every process (a bare
    ``cuda`` tensor, ``torch.cuda.current_device()``) would open a context on cuda:0."""
    if name not in DEVICES:
        raise UserError(f"device: '{name}' is not one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available here; use device=auto or device=cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if not launched():
        return torch.device("cuda")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU instructions that make bf16 convolutions faster than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype; ``auto`` is bf16 where the hardware computes in it natively (recent GPUs,
    CPUs with AVX512-BF16 or AMX), fp16 on older GPUs, fp32 on other CPUs. An explicit ``bf16`` is kept where it is
    emulated (as on such CPUs), and refused only on a GPU that cannot compute in it at all."""
    if name not in PRECISIONS:
        raise UserError(f"precision: '{name}' is not one of {', '.join(PRECISIONS)}")
    if name == "fp32":
        return torch.float32
    if name == "fp16":
        if device.type != "cuda":
            raise UserError("precision=fp16 needs device=cuda; use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type == "cuda" and name == "auto" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16  # V100, T4: bf16 only emulated, several times slower than fp16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return _refuse_bf16()
    if device.type == "cpu" and name == "auto" and not cpu_has_native_bf16():
        return torch.float32
    return torch.bfloat16


def _refuse_bf16() -> torch.dtype:
    raise UserError("precision=bf16 is not supported by this GPU; use precision=fp16 or fp32")


@functools.cache
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` (numbers, or nested tuples of them) as a tensor on ``device``, copied there once per process: made
    in every training step instead, it is a host-to-device copy that the host waits for. Shared: never modify it."""
    with torch.inference_mode(False):  # usable in autograd even when first asked for under inference mode
        return torch.tensor(values, dtype=dtype, device=device)


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast, whose small gradients would otherwise underflow to zero; bf16 (fp32's
    exponent range) and fp32 need none, and get a disabled scaler that passes loss and step through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to the device in channels_last layout (faster convolutions on CPU and GPU)."""
    return model.to(device=device, memory_format=torch.channels_last)


def configure_backends(device: torch.device, deterministic: bool) -> dict[str, bool]:
    """Set, on CUDA only, the global backend flags the stages want, and return them for the manifests (an artifact's
    key holds the device kind, which implies them): cuDNN autotuning (``cudnn.benchmark``: pretraining and caching
    run a few fixed shapes, so the fastest kernel found for each is reused; off under ``deterministic``, whose runs
    must pick the same kernels) and TF32 for fp32 matmuls and convolutions (Ampere and newer: fp32's range with a
    10-bit mantissa, more than the 7 bits bf16 autocast already trains with). The CPU is left as it is."""
    if device.type != "cuda":
        return {"cudnn_benchmark": False, "tf32": False}
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    return {"cudnn_benchmark": not deterministic, "tf32": True}
