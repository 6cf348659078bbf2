"""Uniform integer grids for weight quantization (GPTQ's min-max quantizer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import native

_TINY = torch.finfo(torch.float32).tiny
_SHRINK_STEPS = 80  # mse grid: range factors 1, 0.99, ..., 0.21 (GPTQ: maxshrink 0.8, grid 100)
_MSE_NORM = 2.4     # the error norm GPTQ's grid search minimises
_MSE_ROWS = 4096    # the mse search runs on this many rows at a time: its temporaries stay in cache


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized: a per-output-row grid, optionally per group of input columns.

    A grid is scale s and integer zero point z; a weight x is stored as the integer
    k = clamp(round(x / s) + z, 0, 2^bits - 1) and reads back as s · (k - z).
    The default is GPTQ's asymmetric min-max grid over [min(x, 0), max(x, 0)]; `sym` uses
    [-max|x|, max|x|] with z = 2^(bits-1). Both grids contain 0 exactly, so pruned weights
    stay exactly zero after quantization.

    Attributes:
        bits: 2..8 bits per weight.
        sym: symmetric grid instead of asymmetric min-max.
        groupsize: one grid per `groupsize` consecutive input columns (None: one per row).
        act_order: GPTQ processes columns in order of decreasing H_jj (only `gptq` supports it).
        mse: shrink each row's range [min, max] to p·[min, max], p = 1, 0.99, ..., 0.21, taking
            the p with the least sum |x - q(x)|^2.4 over the row (GPTQ's `mse` grid search):
            clipping a few outliers buys finer steps for all other weights. On the CPU with
            the compiled kernels (native.mse_grid, about 3x faster) the sums round differently:
            where two ranges tie within about 1e-6 the other one can be chosen.

    Example:
        >>> spec = QuantSpec(bits=4, groupsize=128)
        >>> W = torch.randn(8, 256)
        >>> scale, zero = spec.grid(W[:, :128])
        >>> Wq = spec.quantize(W[:, :128], scale[:, None], zero[:, None])
    """

    bits: int = 4
    sym: bool = False
    groupsize: int | None = None
    act_order: bool = False
    mse: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got {self.bits!r}")
        if self.groupsize is not None and (
            isinstance(self.groupsize, bool) or not isinstance(self.groupsize, int) or self.groupsize < 1
        ):
            raise ValueError(f"groupsize must be None or an int >= 1, got {self.groupsize!r}")

    @property
    def maxq(self) -> int:
        """Largest integer level, 2^bits - 1."""
        return 2**self.bits - 1

    def n_groups(self, d_in: int) -> int:
        """Number of grids per output row for an input width of d_in."""
        return 1 if self.groupsize is None else -(-d_in // self.groupsize)

    def grid(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """Min-max grid for each row of W (rows, cols): scale and zero point, both (rows,) fp32;
        with `mse`, the range shrunk per row to the least |x - q(x)|^2.4 error.

        The range always includes 0; an all-zero row gets the range [-1, 1] (as in GPTQ) so its
        scale is positive.
        """
        compiled = self.mse and W.device.type == "cpu" and native.available()
        if self.mse and not compiled and W.shape[0] > _MSE_ROWS:  # rows are independent: the same grids, 2.5x faster
            parts = [self.grid(W[i : i + _MSE_ROWS]) for i in range(0, W.shape[0], _MSE_ROWS)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        W = W.to(torch.float32)
        xmin = W.amin(dim=1).clamp(max=0)
        xmax = W.amax(dim=1).clamp(min=0)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        empty = xmax == xmin
        xmin = xmin.masked_fill(empty, -1.0)
        xmax = xmax.masked_fill(empty, 1.0)
        scale, zero = self._range_grid(xmin, xmax)
        if not self.mse:
            return scale, zero
        if compiled:  # the same search in one pass per row (native.mse_grid)
            return native.mse_grid(W.contiguous(), xmin, xmax, maxq=self.maxq, steps=_SHRINK_STEPS, tiny=_TINY,
                                   sym_zero=float(2 ** (self.bits - 1)) if self.sym else None)
        # Zeros quantize to exactly +0 on every grid, so their error terms are exactly 0: on a
        # pruned W only the survivors are quantized, their errors put into a zero tensor of W's
        # shape, and the row sums are those of the whole tensor, bit for bit.
        values = W.reshape(-1)  # a copy when W is a view: made once
        flat = values.nonzero().squeeze(1)
        if flat.numel() < W.numel() // 2:  # mostly zeros (a pruned W): quantizing only the survivors pays
            x, rows = values[flat], torch.div(flat, W.shape[1], rounding_mode="floor")
            errors = torch.zeros(W.shape, dtype=W.dtype, device=W.device)
        else:
            flat = None
        best = torch.full_like(scale, float("inf"))
        for i in range(_SHRINK_STEPS):
            p = 1 - i / 100
            s, z = self._range_grid(p * xmin, p * xmax)
            if flat is None:
                err = self.quantize(W, s[:, None], z[:, None]).sub_(W).abs_().pow_(_MSE_NORM).sum(dim=1)
            else:
                e = self.quantize(x, s.index_select(0, rows), z.index_select(0, rows)).sub_(x).abs_().pow_(_MSE_NORM)
                errors.view(-1).index_copy_(0, flat, e)
                err = errors.sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        return scale, zero

    def group_grids(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """`grid` of every group of `groupsize` consecutive columns of W (rows, cols), as
        (n_groups, rows) scales and zero points: the equal-width groups in one batched call (the
        rows are independent, so each group's grid is the one `grid` gives it alone)."""
        rows, cols = W.shape
        gs = cols if self.groupsize is None else self.groupsize
        full = cols // gs
        scales, zeros = [], []
        if full:
            batch = W[:, : full * gs].reshape(rows, full, gs).transpose(0, 1).reshape(full * rows, gs)
            s, z = self.grid(batch)
            scales.append(s.reshape(full, rows))
            zeros.append(z.reshape(full, rows))
        if full * gs < cols:  # a narrower last group
            s, z = self.grid(W[:, full * gs :])
            scales.append(s[None])
            zeros.append(z[None])
        return torch.cat(scales), torch.cat(zeros)

    def _range_grid(self, xmin: Tensor, xmax: Tensor) -> tuple[Tensor, Tensor]:
        scale = ((xmax - xmin) / self.maxq).clamp(min=_TINY)
        if self.sym:
            zero = torch.full_like(scale, float(2 ** (self.bits - 1)))
        else:
            zero = torch.round(-xmin / scale)
        return scale, zero

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Nearest grid value s · (clamp(round(x / s) + z, 0, maxq) - z); scale/zero broadcast."""
        k = torch.round(x / scale).add_(zero).clamp_(0, self.maxq)
        return k.sub_(zero).mul_(scale)
