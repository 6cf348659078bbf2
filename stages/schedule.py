"""schedule: loss estimates (+ measured sensitivity, model, calibration) -> sparsity per linear.

Allocators (schedule.allocator):
- uniform, kmeans (the paper), owl: from the layer-local loss estimates (prunekit.allocation.schedule).
- ranked: blocks ordered by measured output sensitivity (sensitivity stage).
- search: evolutionary search of per-unit levels scored by calibration NLL (prunekit.allocation.search),
  started from the ranked schedule by default. Uses the model, the calibration windows and,
  with search.database 'dense', the Hessian store.

Writes the schedule (json), its table (reports/schedule.csv), a plot, and for the search its
fitness history (reports/search.csv, reports/plots/search.png).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from prunekit.allocation.schedule import allocate, unit_log_loss
from prunekit.artifacts import write_atomic, write_json
from prunekit.config import ConfigError, Params
from prunekit.models import adapter_for
from prunekit.reporting import plots
from stages.common import Paths, model_fingerprint, open_model

MEASURED = ("ranked", "search")


def check(params: Params) -> None:
    if params.prune.structure != "unstructured" and params.schedule.allocator != "uniform":
        raise ConfigError(f"N:M sparsity ({params.prune.structure}) needs schedule.allocator 'uniform'")


def needs(paths: Paths) -> list:
    return [paths.estimates, paths.sensitivity, paths.model, paths.calib]


def run(params: Params, step) -> None:
    paths, target, s = Paths.of(params), params.prune.sparsity, params.schedule
    estimates = pd.read_parquet(paths.estimates)
    extra: dict = {}
    if s.allocator in MEASURED:
        table = allocate(estimates, target, s.model_copy(update={"allocator": "uniform"}))
        sparsity = _ranked(params, paths) if s.allocator == "ranked" else _searched(params, paths, step, extra)
        table["sparsity"] = table["key"].map(sparsity).astype(float)
    else:
        table = allocate(estimates, target, s)
    if "search" not in extra:  # written only once the schedule is made: a refusal leaves the last ones
        write_atomic(paths.reports / "search.csv", "generation,fitness,accepted,seconds\n")
        plots.search_history(None, paths.reports / "plots" / "search.png")
    achieved = float(np.average(table["sparsity"], weights=table["params"]))
    write_json(paths.schedule, {
        "target": target,
        "achieved": achieved,
        "schedule": s.model_dump(mode="json"),
        "sparsity": dict(zip(table["key"], table["sparsity"].astype(float))),
        "cluster": dict(zip(table["key"], table["cluster"].astype(int).tolist())),
        **extra,
    })
    write_atomic(paths.reports / "schedule.csv", table.to_csv(index=False))
    blocks = unit_log_loss(estimates, target, "block", "none")
    log_loss = pd.Series(blocks["log_loss"].to_numpy(), index=blocks["unit"].astype(int))
    plots.schedule(table, log_loss, target, paths.reports / "plots" / "schedule.png")


def _ranked(params: Params, paths: Paths) -> dict[str, float]:
    from prunekit.allocation.sensitivity import allocate_ranked

    s = params.schedule
    curves = pd.read_parquet(paths.sensitivity)
    return allocate_ranked(curves, params.prune.sparsity, s.rank_spread, s.rank_at, s.min_sparsity, s.max_sparsity)


def _searched(params: Params, paths: Paths, step, extra: dict) -> dict[str, float]:
    import torch

    from prunekit.allocation.search import search_schedule
    from prunekit.data import read_calibration
    from prunekit.models import pick_device

    q, s, target = params.schedule.search, params.schedule, params.prune.sparsity
    device = pick_device(params.runtime.device)
    windows, calib = read_calibration(paths.calib)
    model = open_model(params, paths.model, device, why="the search (many forward passes)").model
    hessian_of = None
    if q.database == "dense":
        from prunekit.storage.hessian_store import HessianStore

        store = HessianStore.open_for_reading(paths.hessians, model_fingerprint(paths.model), calib["fingerprint"])
        hessian_of = lambda i: store.hessians(i, device)  # noqa: E731
    init = _ranked(params, paths) if q.init == "ranked" else None
    with torch.no_grad():
        result = search_schedule(model, adapter_for(model), windows, target, q, lo=s.min_sparsity, hi=s.max_sparsity,
                                 init=init, hessian_of=hessian_of, device=device, step=step,
                                 percdamp=params.prune.percdamp, blocksize=params.prune.blocksize)
    # No timings in the schedule: prune depends on it, so it must be byte-identical for the same
    # params (the search's timings go to reports/search.csv).
    extra["search"] = {"levels": result.levels, "fitness": q.fitness, "uniform": result.uniform_fitness,
                       "start": float(result.history["fitness"].iloc[0]), "searched": result.fitness,
                       "evaluations": result.evaluations,
                       "rounds": [{k: r[k] for k in ("generations", "start", "fitness")} for r in result.rounds]}
    write_atomic(paths.reports / "search.csv", result.history.to_csv(index=False))
    plots.search_history(result.history, paths.reports / "plots" / "search.png")
    return result.sparsity
