"""Mask selection shared by the pruning kernels.

Masks can be produced as float 0/1 tensors: the sweep multiplies by them, and on CPU
elementwise operations on bool tensors are several times slower than on float ones.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# Along a dimension of at most this size (N:M groups) ranks come from pairwise comparisons.
_RANK_SELECT_MAX = 16
# A flat selection over fewer scores than this just calls kthvalue.
_SAMPLED_SELECT_MIN = 1 << 15
_SAMPLE_STRIDE = 16


def smallest(
    scores: Tensor, k: int, dim: int | None = None, *, dtype: torch.dtype = torch.bool, out: Tensor | None = None
) -> Tensor:
    """Mask (True / 1.0) of the k smallest scores along `dim`, or over all entries if dim is None.

    Exactly k entries are selected in every slice; among scores equal to the k-th smallest the
    lower indices (flat, row-major, when dim is None) win, so the mask is deterministic and
    equals the first k of a stable sort. Uses selection, not sorting. `out` (of `dtype`, the
    shape of scores) receives the mask when given.
    """
    if out is None:
        out = torch.empty(scores.shape, dtype=dtype, device=scores.device)
    n = scores.numel() if dim is None else scores.shape[dim]
    if k <= 0 or k >= n:
        return out.fill_(k > 0)
    if dim is None:
        if scores.is_cuda:
            return _stable_sort_prefix(scores, k, out)
        threshold, at_most = _kth_smallest(scores.reshape(-1), k)
        torch.le(scores, threshold, out=out)
        if at_most != k:  # ties at the threshold: the lower positions go first
            out.copy_(_lower_ties_first(scores.reshape(-1), threshold, k, dim=0).view(scores.shape))
        return out
    if n <= _RANK_SELECT_MAX:
        return _rank_select(scores, k, dim, out)
    threshold = scores.kthvalue(k, dim=dim, keepdim=True).values
    return out.copy_(_lower_ties_first(scores, threshold, k, dim=dim))


def _stable_sort_prefix(scores: Tensor, k: int, out: Tensor) -> Tensor:
    """The first k of a stable sort, by sorting: on a GPU one sort costs less than the
    selection's counts and compactions, each of which waits for the device."""
    first = torch.sort(scores.reshape(-1), stable=True).indices[:k]
    flat = torch.zeros(scores.numel(), dtype=out.dtype, device=scores.device)
    return out.copy_(flat.index_fill_(0, first, 1).view(scores.shape))


def _lower_ties_first(scores: Tensor, threshold: Tensor, k: int, dim: int) -> Tensor:
    """Scores below the k-th smallest `threshold`, plus as many of those equal to it, lowest
    index first, as make k."""
    below = scores < threshold
    missing = k - below.sum(dim=dim, keepdim=True)
    at = scores == threshold
    return below | (at & (at.cumsum(dim=dim) <= missing))


def _rank_select(scores: Tensor, k: int, dim: int, out: Tensor) -> Tensor:
    """k smallest along a short dimension: entry i is selected if fewer than k entries j come
    before it in the order (score, index). Float comparisons: faster than bool ones on CPU."""
    x = scores.to(torch.float32).movedim(dim, 0)
    m = x.shape[0]
    pairs = (m, m, *x.shape[1:])
    earlier = _earlier(m, x.device).view(m, m, *([1] * (x.ndim - 1)))
    xj, xi = x.unsqueeze(1), x.unsqueeze(0)
    before = torch.lt(xj, xi, out=x.new_empty(pairs))
    before += torch.eq(xj, xi, out=x.new_empty(pairs)).mul_(earlier)
    return torch.lt(before.sum(dim=0), k, out=out.movedim(dim, 0)).movedim(0, dim)


@functools.cache
def _earlier(m: int, device: torch.device) -> Tensor:
    """(m, m) float with [j, i] = 1 where j < i (cached: N:M selection runs once per group)."""
    return torch.ones(m, m, device=device).triu(1)


def _kth_smallest(x: Tensor, k: int) -> tuple[Tensor, int]:
    """The k-th smallest value t of the 1-D tensor x (1-based), as a 0-dim tensor, and how
    many entries are <= t (k unless t is tied).

    kthvalue over a whole mask block is the largest cost of choosing a mask, so for large
    inputs the answer is first bracketed by two order statistics lo <= hi of a fixed subsample
    (every 16th score), generous enough that the bracket is essentially never wrong, and
    kthvalue runs only on the few scores inside it. The result is exact: when the bracket
    misses, the full kthvalue is used.
    """
    n = x.numel()
    if n >= _SAMPLED_SELECT_MIN:
        bracketed = _kth_smallest_bracketed(x, k)
        if bracketed is not None:
            return bracketed
    t = x.kthvalue(k).values
    return t, int(torch.le(x, t).sum())


def _kth_smallest_bracketed(x: Tensor, k: int) -> tuple[Tensor, int] | None:
    """`_kth_smallest` by the subsample bracket, or None when the bracket misses the answer."""
    n = x.numel()
    sample = x[::_SAMPLE_STRIDE].clone()  # contiguous: kthvalue would copy a strided view each time
    s = sample.numel()
    q = k / n
    margin = 6 * math.sqrt(q * (1 - q) / s) + 2 / s
    lo_rank, hi_rank = math.floor((q - margin) * s), math.ceil((q + margin) * s)
    lo = sample.kthvalue(lo_rank).values if lo_rank >= 1 else x.new_tensor(float("-inf"))
    hi = sample.kthvalue(hi_rank).values if hi_rank <= s else x.new_tensor(float("inf"))
    below = torch.lt(x, lo)
    rank = k - int(below.sum())
    inside = x[torch.le(x, hi).logical_xor_(below)]  # lo <= x <= hi, as x < lo implies x <= hi
    if not 1 <= rank <= inside.numel():
        return None
    t = inside.kthvalue(rank).values
    return t, k - rank + int(torch.le(inside, t).sum())


def n_of_m(scores: Tensor, prunen: int, prunem: int) -> Tensor:
    """Bool mask of the `prunen` smallest scores in every `prunem` consecutive columns of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // prunem, prunem)
    return smallest(groups, prunen, dim=2).reshape(rows, cols)


def count_to_prune(sparsity: float, numel: int) -> int:
    """Entries a selection over `numel` scores prunes: the nearest integer to sparsity·numel."""
    return round(sparsity * numel)
