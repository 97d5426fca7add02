"""Triton kernels of cbtm (installed as cbtm.kernels).

Importing this package never imports triton: the kernels are built on first use, and every kernel
has a plain-PyTorch reference that is the CPU fallback.
"""
from .mixture import (
    FUSED_MAX_V,
    MAX_EXPERTS,
    mixture_backend,
    weighted_logsumexp,
    weighted_logsumexp_ref,
    weighted_logsumexp_target,
    weighted_logsumexp_target_ref,
    weighted_logsumexp_target_triton,
    weighted_logsumexp_triton,
)

__all__ = [
    "FUSED_MAX_V",
    "MAX_EXPERTS",
    "mixture_backend",
    "weighted_logsumexp",
    "weighted_logsumexp_ref",
    "weighted_logsumexp_target",
    "weighted_logsumexp_target_ref",
    "weighted_logsumexp_target_triton",
    "weighted_logsumexp_triton",
]
