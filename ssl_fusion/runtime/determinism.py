"""``deterministic=true``: torch's deterministic algorithms, and cuBLAS's fixed workspace that they need on CUDA.

On CUDA a few backward kernels exist only in a non-deterministic form (atomic adds), and torch raises on them in
deterministic mode in the middle of the first training step. A module built on one says so in its class
(``deterministic_on_cuda = False``, e.g. the decoders' bilinear resize), and pretraining through it is refused in
one line before training starts: ``warn_only`` would train anyway and break the promise the key makes (the same
encoder for the same seed)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ssl_fusion.runtime.errors import UserError

# cuBLAS is deterministic only with a fixed workspace; it reads this when it first starts in the process
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def set_deterministic(deterministic: bool) -> None:
    """Deterministic algorithms on or off for this job (a multirun's next job sets its own). On: the cuBLAS
    workspace fixed, unless the user set ``CUBLAS_WORKSPACE_CONFIG``, before the stage first touches CUDA."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(deterministic)


def refuse_nondeterministic(model: nn.Module, device: torch.device, what: str) -> None:
    """A one-line UserError when deterministic algorithms are on, ``device`` is a GPU and ``model`` (``what``)
    trains through a module that has no deterministic CUDA backward."""
    if not (torch.are_deterministic_algorithms_enabled() and device.type == "cuda"):
        return
    modules = sorted({type(m).__name__ for m in model.modules() if not getattr(m, "deterministic_on_cuda", True)})
    if modules:
        raise UserError(
            f"deterministic=true: {what} trains through {', '.join(modules)}, whose backward torch computes on CUDA "
            "only non-deterministically; set deterministic=false, or device=cpu"
        )
