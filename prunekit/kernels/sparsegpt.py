"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS weight reconstruction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from prunekit.kernels import native
from prunekit.kernels.hessian import HessianFactor
from prunekit.kernels.quant import QuantSpec
from prunekit.kernels.result import KernelResult
from prunekit.kernels.sweep import obs_sweep
from prunekit.kernels.validation import check_blocksize, check_pattern, check_weight


def sparsegpt(
    W: Tensor,
    factor: HessianFactor,
    sparsity: float,
    *,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    quant: QuantSpec | None = None,
) -> KernelResult:
    """Prune W (d_out, d_in) to `sparsity`, minimising ||W X^T - Ŵ X^T||^2 column by column.

    Dead inputs (factor.dead) are zeroed first. Then columns are visited left to right; at the
    start of each block of `blocksize` columns the round(sparsity · d_out · block_width)
    entries of the block with the smallest OBS cost w^2 / U_jj^2 are pruned (ties: lower
    position), using the weights as updated by all earlier columns. With prunen:prunem instead,
    prunen of every prunem consecutive entries of each row are pruned, chosen when the first of
    them is reached. Every change of column j is compensated on the later columns by
    W[:, k] -= (w_j - q_j) / U_jj · U_jk. With `quant`, the survivors are quantized in the same
    pass (joint sparse + quantized; pruned weights stay exactly 0); act_order is not supported.

    Example:
        >>> from prunekit.kernels import factorize, sparsegpt
        >>> X, W = torch.randn(512, 64), torch.randn(32, 64)
        >>> res = sparsegpt(W, factorize(2 / 512 * X.T @ X), 0.5)
        >>> int((res.weight == 0).sum())
        1024

    Raises:
        ValueError: invalid sparsity / pattern / blocksize, W not finite 2-D, or W and factor
            disagree on d_in.
    """
    return sparsegpt_many([W], factor, sparsity, prunen=prunen, prunem=prunem, blocksize=blocksize, quant=quant)[0]


def sparsegpt_many(
    Ws: Sequence[Tensor],
    factor: HessianFactor,
    sparsity: float | Sequence[float],
    *,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    quant: QuantSpec | None = None,
) -> list[KernelResult]:
    """`sparsegpt` on several matrices that read the same input (q/k/v, gate/up) in one sweep.

    The rows of all matrices are swept together, so the per-column work is done once; masks are
    still chosen per matrix, so the results equal separate `sparsegpt` calls (up to the
    floating point summation order of the matrix products). `sparsity` is one value for all
    matrices or one per matrix.
    """
    if not isinstance(factor, HessianFactor):
        raise ValueError(f"factor must be a HessianFactor, got {type(factor).__name__}")
    if len(Ws) == 0:
        raise ValueError("Ws is empty")
    for W in Ws:
        check_weight(W)
        if W.shape[1] != factor.d_in:
            raise ValueError(f"W has in_features={W.shape[1]} but the Hessian factor has d_in={factor.d_in}")
        if W.device != Ws[0].device:
            raise ValueError(f"all matrices must be on one device, got {W.device} and {Ws[0].device}")
    n = factor.d_in
    sparsities = [sparsity] * len(Ws) if isinstance(sparsity, (int, float)) else list(sparsity)
    if len(sparsities) != len(Ws):
        raise ValueError(f"got {len(sparsities)} sparsities for {len(Ws)} matrices")
    for p in sparsities:
        check_pattern(p, prunen, prunem, n)
    check_blocksize(blocksize, prunem)
    if quant is not None:
        if not isinstance(quant, QuantSpec):
            raise ValueError(f"quant must be a QuantSpec or None, got {type(quant).__name__}")
        if quant.act_order:
            raise ValueError("act_order is not supported with sparsegpt: the mask blocks need the natural column order")

    device = Ws[0].device
    bounds = _row_bounds(Ws)
    Wt = torch.empty(n, bounds[-1][1], dtype=torch.float32, device=device)
    for W, (r0, r1) in zip(Ws, bounds):
        native.transpose(W.detach(), out=Wt[:, r0:r1])
    factor = factor.to(device)
    if bool(factor.dead.any()):
        Wt[factor.dead] = 0.0

    if not any(sparsities) and prunem == 0 and quant is None:
        return [KernelResult(weight=w, loss=0.0) for w in _weights(Wt, Ws, bounds)]

    row_loss, scale_t, zero_t = obs_sweep(
        Wt,
        factor,
        blocksize=blocksize,
        segments=[(r0, r1, p) for (r0, r1), p in zip(bounds, sparsities)],
        prunen=prunen,
        prunem=prunem,
        quant=quant,
    )
    results = []
    for weight, (r0, r1) in zip(_weights(Wt, Ws, bounds), bounds):
        results.append(
            KernelResult(
                weight=weight,
                loss=float(row_loss[r0:r1].sum()) / 2,
                scales=None if scale_t is None else scale_t[:, r0:r1].T.contiguous(),
                zeros=None if zero_t is None else zero_t[:, r0:r1].T.contiguous(),
            )
        )
    return results


def _row_bounds(Ws: Sequence[Tensor]) -> list[tuple[int, int]]:
    bounds, r0 = [], 0
    for W in Ws:
        bounds.append((r0, r0 + W.shape[0]))
        r0 += W.shape[0]
    return bounds


def _weights(Wt: Tensor, Ws: Sequence[Tensor], bounds: list[tuple[int, int]]) -> list[Tensor]:
    """The swept matrices out of Wt = [W_1; W_2; ...]^T, contiguous, in their own dtypes.

    One transpose of the whole Wt; fp32 results are row ranges of it.
    """
    W_all = native.transpose(Wt)
    return [W_all[r0:r1] if W.dtype == W_all.dtype else W_all[r0:r1].to(W.dtype) for W, (r0, r1) in zip(Ws, bounds)]
