"""Output-level pruning sensitivity of decoder blocks, and sparsity allocators built on it.

A layer-local loss estimate does not say what the model's output feels: errors propagate and
blocks differ in how much they matter (DESIGN notes: summing estimated layer losses did badly,
ranking blocks by a measured Δ calibration loss did well). So we measure at the output:

    Δ_u(s) = NLL(model with only unit u pruned to sparsity s) − NLL(dense model)

on a few calibration windows, for every unit u (a decoder block, or half of one: attention /
MLP) and every s of a small grid. Unit u is pruned with SparseGPT on the *dense* Hessians, the
rest of the model stays dense, so the curves are a property of the dense model and can be
measured once and reused by every allocator and target.

Cost: the dense inputs of block b are produced once (one pass of the stack); for each (u, s)
only blocks b..L−1, the final norm and the LM head run again, the head in chunks of tokens so
a 262k-entry vocabulary never materialises a full (seqlen × vocab) logit tensor per window.

Example::

    >>> curves = block_sensitivity(model, adapter, calib[:16], hessians, (0.5, 0.6, 0.7, 0.8, 0.9))
    >>> sparsity = allocate_measured(curves, target=0.7, lo=0.4, hi=0.95)  # {'3.mlp.up_proj': ...}
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import kernels
from ..config import ConfigError
from ..forward.head import OutputHead
from ..forward.layerwise import LayerwiseRunner
from ..forward.scoring import require_finite, window_scores
from ..models import Adapter
from .schedule import match_budget

log = logging.getLogger(__name__)

UNITS = ("block", "half")


def pruning_units(adapter: Adapter, n_layers: int, unit: str = "block") -> list[tuple[str, int, tuple[tuple[str, ...], ...]]]:
    """(unit name, layer, linear groups) for every unit.

    unit="block": one unit per decoder layer, named '<layer>'. unit="half": the first half of
    the adapter's groups (attention: input projections and output projection) as
    '<layer>.attn' and the second half (MLP) as '<layer>.mlp'.
    """
    if unit not in UNITS:
        raise ConfigError(f"unit must be one of {UNITS}, got {unit!r}")
    if unit == "block":
        return [(str(i), i, adapter.groups) for i in range(n_layers)]
    if len(adapter.groups) % 2:
        raise ConfigError(f"cannot split {len(adapter.groups)} linear groups into attention and MLP halves")
    half = len(adapter.groups) // 2
    return [(f"{i}.{name}", i, groups) for i in range(n_layers)
            for name, groups in (("attn", adapter.groups[:half]), ("mlp", adapter.groups[half:]))]


def _nll_from(runner: LayerwiseRunner, start: int, tokens: torch.Tensor, head: OutputHead) -> float:
    """Mean next-token NLL of the windows when blocks start..L−1 run on runner.inputs."""
    return float(window_scores(runner, tokens, head, start=start).sum()) / (tokens.shape[0] * (tokens.shape[1] - 1))


@torch.no_grad()
def block_sensitivity(model: nn.Module, adapter: Adapter, windows: torch.Tensor,
                      hessians: dict[int, dict[str, torch.Tensor]], sparsities: Sequence[float], *,
                      percdamp: float = 0.01, blocksize: int = 128, unit: str = "block",
                      device: str | torch.device | None = None, chunk_tokens: int = 1024) -> pd.DataFrame:
    """Measured output sensitivity curves Δ_u(s) of every unit (see the module docstring).

    windows: (n, seqlen) calibration token ids; hessians: {layer: {group key: dense H}} with
    the group key the first linear of each group of `adapter.groups`. Every linear of a unit is
    pruned to the same s; the model's weights are restored (the same tensors) afterwards.

    Returns one row per (unit, s): unit, layer, linears (comma-joined names in the layer),
    params (weights in the unit), sparsity, delta_nll. `attrs["dense_nll"]` holds the dense
    mean NLL of the windows.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start_time = time.time()
    runner = LayerwiseRunner(model, adapter, windows, device)
    tokens = windows.to(device)
    head = OutputHead(model, chunk_tokens)
    dense = require_finite(_nll_from(runner, 0, tokens, head), "the dense model's calibration NLL", runner,
                           runner.inputs)
    units = pruning_units(adapter, len(runner), unit)
    rows = []
    for b in tqdm(range(len(runner)), desc=f"sensitivity ({unit})", unit="layer"):
        layer = runner.layers[b]
        for name, _, groups in (u for u in units if u[1] == b):
            linears = {n: layer.get_submodule(n) for group in groups for n in group}
            originals = {n: lin.weight.data for n, lin in linears.items()}
            factors = {adapter.group_key(g): kernels.factorize(hessians[b][adapter.group_key(g)].to(device), percdamp)
                       for g in groups}
            try:
                for s in sparsities:
                    for group in groups:
                        results = kernels.sparsegpt_many([originals[n] for n in group], factors[adapter.group_key(group)],
                                                         float(s), blocksize=blocksize)
                        for n, result in zip(group, results):
                            linears[n].weight.data = result.weight
                    nll = require_finite(_nll_from(runner, b, tokens, head),
                                         f"the calibration NLL with {name} pruned to {s:g}", runner, runner.inputs, b)
                    rows.append({"unit": name, "layer": b, "linears": ",".join(linears),
                                 "params": sum(w.numel() for w in originals.values()), "sparsity": float(s),
                                 "delta_nll": nll - dense})
            finally:
                for n, weight in originals.items():
                    linears[n].weight.data = weight
        if b + 1 < len(runner):
            runner.advance(b)
    log.info("sensitivity: %d units x %d sparsities on %d windows in %.1f s (dense NLL %.4f)",
             len(units), len(sparsities), len(windows), time.time() - start_time, dense)
    curves = pd.DataFrame(rows)
    curves.attrs["dense_nll"] = dense
    return curves


