"""estimate: model + dense Hessians (of its calibration) -> estimated pruning loss per linear over a sparsity grid."""
from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from prunekit.allocation.estimate import estimate_layer
from prunekit.artifacts import write_atomic
from prunekit.config import Params
from prunekit.data import read_calibration
from prunekit.models import layer_linears, pick_device
from prunekit.reporting import plots
from prunekit.storage.hessian_store import HessianStore
from stages.common import Paths, model_fingerprint, open_model


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.model, paths.calib, paths.hessians]


def run(params: Params, step) -> None:
    paths, e, device = Paths.of(params), params.estimate, pick_device(params.runtime.device)
    source = open_model(params, paths.model, device)  # one layer at a time with runtime.stream
    store = HessianStore.open_for_reading(paths.hessians, model_fingerprint(paths.model),
                                          read_calibration(paths.calib)[1]["fingerprint"])
    rows = []
    for i in tqdm(range(len(source.layers)), desc="estimate", unit="layer"):
        with source.layer(i) as layer:
            weights = {name: lin.weight.data for name, lin in layer_linears(layer, source.adapter).items()}
            rows += step(estimate_layer, i, weights, source.adapter.groups, store.hessians(i, device), e.grid, e.percdamp,
                         e.owl_m)
    df = pd.DataFrame(rows)
    write_atomic(paths.estimates, df.to_parquet(index=False))
    plots.estimated_loss(df, paths.reports / "plots" / "estimated_loss.png")
