"""What every kernel returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True, eq=False)
class KernelResult:
    """A compressed weight matrix and the layer-wise loss the kernel estimated for it.

    Attributes:
        weight: compressed W, same shape, dtype and device as the input.
        loss: accumulated OBS loss, sum over changed entries of (w - q)^2 / U_jj^2 / 2 where w
            is the weight when column j was processed (SparseGPT's `Losses`).
        scales: (d_out, n_groups) fp32 grid scales when quantized, else None.
        zeros: (d_out, n_groups) fp32 integral zero points when quantized, else None.
            Integer code of weight W_ij in group g: round(W_ij / scales[i, g]) + zeros[i, g].
    """

    weight: Tensor
    loss: float
    scales: Tensor | None = None
    zeros: Tensor | None = None
