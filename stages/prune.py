"""prune: model + calibration (+ dense Hessians in parallel mode) + schedule -> data/pruned/<model>."""
from __future__ import annotations

from pathlib import Path

import torch

from prunekit.compression.prune import prune_model
from prunekit.config import ConfigError, Params
from prunekit.data import read_calibration
from prunekit.models import pick_device
from prunekit.storage.hessian_store import HessianStore
from stages.common import Paths, log, model_fingerprint, open_model, read_artifact, tokenizer_of


def check(params: Params) -> None:
    pass


def read_schedule(path: Path) -> dict[str, float]:
    """The schedule stage's {'layer.linear': sparsity}, every value in [0, 1)."""
    schedule = read_artifact(path, "schedule")
    sparsity = schedule.get("sparsity") if isinstance(schedule, dict) else None
    if not isinstance(sparsity, dict) or not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in sparsity.values()):
        raise ConfigError(f"{path} holds no valid 'sparsity' table (values in [0, 1)); rerun the schedule stage")
    return sparsity


def needs(paths: Paths) -> list:
    return [paths.model, paths.calib, paths.schedule]


def run(params: Params, step) -> None:
    paths, p, device = Paths.of(params), params.prune, pick_device(params.runtime.device)
    sparsity = read_schedule(paths.schedule)
    # streamed: one decoder layer in memory at a time, written to paths.pruned as it goes
    source = open_model(params, paths.model, device, out_dir=paths.pruned)
    missing = [f"{i}.{n}" for i in range(len(source.layers)) for n in source.adapter.linears
               if f"{i}.{n}" not in sparsity]
    if missing:
        raise ConfigError(f"{paths.schedule} has no sparsity for {missing[0]} (+{len(missing) - 1} more): made for "
                          f"another model? rerun the schedule stage")
    dtype = getattr(torch, params.hessians.dtype)
    if p.mode == "sequential":
        windows, _ = read_calibration(paths.calib)
        stats = prune_model(source, sparsity, p, runner=source.runner(windows), hessian_dtype=dtype, step=step)
    else:
        store = HessianStore.open_for_reading(paths.hessians, model_fingerprint(paths.model),
                                              read_calibration(paths.calib)[1]["fingerprint"])
        stats = prune_model(source, sparsity, p, store=store, step=step)
    overall = sum(s["sparsity"] * s["params"] for s in stats.values()) / sum(s["params"] for s in stats.values())
    log.info("pruned to %.4f overall sparsity of the decoder linears", overall)
    extra = {"dense_fingerprint": model_fingerprint(paths.model), "prune": p.model_dump(mode="json"),
             "overall_sparsity": overall, "linears": stats}
    source.save(tokenizer_of(paths.model), extra)
