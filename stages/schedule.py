"""schedule: loss estimates -> sparsity per linear (json), table (csv) and plot."""
from __future__ import annotations

import numpy as np
import pandas as pd

from prunekit import plots
from prunekit.artifacts import write_atomic, write_json
from prunekit.config import ConfigError, Params
from prunekit.schedule import allocate, unit_log_loss
from stages.common import Paths, main


def check(params: Params) -> None:
    if params.prune.structure != "unstructured" and params.schedule.allocator != "uniform":
        raise ConfigError(f"N:M sparsity ({params.prune.structure}) needs schedule.allocator 'uniform'")


def needs(paths: Paths) -> list:
    return [paths.estimates]


def run(params: Params, step) -> None:
    paths, target = Paths.of(params), params.prune.sparsity
    estimates = pd.read_parquet(paths.estimates)
    table = allocate(estimates, target, params.schedule)
    achieved = float(np.average(table["sparsity"], weights=table["params"]))
    write_json(paths.schedule, {
        "target": target,
        "achieved": achieved,
        "schedule": params.schedule.model_dump(mode="json"),
        "sparsity": dict(zip(table["key"], table["sparsity"].astype(float))),
        "cluster": dict(zip(table["key"], table["cluster"].astype(int).tolist())),
    })
    write_atomic(paths.reports / "schedule.csv", table.to_csv(index=False))
    blocks = unit_log_loss(estimates, target, "block", "none")
    log_loss = pd.Series(blocks["log_loss"].to_numpy(), index=blocks["unit"].astype(int))
    plots.schedule(table, log_loss, target, paths.reports / "plots" / "schedule.png")


if __name__ == "__main__":
    main("schedule")
