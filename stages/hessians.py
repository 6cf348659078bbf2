"""hessians: model + calibration windows -> zarr store of dense Hessians, one group per layer.

The store is a persistent DVC out: a rerun after a kill keeps every finished layer.
"""
from __future__ import annotations

import torch

from prunekit.config import Params
from prunekit.data import read_calibration
from prunekit.drivers import collect_hessians
from prunekit.hessian_store import HessianStore
from prunekit.layerwise import LayerwiseRunner
from prunekit.models import adapter_for, decoder_layers, load_model, pick_device
from stages.common import Paths, main, model_fingerprint


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.model, paths.calib]


def run(params: Params, step) -> None:
    paths, device = Paths.of(params), pick_device(params.runtime.device)
    dtype = getattr(torch, params.hessians.dtype)
    windows, calib = read_calibration(paths.calib)
    model = load_model(str(paths.model), device=device)
    adapter = adapter_for(model)
    store = HessianStore.open_for_writing(paths.hessians, model_fingerprint(paths.model), calib["fingerprint"],
                                          len(decoder_layers(model, adapter)), params.hessians.dtype)
    collect_hessians(LayerwiseRunner(model, adapter, windows, device), store, dtype, step)


if __name__ == "__main__":
    main("hessians")
