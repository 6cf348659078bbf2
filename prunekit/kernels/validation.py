"""Argument checks shared by the kernels: clear ValueErrors at the boundary."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_pattern(sparsity: float, prunen: int, prunem: int, d_in: int) -> None:
    """Validate an unstructured sparsity or an N:M pattern (prunen of every prunem columns).

    In N:M mode the pattern fixes the sparsity at prunen/prunem; `sparsity` must then be 0
    or equal to it, so a schedule cannot silently ask for something else.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    for name, v in (("prunen", prunen), ("prunem", prunem)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if prunen == 0 and prunem == 0:
        return
    if not 0 < prunen < prunem:
        raise ValueError(f"N:M pattern needs 0 < prunen < prunem, got {prunen}:{prunem}")
    if d_in % prunem:
        raise ValueError(f"in_features={d_in} is not a multiple of prunem={prunem}")
    if sparsity != 0 and not math.isclose(sparsity, prunen / prunem):
        raise ValueError(
            f"an N:M pattern {prunen}:{prunem} prunes {prunen / prunem:g} of the weights; "
            f"sparsity must be 0 or {prunen / prunem:g}, got {sparsity}"
        )


def check_weight(W: Tensor) -> None:
    """W must be a finite, floating point, non-empty 2-D tensor (d_out, d_in)."""
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise ValueError(f"W must be a 2-D tensor, got shape {tuple(getattr(W, 'shape', ()))}")
    if not W.is_floating_point():
        raise ValueError(f"W must be floating point, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"W is empty, shape {tuple(W.shape)}")
    # min and max propagate NaN, and are much cheaper than isfinite().all() on CPU.
    if not all(math.isfinite(float(v)) for v in torch.aminmax(W.detach())):
        raise ValueError("W contains NaN or Inf")


def check_blocksize(blocksize: int, prunem: int = 0) -> None:
    """blocksize must be a positive int, and a multiple of prunem for N:M patterns."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be an int >= 1, got {blocksize!r}")
    if prunem and blocksize % prunem:
        raise ValueError(f"blocksize={blocksize} must be a multiple of prunem={prunem}")
