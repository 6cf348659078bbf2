"""Per-linear pruning-loss estimates from dense weights and dense Hessians (before any pruning).

Under SparseGPT's sequential-column assumption, removing w_ij costs w_ij² / U_jj² (half of it
is the loss), with U the upper Cholesky factor of H⁻¹ — row j of U holds the inverse Hessian
of the sub-problem that remains when column j is reached. A linear's estimated loss at
sparsity p is ½ · the sum of its smallest p-fraction of these costs.
"""
from __future__ import annotations

import torch

from .. import kernels


def obs_costs(W: torch.Tensor, factor: "kernels.HessianFactor") -> torch.Tensor:
    """w_ij² / U_jj² = (w_ij · r_j)² for every weight (d_out, d_in); dead inputs cost nothing."""
    costs = (W.float() * factor.r) ** 2
    costs[:, factor.dead] = 0.0
    return costs


def loss_curve(costs: torch.Tensor, grid: tuple[float, ...]) -> list[float]:
    """½ · sum of the smallest floor(p · numel) costs, for each p of the grid."""
    flat, _ = torch.sort(costs.flatten().double())
    cumulative = torch.cat([flat.new_zeros(1), torch.cumsum(flat, 0)])
    return [0.5 * float(cumulative[int(p * flat.numel())]) for p in grid]


def outlier_ratio(weights: list[torch.Tensor], diags: list[torch.Tensor], m: float) -> float:
    """OWL's layer outlier ratio: share of Wanda scores |W_ij|·‖X_j‖ above m × their mean.

    ‖X_j‖ ∝ sqrt(H_jj); the ratio is scale-free, so the Hessian's normalisation does not matter.
    """
    scores = torch.cat([(w.float().abs() * d.float().clamp_min(0).sqrt()).flatten() for w, d in zip(weights, diags)])
    return float((scores > m * scores.mean()).double().mean())


def estimate_layer(index: int, linears: dict[str, torch.Tensor], groups: tuple[tuple[str, ...], ...],
                   hessians: dict[str, torch.Tensor], grid: tuple[float, ...], percdamp: float,
                   owl_m: float) -> list[dict]:
    """Rows (layer, linear, params, sparsity, loss, outlier_ratio) for one decoder layer.

    linears: {name: weight}; hessians: {input key (first linear of its group): H}.
    """
    rows, diags = [], []
    for group in groups:
        H = hessians[group[0]]
        factor = kernels.factorize(H, percdamp)
        for name in group:
            W = linears[name]
            diags.append(torch.diagonal(H))
            for p, loss in zip(grid, loss_curve(obs_costs(W, factor), grid)):
                rows.append({"layer": index, "linear": name, "params": W.numel(), "sparsity": p, "loss": loss})
    ratio = outlier_ratio([linears[n] for g in groups for n in g], diags, owl_m)
    for row in rows:
        row["outlier_ratio"] = ratio
    return rows
