"""Which implementation of a kernel runs: the job's switch (``training.kernels``) and the device decide.

- ``off``: the runtime keeps the naive torch expression (the kernels are not called);
- ``reference``: the plain-torch twin of every kernel (chunked, custom backward), on any device;
- ``auto`` (the default): Triton where it can run (a CUDA tensor and triton installed), else the reference twin.

Triton also runs CPU tensors under ``TRITON_INTERPRET=1`` (the tests); ``auto`` never picks that, a caller asks for it
with ``backend="triton"``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

KERNEL_MODES = ("auto", "reference", "off")
KernelMode = Literal["auto", "reference", "off"]
Backend = Literal["triton", "reference"]
BACKENDS = ("triton", "reference")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``'s tensors here."""
    if not triton_installed():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def backend_for(mode: str, device: torch.device) -> Backend | None:
    """The backend ``mode`` (one of KERNEL_MODES) picks on ``device``; None for ``off`` (use the naive expression)."""
    assert mode in KERNEL_MODES, f"kernel mode {mode!r} is not one of {KERNEL_MODES}"
    if mode == "off":
        return None
    if mode == "auto" and device.type == "cuda" and triton_usable(device):
        return "triton"
    return "reference"


def resolve(backend: str | None, device: torch.device) -> Backend:
    """``backend`` checked (``None``: what ``auto`` picks on ``device``); a ValueError when Triton cannot run there."""
    if backend is None:
        return backend_for("auto", device)  # type: ignore[return-value]
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {BACKENDS}")
    if backend == "triton" and not triton_usable(device):
        why = "triton is not installed" if not triton_installed() else (
            f"{device.type} tensors need a GPU or TRITON_INTERPRET=1")
        raise ValueError(f"the triton backend cannot run here: {why}; use backend='reference'")
    return backend  # type: ignore[return-value]


def triton_module():
    """kernels.triton_kernels, imported on first use (it imports triton)."""
    from kernels import triton_kernels

    return triton_kernels
