"""95% intervals for perplexities from per-window NLLs, by bootstrap over windows.

Windows are the unit of resampling: a window's tokens are scored together and are not
independent of each other. Every window has the same number of predicted tokens, so the mean
NLL of a resample is the mean of its windows' mean NLLs. Comparisons of two models on the same
windows resample the windows' differences (paired), which cancels what the windows share.

Example::

    >>> lo, hi = ppl_interval([3.1, 3.3, 2.9, 3.6])
    >>> round(lo, 1) <= 24.5 <= round(hi, 1)
    True
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RESAMPLES = 4000
SEED = 0  # fixed: the same metrics give the same interval


def _means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[picks].mean(axis=1)


def ppl_interval(window_nll: Sequence[float], level: float = 0.95, resamples: int = RESAMPLES,
                 seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of exp(mean window NLL)."""
    values = np.asarray(window_nll, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    means = _means(values, resamples, seed)
    q = (1 - level) / 2
    return float(np.exp(np.quantile(means, q))), float(np.exp(np.quantile(means, 1 - q)))


def ratio_interval(window_nll_a: Sequence[float], window_nll_b: Sequence[float], level: float = 0.95,
                   resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """ppl(a) / ppl(b) on the same windows and its paired bootstrap interval: (ratio, lo, hi)."""
    a, b = np.asarray(window_nll_a, dtype=float), np.asarray(window_nll_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired windows needed, got {a.shape} and {b.shape}")
    diff = a - b
    ratio = float(np.exp(diff.mean()))
    if len(diff) < 2:
        return ratio, math.nan, math.nan
    means = _means(diff, resamples, seed)
    q = (1 - level) / 2
    return ratio, float(np.exp(np.quantile(means, q))), float(np.exp(np.quantile(means, 1 - q)))
