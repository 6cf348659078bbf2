"""Schedules hit the target exactly, respect bounds, are deterministic and validate K."""
import numpy as np
import pandas as pd
import pytest

from prunekit.allocation.schedule import allocate, match_budget
from prunekit.config import ConfigError, ScheduleParams

GRID = (0.3, 0.5, 0.7, 0.9)


def _estimates(n_layers=8, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(n_layers):
        scale = np.exp(rng.normal(0, 1.5)) * (1 + layer)
        for linear, params in (("q", 4096), ("o", 4096), ("up", 8192), ("down", 8192)):
            for p in GRID:
                rows.append({"layer": layer, "linear": linear, "params": params, "sparsity": p,
                             "loss": scale * params * p ** 3, "outlier_ratio": rng.uniform(0, 0.05)})
    return pd.DataFrame(rows)


def _weighted_mean(table):
    return np.average(table["sparsity"], weights=table["params"])


@pytest.mark.parametrize("allocator", ["uniform", "kmeans", "owl"])
@pytest.mark.parametrize("unit", ["block", "linear"])
def test_target_is_met_exactly_within_bounds(allocator, unit):
    params = ScheduleParams(allocator=allocator, unit=unit, k=3, spread=0.1, min_sparsity=0.55, max_sparsity=0.8)
    table = allocate(_estimates(), 0.7, params)
    assert abs(_weighted_mean(table) - 0.7) < 1e-9
    assert table["sparsity"].between(0.55, 0.8).all()
    assert len(table) == 8 * 4


def test_kmeans_gives_low_loss_blocks_more_sparsity_and_is_deterministic():
    est = _estimates()
    params = ScheduleParams(allocator="kmeans", k=3, spread=0.1)
    a, b = allocate(est, 0.7, params), allocate(est, 0.7, params)
    pd.testing.assert_frame_equal(a, b)
    per_block = a.groupby("layer").agg(s=("sparsity", "first"), c=("cluster", "first"))
    at = est[est.sparsity == 0.7].groupby("layer").apply(lambda g: g.loss.sum() / g.params.sum(), include_groups=False)
    order = at.sort_values().index
    assert per_block.loc[order, "s"].is_monotonic_decreasing
    assert set(per_block["c"]) == {0, 1, 2}


def test_k_out_of_range_is_a_clear_error():
    with pytest.raises(ConfigError, match="exceeds the number of units"):
        allocate(_estimates(n_layers=2), 0.7, ScheduleParams(allocator="kmeans", k=3))
    with pytest.raises(ValueError):
        ScheduleParams(k=0)


def test_match_budget_with_clipping():
    s = match_budget(np.array([0.1, 0.5, 0.99]), np.array([1.0, 2.0, 1.0]), 0.6, 0.2, 0.9)
    assert abs(np.average(s, weights=[1, 2, 1]) - 0.6) < 1e-12 and s.min() >= 0.2 and s.max() <= 0.9
    with pytest.raises(ConfigError):
        match_budget(np.array([0.5]), np.array([1.0]), 0.95, 0.0, 0.9)
