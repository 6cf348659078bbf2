"""Factorisation of a layer-input Hessian, shared by every linear that reads that input.

For a linear layer with input X (tokens x d_in) the layer-wise reconstruction loss
||W X^T - Ŵ X^T||^2 has Hessian H = (2/N) X^T X (d_in x d_in), the same for every output row.
SparseGPT and GPTQ visit the columns left to right and need, for each column j, the inverse
Hessian of the sub-problem over the columns j..d_in-1 that are still free. All of them are
encoded in the upper Cholesky factor U of H^-1 (U^T U = H^-1): the OBS cost of setting w_j to
q_j is (w_j - q_j)^2 / U_jj^2, and the optimal compensation moves every later column k by
-(w_j - q_j) / U_jj · U_jk.

U itself is rarely needed. Write the damped Hessian as H = R R^T with R upper triangular (the
Cholesky factor of H with rows and columns reversed); then H^-1 = R^-T R^-1, so U = R^-1 and
1/U_jj = R_jj =: r_j. With T = R diag(r)^-1 (unit upper triangular, H = T diag(r)^2 T^T),
summing the compensations of all columns before k gives

    w_k when column k is reached = original w_k + sum_{j<k} (original w_j - q_j) · T_jk,

so the sweep (sweep.py) needs T and r only: one Cholesky factorisation, and no inverse,
which would cost as much again. (It forms U = HessianFactor.U only where that is cheaper than
its block conversions: pruning matrices that are wide in d_out.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Below this size a triangular solve against the identity is cheaper than recursing further.
_TRI_INVERSE_BASE = 128
# Block width of the blocked Cholesky factorisation.
_CHOLESKY_BLOCK = 64


@dataclass(frozen=True, eq=False)
class HessianFactor:
    """Everything the pruning and quantization kernels need from one Hessian.

    Attributes:
        T: (d_in, d_in) fp32 unit upper-triangular factor, H + λI = T diag(r)^2 T^T (dead inputs
            counted with H_jj = 1).
        r: (d_in,) fp32, r_j = 1/U_jj for SparseGPT's U = chol((H + λI)^-1, upper); the OBS
            cost of pruning w_ij is (w_ij · r_j)^2 (= w^2 / U_jj^2).
        dead: (d_in,) bool, inputs that never fired (H_jj == 0); their weights are zeroed.
        diag: (d_in,) fp32 diagonal of the undamped H, i.e. (2/N)·||X_j||^2; Wanda's
            ||X_j||_2 is proportional to its square root.
    """

    T: Tensor
    r: Tensor
    dead: Tensor
    diag: Tensor

    @property
    def d_in(self) -> int:
        return self.T.shape[0]

    def to(self, device: torch.device | str) -> HessianFactor:
        """The same factor with its tensors on `device` (self if they are there already)."""
        device = torch.device(device)
        if self.T.device == device:
            return self
        return HessianFactor(*(x.to(device) for x in (self.T, self.r, self.dead, self.diag)))

    @cached_property
    def U(self) -> Tensor:
        """SparseGPT's U = chol((H + λI)^-1, upper) = (T diag(r))^-1, fp32, computed on first use."""
        return _inverse_upper(self.T * self.r).contiguous()


def factorize(H: Tensor, percdamp: float = 0.01) -> HessianFactor:
    """Factorise the Hessian H (d_in x d_in, symmetric PSD) for SparseGPT and GPTQ.

    As in SparseGPT, dead inputs (H_jj == 0) get H_jj = 1 so the matrix stays invertible and
    λ = percdamp · mean(diag H) is added to the diagonal. The damped matrix is factorised as
    T diag(r)^2 T^T (see the module docstring). Computed in fp32, retried in fp64 if the fp32
    Cholesky factorisation fails.

    Example:
        >>> X = torch.randn(256, 16)
        >>> H = 2 / 256 * X.T @ X
        >>> f = factorize(H)
        >>> H_damped = H + 0.01 * H.diagonal().mean() * torch.eye(16)
        >>> torch.allclose(f.T * f.r**2 @ f.T.T, H_damped, atol=1e-4)
        True

    Raises:
        ValueError: H is not a finite square matrix, has a negative diagonal entry, or is not
            positive definite even after damping.
    """
    if not isinstance(H, Tensor) or H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square 2-D tensor, got shape {tuple(getattr(H, 'shape', ()))}")
    if not H.is_floating_point():
        raise ValueError(f"H must be floating point, got {H.dtype}")
    if not (percdamp >= 0 and percdamp < float("inf")):
        raise ValueError(f"percdamp must be finite and >= 0, got {percdamp}")
    # min and max propagate NaN, and are much cheaper than isfinite().all() on CPU.
    if not all(math.isfinite(float(v)) for v in torch.aminmax(H.detach())):
        raise ValueError("H contains NaN or Inf")

    diag = H.detach().diagonal().to(torch.float32, copy=True)
    if bool((diag < 0).any()):
        raise ValueError("H has negative diagonal entries; it is not a Hessian X^T X")
    dead = diag == 0

    factor = _unit_factor(_damped(H, dead, percdamp, torch.float32))
    if factor is None:
        log.warning("fp32 Cholesky of the damped Hessian failed (d_in=%d); retrying in fp64", H.shape[0])
        factor = _unit_factor(_damped(H, dead, percdamp, torch.float64))
    if factor is None or not all(math.isfinite(float(v)) for v in torch.aminmax(factor[0])):
        raise ValueError(
            f"H is not positive definite even after damping with percdamp={percdamp}; "
            "increase percdamp or collect more calibration tokens"
        )
    T, r = factor
    return HessianFactor(T=T.to(torch.float32), r=r.to(torch.float32), dead=dead, diag=diag)


