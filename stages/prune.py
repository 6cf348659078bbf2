"""prune: model + calibration (+ dense Hessians in parallel mode) + schedule -> data/pruned/<model>."""
from __future__ import annotations

import torch

from prunekit.artifacts import read_json, state_fingerprint
from prunekit.config import Params
from prunekit.data import read_calibration
from prunekit.drivers import prune_model
from prunekit.hessian_store import HessianStore
from prunekit.layerwise import LayerwiseRunner
from prunekit.models import adapter_for, load_model, load_tokenizer, pick_device, save_model
from stages.common import Paths, log, main, model_fingerprint


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.model, paths.calib, paths.schedule]


def run(params: Params, step) -> None:
    paths, p, device = Paths.of(params), params.prune, pick_device(params.runtime.device)
    sparsity = read_json(paths.schedule)["sparsity"]
    model = load_model(str(paths.model), device=device)
    adapter = adapter_for(model)
    dtype = getattr(torch, params.hessians.dtype)
    if p.mode == "sequential":
        windows, _ = read_calibration(paths.calib)
        stats = prune_model(model, adapter, sparsity, p, runner=LayerwiseRunner(model, adapter, windows, device),
                            hessian_dtype=dtype, step=step)
    else:
        store = HessianStore.open_for_reading(paths.hessians, model_fingerprint(paths.model))
        stats = prune_model(model, adapter, sparsity, p, store=store, step=step)
    overall = sum(s["sparsity"] * s["params"] for s in stats.values()) / sum(s["params"] for s in stats.values())
    log.info("pruned to %.4f overall sparsity of the decoder linears", overall)
    save_model(model.cpu(), load_tokenizer(str(paths.model)), paths.pruned, extra={
        "fingerprint": state_fingerprint(model), "dense_fingerprint": model_fingerprint(paths.model),
        "prune": p.model_dump(mode="json"), "overall_sparsity": overall, "linears": stats,
    })


if __name__ == "__main__":
    main("prune")
