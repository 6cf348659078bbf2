"""Sparsity schedules: how much of each layer to prune for a global target.

Every allocator returns a sparsity per linear ('<layer>.<linear>') whose parameter-weighted
mean equals the target (to 1e-9) and that respects [min_sparsity, max_sparsity].

- uniform: every linear at the target.
- kmeans (the paper): log of each unit's estimated loss at the target (optionally per
  parameter), K-means into K clusters; clusters ordered by centre get evenly spaced offsets
  from +spread (lowest loss: prune more) to -spread; then one common shift makes the budget
  exact.
- owl (Yin et al. 2023): blocks with more Wanda outliers get less sparsity, within
  [p - λ, p + λ].
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import ConfigError, ScheduleParams


def match_budget(sparsity: np.ndarray, params: np.ndarray, target: float, lo: float, hi: float) -> np.ndarray:
    """Shift all sparsities by one constant c so that Σ n_i·clip(s_i + c, lo, hi) = target·Σ n_i.

    The weighted mean is monotone in c, so bisection finds c to machine precision.
    """
    if not lo <= target <= hi:
        raise ConfigError(f"target sparsity {target} lies outside [{lo}, {hi}]")
    weights = params / params.sum()

    def mean(c: float) -> float:
        return float(weights @ np.clip(sparsity + c, lo, hi))

    a, b = lo - sparsity.max() - 1.0, hi - sparsity.min() + 1.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if mean(mid) < target else (a, mid)
    return np.clip(sparsity + 0.5 * (a + b), lo, hi)


def _units(estimates: pd.DataFrame, unit: str) -> pd.Series:
    keys = estimates["layer"].astype(str)
    return keys if unit == "block" else keys + "." + estimates["linear"]


def unit_log_loss(estimates: pd.DataFrame, target: float, unit: str, normalise: str) -> pd.DataFrame:
    """Per unit: parameter count and estimated loss at `target` (log-linear interpolation)."""
    df = estimates.assign(unit=_units(estimates, unit))
    per_unit = df.groupby(["unit", "sparsity"], sort=False).agg(loss=("loss", "sum"), params=("params", "sum")).reset_index()
    rows = []
    for name, g in per_unit.groupby("unit", sort=False):
        g = g.sort_values("sparsity")
        log_loss = np.interp(target, g["sparsity"], np.log(g["loss"].clip(lower=1e-30)))
        params = int(g["params"].iloc[0])
        if normalise == "per_param":
            log_loss -= np.log(params)
        rows.append({"unit": name, "params": params, "log_loss": float(log_loss)})
    return pd.DataFrame(rows)


def _kmeans_offsets(log_loss: np.ndarray, k: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    if k > len(log_loss):
        raise ConfigError(f"schedule.k = {k} exceeds the number of units ({len(log_loss)})")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(log_loss.reshape(-1, 1))
    rank = np.argsort(np.argsort(km.cluster_centers_.ravel()))  # 0 = lowest-loss cluster
    offsets = spread * (1 - 2 * rank / (k - 1)) if k > 1 else np.zeros(1)
    return offsets[km.labels_], rank[km.labels_]


def allocate(estimates: pd.DataFrame, target: float, params: ScheduleParams) -> pd.DataFrame:
    """Per-linear sparsity table: columns key, layer, linear, params, sparsity, cluster, unit."""
    linears = estimates.drop_duplicates(["layer", "linear"])[["layer", "linear", "params", "outlier_ratio"]].copy()
    linears["unit"] = _units(linears, params.unit).to_numpy()
    if params.allocator == "uniform":
        unit_sparsity = {u: target for u in linears["unit"]}
        clusters = {u: 0 for u in linears["unit"]}
    elif params.allocator == "kmeans":
        per_unit = unit_log_loss(estimates, target, params.unit, params.normalise)
        offsets, rank = _kmeans_offsets(per_unit["log_loss"].to_numpy(), params.k, params.spread, params.seed)
        unit_sparsity = dict(zip(per_unit["unit"], target + offsets))
        clusters = dict(zip(per_unit["unit"], rank.tolist()))
    else:
        blocks = linears.groupby("layer", sort=True)["outlier_ratio"].first()
        span = blocks.max() - blocks.min()
        norm = (blocks - blocks.min()) / span * 2 * params.owl_lambda if span > 0 else blocks * 0
        per_block = target - (norm - norm.mean())
        unit_sparsity = {u: per_block[int(u.split(".")[0])] for u in linears["unit"]}
        clusters = {u: 0 for u in linears["unit"]}
    raw = linears["unit"].map(unit_sparsity).to_numpy(dtype=float)
    linears["sparsity"] = match_budget(raw, linears["params"].to_numpy(dtype=float), target,
                                       params.min_sparsity, params.max_sparsity) if params.allocator != "uniform" else raw
    linears["cluster"] = linears["unit"].map(clusters).to_numpy()
    linears["key"] = linears["layer"].astype(str) + "." + linears["linear"]
    return linears[["key", "layer", "linear", "params", "unit", "cluster", "sparsity"]].reset_index(drop=True)