def _damped(H: Tensor, dead: Tensor, percdamp: float, dtype: torch.dtype) -> Tensor:
    """A copy of H in `dtype` with dead H_jj set to 1 and percdamp · mean(diag) added."""
    H = H.detach().to(dtype, copy=True)
    H.diagonal().masked_fill_(dead, 1.0)
    H.diagonal().add_(percdamp * H.diagonal().mean())
    return H


def _unit_factor(H: Tensor) -> tuple[Tensor, Tensor] | None:
    """(T, r) with H = T diag(r)^2 T^T, T unit upper triangular, computed in place of H; None if
    H is not numerically positive definite.

    This is the Cholesky factor R = T diag(r) of H = R R^T with rows and columns reversed,
    blocked from the last block column to the first: with P = H[:e, s:e] - R[:e, e:] R[s:e, e:]^T,
    the diagonal block R[s:e, s:e] is the same kind of factor of P[s:e], and
    R[:s, s:e] = P[:s] R[s:e, s:e]^-T. All but the small diagonal blocks is GEMM work, about
    twice as fast as LAPACK's potrf on the CPU we benchmarked. Working in place on the (already
    copied) H and writing T directly avoids two more n x n buffers, which on the CPU cost as
    much as the arithmetic (fresh pages are zeroed by the kernel on first touch).
    """
    n = H.shape[0]
    if H.is_cuda:
        # One library call: on a GPU the blocked loop's many small steps cost more than they save.
        L_T, info = torch.linalg.cholesky_ex(H.flip(0, 1), upper=True)
        if int(info) != 0:
            return None
        R = L_T.T.flip(0, 1)
        r = R.diagonal().clone()
        return R.div_(r), r
    r = H.new_empty(n)
    for e in range(n, 0, -_CHOLESKY_BLOCK):
        s = max(e - _CHOLESKY_BLOCK, 0)
        P = H[:e, s:e]
        if e < n:
            # R[:e, e:] R[s:e, e:]^T = T[:e, e:] diag(r)^2 T[s:e, e:]^T
            P.addmm_(H[:e, e:], (H[s:e, e:] * r[e:].square()).T, alpha=-1)
        # J P J = L L^T gives P = (J L J)(J L J)^T with J L J upper triangular (J: reversal).
        L_T, info = torch.linalg.cholesky_ex(P[s:e].flip(0, 1), upper=True)
        if int(info) != 0:
            return None
        R_kk = L_T.T.flip(0, 1)
        r[s:e] = R_kk.diagonal()
        T_kk = R_kk.div_(r[s:e])
        if s > 0:
            # T[:s, s:e] = R[:s, s:e] diag(r)^-1 = P[:s] T_kk^-T diag(r)^-2
            H[:s, s:e] = P[:s] @ _inverse_upper(T_kk).T.div_(r[s:e].square())
        H[s:e, s:e] = T_kk
        H[e:, s:e] = 0
    return H, r


def _inverse_upper(R: Tensor) -> Tensor:
    """Inverse of an upper-triangular matrix by recursive 2x2 blocking.

    [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]: two half-size inverses plus two
    GEMMs, which run much faster than a triangular solve against the identity.
    """
    n = R.shape[0]
    if n <= _TRI_INVERSE_BASE:
        eye = torch.eye(n, dtype=R.dtype, device=R.device)
        return torch.linalg.solve_triangular(R, eye, upper=True)
    h = n // 2
    A_inv = _inverse_upper(R[:h, :h])
    C_inv = _inverse_upper(R[h:, h:])
    out = torch.zeros_like(R)
    out[:h, :h] = A_inv
    out[h:, h:] = C_inv
    out[:h, h:] = -(A_inv @ R[:h, h:]) @ C_inv
    return out
