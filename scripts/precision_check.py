#!/usr/bin/env python
"""Training images/s of the small CNN under the rotation pretext in fp32 and under bf16 autocast, on the CPU.

Tells whether bf16 pays on this CPU (it does only with native bf16: AVX512-BF16 or AMX).

    .venv/bin/python scripts/precision_check.py [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from ssl_fusion.models.encoders import SmallCNNConfig, small_cnn
from ssl_fusion.pretexts.rotation import Rotation, RotationConfig
from ssl_fusion.runtime.device import autocast, cpu_has_native_bf16, prepare_model


def images_per_second(dtype: torch.dtype, steps: int) -> float:
    """Rotation steps (batch 256, all four rotations) on random images: rotated images per second."""
    torch.manual_seed(0)
    model = prepare_model(
        Rotation(RotationConfig(name="rotation"), small_cnn(SmallCNNConfig(name="small_cnn"), 1)), torch.device("cpu")
    )
    optimizer = torch.optim.AdamW(model.parameters())
    images = torch.rand(256, 1, 28, 28)
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            loss = model.loss(images, torch.zeros(256, dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * 4 * len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fp32 = images_per_second(torch.float32, args.steps)
    bf16 = images_per_second(torch.bfloat16, args.steps)
    print(f"native bf16: {cpu_has_native_bf16()}; threads: {torch.get_num_threads()}")
    print(f"fp32 {fp32:.0f} img/s, bf16 autocast {bf16:.0f} img/s, bf16/fp32 = {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
