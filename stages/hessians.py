"""hessians: model + calibration windows -> zarr store of dense Hessians, one group per layer.

The store is a persistent DVC out: a rerun after a kill keeps every finished layer.
"""
from __future__ import annotations

import torch

from prunekit.compression.hessians import collect_hessians
from prunekit.config import ConfigError, Params
from prunekit.data import read_calibration
from prunekit.models import pick_device
from prunekit.reporting.provenance import hardware, machine_line
from prunekit.storage.hessian_store import HessianStore
from stages.common import Paths, model_fingerprint, open_model


def check(params: Params) -> None:
    if params.runtime.stream and params.runtime.shards > 1:
        raise ConfigError("runtime.stream accumulates each layer in one process: set runtime.hessian_shards: 1")


def needs(paths: Paths) -> list:
    return [paths.model, paths.calib]


def run(params: Params, step) -> None:
    paths, device = Paths.of(params), pick_device(params.runtime.device)
    dtype = getattr(torch, params.hessians.dtype)
    windows, calib = read_calibration(paths.calib)
    source = open_model(params, paths.model, device)  # streamed: one decoder layer at a time
    store = HessianStore.open_for_writing(paths.hessians, model_fingerprint(paths.model), calib["fingerprint"],
                                          len(source.layers), params.hessians.dtype,
                                          made_on=machine_line(hardware()))
    # shards > 1: map-reduce over calibration shards on the task runner
    collect_hessians(source, source.runner(windows), store, dtype, step, params.runtime.shards)
