"""Choosing the device and the arithmetic precision, once, for training and inference."""

from __future__ import annotations

import ctypes
import functools
import platform
from typing import get_args

import torch

from fmnist import FmnistError
from fmnist.config import Precision


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when present, else the CPU; anything else must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FmnistError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FmnistError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device; None means plain fp32.
    "auto" is bf16 where the hardware computes it natively: CUDA devices with bf16 support,
    CPUs with AVX-512 BF16 or AMX (oneDNN's bf16 kernels)."""
    if precision not in get_args(Precision):
        raise FmnistError(f"unknown precision {precision!r}; choose from: {', '.join(get_args(Precision))}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks in the process rather than hand them back to the
    kernel: by default each large CPU tensor a step allocates (the post's first activations,
    13 MB a batch of 128) is mapped afresh and page-faulted in, about a quarter of the post's
    fp32 training step on the 2-core AMD EPYC. Memory the process has used stays reserved for
    it. Process-wide, once; False (and nothing done) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # Blocks of up to 32 MB (glibc's ceiling) come from the heap, and the heap is not trimmed
    # below 1 GB; both settings are needed: either alone leaves the page faults.
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
