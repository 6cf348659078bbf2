"""sensitivity: model + calibration + dense Hessians -> measured output sensitivity per block.

For every decoder block and every sparsity of `sensitivity.grid`: the increase of the mean
calibration NLL when only that block is pruned (SparseGPT, dense Hessians). Independent of the
target sparsity, so a change of prune.sparsity reuses it. Read by the 'ranked' allocator and by
the search's ranked start (schedule stage).
"""
from __future__ import annotations

import pandas as pd

from prunekit.allocation.sensitivity import block_sensitivity
from prunekit.artifacts import write_atomic
from prunekit.config import Params
from prunekit.data import read_calibration
from prunekit.models import pick_device
from prunekit.storage.hessian_store import HessianStore
from stages.common import Paths, log, model_fingerprint, open_model

COLUMNS = {"unit": "object", "layer": "int64", "linears": "object", "params": "int64", "sparsity": "float64",
           "delta_nll": "float64", "dense_nll": "float64"}


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.model, paths.calib, paths.hessians]


def wanted(params: Params) -> bool:
    """Whether the schedule will read the curves: the ranked allocator, or a search started from it."""
    s = params.schedule
    return s.allocator == "ranked" or (s.allocator == "search" and s.search.init == "ranked")


def run(params: Params, step) -> None:
    paths, p, device = Paths.of(params), params.sensitivity, pick_device(params.runtime.device)
    if not wanted(params):
        log.info("schedule.allocator %r does not read sensitivity curves: writing an empty table",
                 params.schedule.allocator)
        empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})
        write_atomic(paths.sensitivity, empty.to_parquet(index=False))
        return
    windows, calib = read_calibration(paths.calib)
    source = open_model(params, paths.model, device, why="the sensitivity measurement (many forward passes)")
    store = HessianStore.open_for_reading(paths.hessians, model_fingerprint(paths.model), calib["fingerprint"])
    hessians = {i: store.hessians(i, device) for i in range(len(source.layers))}
    curves = step(block_sensitivity, source.model, source.adapter, windows[: p.windows], hessians, p.grid,
                  percdamp=params.estimate.percdamp, device=device)
    log.info("dense calibration NLL %.4f; largest Δ at %.2f: %.4f (block %s)", curves.attrs["dense_nll"],
             max(p.grid), curves["delta_nll"].max(), curves.loc[curves["delta_nll"].idxmax(), "unit"])
    curves["dense_nll"] = curves.attrs["dense_nll"]
    write_atomic(paths.sensitivity, curves.to_parquet(index=False))
