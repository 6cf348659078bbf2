"""estimate: model + dense Hessians -> estimated pruning loss per linear over a sparsity grid."""
from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from prunekit import plots
from prunekit.artifacts import write_atomic
from prunekit.config import Params
from prunekit.drivers import loaded
from prunekit.estimate import estimate_layer
from prunekit.hessian_store import HessianStore
from prunekit.models import decoder_layers, layer_linears
from stages.common import Paths, main, model_fingerprint, open_model


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.model, paths.hessians]


def run(params: Params, step) -> None:
    paths, e = Paths.of(params), params.estimate
    stream, model, adapter = open_model(params, paths.model, torch.device("cpu"))  # streamed: one layer at a time
    store = HessianStore.open_for_reading(paths.hessians, model_fingerprint(paths.model))
    rows = []
    layers = decoder_layers(model, adapter)
    for i in tqdm(range(len(layers)), desc="estimate", unit="layer"):
        with loaded(stream, i):
            weights = {name: lin.weight.data for name, lin in layer_linears(layers[i], adapter).items()}
            hessians = store.hessians(i)
            rows += step(estimate_layer, i, weights, adapter.groups, hessians, e.grid, e.percdamp, e.owl_m)
    df = pd.DataFrame(rows)
    write_atomic(paths.estimates, df.to_parquet(index=False))
    plots.estimated_loss(df, paths.reports / "plots" / "estimated_loss.png")


if __name__ == "__main__":
    main("estimate")
