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


def ppl_vs_sparsity(runs: pd.DataFrame, datasets: list[str], path: Path) -> None:
    """Perplexity against achieved sparsity, one point per run (rows of reports/runs.csv under one
    protocol): pruned solid, pruned + quantized dashed, dense as a horizontal line; log scale."""
    runs = runs.sort_values("achieved_sparsity")
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, ds in enumerate(datasets):
        colour = f"C{k}"
        for variant, style in (("pruned", "-o"), ("compressed", "--s")):
            col = f"ppl_{variant}_{ds}"
            if col in runs and runs[col].notna().any():
                sub = runs[runs[col].notna()]
                ax.plot(sub["achieved_sparsity"], sub[col], style, color=colour, ms=4, label=f"{ds} {variant}")
        dense = f"ppl_dense_{ds}"
        if dense in runs and runs[dense].notna().any():
            ax.axhline(runs[dense].dropna().iloc[-1], color=colour, lw=0.8, ls=":", label=f"{ds} dense")
    ax.set(yscale="log", xlabel="achieved sparsity of the decoder linears", ylabel="perplexity",
           title=f"Perplexity against sparsity ({len(runs)} run{'s' if len(runs) != 1 else ''})")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def search_history(history: pd.DataFrame | None, path: Path) -> None:
    """Best calibration fitness against generation of the schedule search, one line per round
    (an empty frame with a note when the allocator does not search)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if history is None or not len(history):
        ax.text(0.5, 0.5, "no search (schedule.allocator is not 'search')", ha="center", va="center")
        ax.set_axis_off()
    else:
        rounds = history["round"] if "round" in history else pd.Series(0, index=history.index)
        offset = 0
        for r in sorted(rounds.unique()):
            part = history[rounds == r]
            ax.plot(offset + part["generation"], part["fitness"], "-o", ms=3, label=f"round {r + 1}")
            offset += int(part["generation"].max())
        ax.set(xlabel="generation", ylabel="calibration fitness (best so far)", title="Schedule search")
        ax.legend(fontsize=7)
    _save(fig, path)
