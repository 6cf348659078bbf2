"""PNG plots for the report (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def estimated_loss(estimates: pd.DataFrame, path: Path) -> None:
    """Estimated loss of every decoder block against sparsity (log scale), one line per block."""
    blocks = estimates.groupby(["layer", "sparsity"])["loss"].sum().unstack("sparsity")
    fig, ax = plt.subplots(figsize=(7, 4))
    for p in blocks.columns:
        ax.plot(blocks.index, blocks[p], marker="o", ms=3, label=f"p={p:.2f}")
    ax.set(yscale="log", xlabel="decoder block", ylabel="estimated loss  ½Σ w²/U_jj²",
           title="Estimated pruning loss per block (dense Hessians)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def schedule(table: pd.DataFrame, log_loss: pd.Series | None, target: float, path: Path) -> None:
    """Per-block sparsity (parameter-weighted) and, when clustered, log-loss coloured by cluster."""
    blocks = table.groupby("layer").apply(lambda g: (g["sparsity"] * g["params"]).sum() / g["params"].sum(),
                                          include_groups=False)
    cluster = table.groupby("layer")["cluster"].first()
    ncols = 2 if log_loss is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 3.8), squeeze=False)
    ax = axes[0, 0]
    ax.bar(blocks.index, blocks.values, color=[f"C{c}" for c in cluster.loc[blocks.index]])
    ax.axhline(target, color="k", lw=0.8, ls="--", label=f"target {target:.2f}")
    ax.set(xlabel="decoder block", ylabel="sparsity", title="Sparsity per block", ylim=(0, 1))
    ax.legend(fontsize=8)
    if log_loss is not None:
        ax = axes[0, 1]
        ax.scatter(log_loss.index, log_loss.values, c=[f"C{c}" for c in cluster.loc[log_loss.index]])
        ax.set(xlabel="decoder block", ylabel="log estimated loss at target", title="Log-loss, coloured by cluster")
    _save(fig, path)
