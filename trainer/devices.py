"""Which device a process computes on: a CUDA GPU, another accelerator (Apple MPS, Intel
XPU), or the CPU; one rule for `trainer train`, `evaluate` and `predict`.

Accelerate picks the device itself unless told `cpu=True`; we tell it so only when no
accelerator is there at all (then torchrun on CPU gives gloo DDP), never merely because CUDA
is missing, which would leave a Mac's or an Intel GPU's accelerator idle.
"""

from __future__ import annotations

import torch


def accelerator_type() -> str | None:
    """'mps', 'cuda' or 'xpu', in the order Accelerate's `PartialState.default_device`
    prefers them, or None on a machine with none of them."""
    if torch.backends.mps.is_available():
        return "mps"
    if torch.cuda.is_available():
        return "cuda"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return None


def compute_device() -> torch.device:
    """The device a process outside Accelerate (a `Predictor`) computes on."""
    return torch.device(accelerator_type() or "cpu")


def cpu_only() -> bool:
    """Accelerate's `cpu` argument: True only where no accelerator is there."""
    return accelerator_type() is None
