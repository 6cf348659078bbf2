"""Pruning by a score, without weight reconstruction: Wanda (Sun et al. 2023) and magnitude."""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.kernels.hessian import HessianFactor
from prunekit.kernels.masks import count_to_prune, n_of_m, smallest
from prunekit.kernels.result import KernelResult
from prunekit.kernels.validation import check_pattern, check_weight


def wanda(
    W: Tensor,
    factor_or_diag: HessianFactor | Tensor,
    sparsity: float,
    *,
    prunen: int = 0,
    prunem: int = 0,
) -> KernelResult:
    """Prune the entries of each output row of W (d_out, d_in) with the smallest |W_ij| · ||X_j||_2.

    ||X_j||_2 is taken as sqrt(H_jj) (H_jj = (2/N)·||X_j||^2, a constant factor that does not
    change the ranking) from factor.diag, or from `factor_or_diag` given as the (d_in,) diagonal
    itself. Unstructured: round(sparsity · d_in) entries per row; N:M: prunen of every prunem
    consecutive entries per row. Ties: lower column first. No weight update.

    Loss: with a factor, the OBS estimate sum over pruned of w^2 / U_jj^2 / 2 = (w · r_j)^2 / 2;
    with a bare diagonal, the diagonal-Hessian estimate sum over pruned of w^2 · H_jj / 2.

    Example:
        >>> from prunekit.kernels import wanda
        >>> X, W = torch.randn(512, 64), torch.randn(32, 64)
        >>> res = wanda(W, (2 / 512 * X.T @ X).diagonal(), 0.5)
        >>> int((res.weight == 0).sum(dim=1).max())
        32
    """
    check_weight(W)
    n = W.shape[1]
    check_pattern(sparsity, prunen, prunem, n)
    if isinstance(factor_or_diag, HessianFactor):
        diag = factor_or_diag.diag
        if factor_or_diag.d_in != n:
            raise ValueError(f"W has in_features={n} but the Hessian factor has d_in={factor_or_diag.d_in}")
    elif isinstance(factor_or_diag, Tensor):
        diag = factor_or_diag.detach()
        if diag.shape != (n,):
            raise ValueError(f"diag must have shape ({n},), got {tuple(diag.shape)}")
        if not bool(torch.isfinite(diag).all()) or bool((diag < 0).any()):
            raise ValueError("diag must be finite and >= 0")
    else:
        kind = type(factor_or_diag).__name__
        raise ValueError(f"factor_or_diag must be a HessianFactor or a tensor, got {kind}")

    W32 = W.detach().to(torch.float32)
    diag = diag.to(device=W.device, dtype=torch.float32)
    scores = W32.abs() * diag.sqrt()
    mask = n_of_m(scores, prunen, prunem) if prunem else smallest(scores, count_to_prune(sparsity, n), dim=1)
    if isinstance(factor_or_diag, HessianFactor):
        cost = W32.square() * factor_or_diag.r.to(W.device).square()
    else:
        cost = W32.square() * diag
    return KernelResult(weight=W.detach().masked_fill(mask, 0), loss=_masked_sum(cost, mask) / 2)


def magnitude(W: Tensor, sparsity: float, *, prunen: int = 0, prunem: int = 0) -> KernelResult:
    """Prune the entries of W (d_out, d_in) with the smallest |W_ij|.

    Unstructured: round(sparsity · W.numel()) entries over the whole matrix (ties: lower
    flat index first); N:M: prunen of every prunem consecutive entries of each row.
    Loss: sum over pruned of w^2 / 2 (the OBS loss for H = I). No weight update.

    Example:
        >>> from prunekit.kernels import magnitude
        >>> res = magnitude(torch.randn(32, 64), 0.75)
        >>> int((res.weight == 0).sum())
        1536
    """
    check_weight(W)
    check_pattern(sparsity, prunen, prunem, W.shape[1])
    scores = W.detach().to(torch.float32).abs()
    mask = n_of_m(scores, prunen, prunem) if prunem else smallest(scores, count_to_prune(sparsity, W.numel()))
    return KernelResult(weight=W.detach().masked_fill(mask, 0), loss=_masked_sum(scores.square(), mask) / 2)


def _masked_sum(values: Tensor, mask: Tensor) -> float:
    return float(values.masked_fill(~mask, 0).sum(dtype=torch.float64))
