"""GPTQ (Frantar et al. 2023): one-shot quantization with OBS error compensation."""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.kernels import native
from prunekit.kernels.hessian import factorize
from prunekit.kernels.quant import QuantSpec
from prunekit.kernels.result import KernelResult
from prunekit.kernels.sweep import obs_sweep
from prunekit.kernels.validation import check_blocksize, check_weight


def gptq(
    W: Tensor,
    H: Tensor,
    quant: QuantSpec,
    *,
    percdamp: float = 0.01,
    blocksize: int = 128,
    keep_zeros: bool = True,
) -> KernelResult:
    """Quantize W (d_out, d_in) onto `quant`'s grid, minimising ||W X^T - Ŵ X^T||^2.

    H is the (undamped) Hessian (2/N) X^T X of the layer input. Columns are visited in order
    (by decreasing H_jj with quant.act_order); column j is rounded to the grid and the rounding
    error is compensated on the later columns through U = chol((H + λI)^-1, upper), exactly as
    in SparseGPT. Dead inputs (H_jj = 0) are zeroed.

    With keep_zeros, the exact zeros of W (e.g. from earlier pruning) are a fixed mask: they stay
    exactly 0 and are treated as pruned, so their change (their updated value back to 0) is
    compensated like SparseGPT's masked weights; grids are computed from the surviving weights.

    Grids: one per row, or per group of quant.groupsize input columns computed when the group's
    first column is reached (from the weights updated so far). With act_order and groups, the
    groups are the static groups of the original column order, their grids computed up front
    from W (GPTQ's static_groups), so that every group is a contiguous slice for export.

    Example:
        >>> from prunekit.kernels import QuantSpec, gptq
        >>> X, W = torch.randn(512, 64), torch.randn(32, 64)
        >>> res = gptq(W, 2 / 512 * X.T @ X, QuantSpec(bits=4, groupsize=32))
        >>> res.scales.shape
        torch.Size([32, 2])

    Raises:
        ValueError: invalid arguments, or H not positive definite after damping.
    """
    check_weight(W)
    if not isinstance(quant, QuantSpec):
        raise ValueError(f"quant must be a QuantSpec, got {type(quant).__name__}")
    n = W.shape[1]
    if not isinstance(H, Tensor) or H.shape != (n, n):
        shape = tuple(getattr(H, "shape", ()))
        raise ValueError(f"H must have shape ({n}, {n}) for W of shape {tuple(W.shape)}, got {shape}")
    check_blocksize(blocksize)

    device = W.device
    H = H.detach().to(device)
    Wt = torch.empty(n, W.shape[0], dtype=torch.float32, device=device)
    native.transpose(W.detach(), out=Wt)
    dead = H.diagonal() == 0
    if bool(dead.any()):
        Wt[dead] = 0.0
    fixed_mask = Wt == 0 if keep_zeros else None

    static_grid = None
    perm = None
    if quant.act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        if quant.groupsize is not None:
            # Kept zeros are exact zeros of Wt here, so they do not widen a grid.
            scales, zeros = quant.group_grids(Wt.T)
            static_grid = (scales, zeros, (perm // quant.groupsize).tolist())
        Wt = Wt[perm]
        H = H[perm][:, perm]
        if fixed_mask is not None:
            fixed_mask = fixed_mask[perm]

    factor = factorize(H, percdamp)
    row_loss, scale_t, zero_t = obs_sweep(
        Wt,
        factor,
        blocksize=blocksize,
        fixed_mask=fixed_mask,
        quant=quant,
        static_grid=static_grid,
    )
    if perm is not None:
        unpermuted = torch.empty_like(Wt)
        unpermuted[perm] = Wt
        Wt = unpermuted
    return KernelResult(
        weight=native.transpose(Wt).to(W.dtype),
        loss=float(row_loss.sum()) / 2,
        scales=scale_t.T.contiguous(),
        zeros=zero_t.T.contiguous(),
    )



def rtn(W: Tensor, quant: QuantSpec) -> KernelResult:
    """Round to nearest: every weight of W (d_out, d_in) to the nearest value of its group's grid
    (`QuantSpec.group_grids`: min-max, or the mse-searched range), no error compensation — GPTQ's
    baseline and, with the same grids, what GPTQ improves on. The loss is Σ (w − q)² / 2 (no
    Hessian weighs it). Exact zeros stay zero (every grid holds 0).

    Example:
        >>> res = rtn(torch.randn(32, 64), QuantSpec(bits=4, groupsize=32))
        >>> res.scales.shape
        torch.Size([32, 2])
    """
    check_weight(W)
    Wf = W.detach().to(torch.float32)
    scales, zeros = quant.group_grids(Wf)  # (n_groups, d_out)
    rows, cols = W.shape
    gs = cols if quant.groupsize is None else quant.groupsize
    if cols % gs == 0:  # equal groups: the grids broadcast over a (rows, groups, gs) view
        Q = quant.quantize(Wf.reshape(rows, -1, gs), scales.T[:, :, None], zeros.T[:, :, None]).reshape(rows, cols)
    else:
        group = torch.arange(cols, device=W.device) // gs
        Q = quant.quantize(Wf, scales.T[:, group], zeros.T[:, group])
    return KernelResult(weight=Q.to(W.dtype), loss=float((Wf - Q).pow(2).sum()) / 2,
                        scales=scales.T.contiguous(), zeros=zeros.T.contiguous())