def _units_table(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per unit (first-appearance order): unit, layer, linears, params."""
    if not np.isfinite(curves["delta_nll"].to_numpy(float)).all():
        raise ValueError("sensitivity curves contain non-finite delta_nll values")
    return curves.drop_duplicates("unit")[["unit", "layer", "linears", "params"]].reset_index(drop=True)


def _curve_points(curves: pd.DataFrame, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Measured (s, Δ) of one unit, sorted, with Δ(0) = 0 prepended."""
    g = curves[(curves["unit"] == unit) & (curves["sparsity"] > 0)].sort_values("sparsity")
    return (np.concatenate([[0.0], g["sparsity"].to_numpy(float)]),
            np.concatenate([[0.0], g["delta_nll"].to_numpy(float)]))


def _evaluate(xs: np.ndarray, ys: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Piecewise-linear Δ(s); beyond the last measured s, the last segment's slope (if rising)."""
    s = np.asarray(s, dtype=float)
    slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
    return np.where(s <= xs[-1], np.interp(s, xs, ys), ys[-1] + slope * (s - xs[-1]))


def _lower_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the lower convex hull of points sorted by x (monotone chain)."""
    hull: list[tuple[float, float]] = []
    for p in zip(x.tolist(), y.tolist()):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) > 0:
                break
            hull.pop()
        hull.append(p)
    return np.array([h[0] for h in hull]), np.array([h[1] for h in hull])


def _per_linear(units: pd.DataFrame, unit_sparsity: np.ndarray) -> dict[str, float]:
    return {f"{layer}.{name}": float(s)
            for layer, linears, s in zip(units["layer"], units["linears"], unit_sparsity)
            for name in linears.split(",")}


def allocate_measured(curves: pd.DataFrame, target: float, lo: float, hi: float) -> dict[str, float]:
    """Per-linear sparsity minimising the summed measured output loss, at exactly `target`.

    Solves  min Σ_u Δ_u(s_u)  s.t.  Σ_u n_u s_u = target · Σ_u n_u,  lo ≤ s_u ≤ hi,
    with n_u the weights of unit u and Δ_u the piecewise-linear interpolation of its measured
    curve through (0, 0) (beyond the last measured s: the last segment's slope, never falling).

    Method: each Δ_u on [lo, hi] is replaced by its lower convex hull; starting from s_u = lo
    for every unit, hull segments (of all units) are taken in increasing order of cost per
    pruned weight, slope / n_u, until the budget (target − lo) · Σ n_u is used; the last one
    taken only partly. Slopes rise along a hull, so a unit's segments are taken in order; this
    greedy is the exact optimum of the convexified problem (a fractional knapsack), and every
    unit except the one partly-taken segment ends on a hull vertex, where hull and curve agree —
    so it is optimal for the measured curves up to that one unit. `match_budget` then removes
    the floating-point residue so the parameter-weighted mean is `target` to 1e-9.

    Returns {'<layer>.<linear>': sparsity}; every linear of a unit gets the unit's sparsity.
    """
    if not lo <= target <= hi:
        raise ConfigError(f"target sparsity {target} lies outside [{lo}, {hi}]")
    units = _units_table(curves)
    n = units["params"].to_numpy(float)
    segments = []  # (cost per weight, unit index, segment index, width)
    for u, name in enumerate(units["unit"]):
        xs, ys = _curve_points(curves, name)
        grid = np.unique(np.concatenate([[lo, hi], xs[(xs > lo) & (xs < hi)]]))
        hx, hy = _lower_hull(grid, _evaluate(xs, ys, grid))
        for k, (dx, dy) in enumerate(zip(np.diff(hx), np.diff(hy))):
            segments.append((dy / dx / n[u], u, k, dx))
    sparsity = np.full(len(units), float(lo))
    budget = (target - lo) * n.sum()
    for _, u, _, dx in sorted(segments):
        if budget <= 0:
            break
        step = min(dx, budget / n[u])
        sparsity[u] += step
        budget -= step * n[u]
    sparsity = match_budget(sparsity, n, target, lo, hi)
    return _per_linear(units, sparsity)


def allocate_ranked(curves: pd.DataFrame, target: float, spread: float, at: float,
                    lo: float, hi: float) -> dict[str, float]:
    """The DESIGN notes' ranked baseline: sparsity linear in the rank of Δ_u(at).

    Units sorted by Δ_u(at) (interpolated like `allocate_measured`); the least sensitive gets
    target + spread, the most sensitive target − spread, evenly spaced in rank between; then
    one common shift (`match_budget`) makes the parameter-weighted mean exactly `target`
    within [lo, hi]. Returns {'<layer>.<linear>': sparsity}.
    """
    units = _units_table(curves)
    delta = np.array([float(_evaluate(*_curve_points(curves, u), np.array(at))) for u in units["unit"]])
    rank = np.empty(len(units))
    rank[np.argsort(delta, kind="stable")] = np.arange(len(units))
    offsets = spread * (1 - 2 * rank / (len(units) - 1)) if len(units) > 1 else np.zeros(1)
    sparsity = match_budget(target + offsets, units["params"].to_numpy(float), target, lo, hi)
    return _per_linear(units, sparsity)
