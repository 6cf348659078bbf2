"""How the prune, quantize and baseline stages make a model folder: one function per kind of
model, so that a baseline is made exactly like the model it is compared with."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from prunekit.artifacts import read_json, replace_dir, write_json
from prunekit.compression.prune import prune_model
from prunekit.compression.quantize import quantize_model
from prunekit.config import ConfigError, Params
from prunekit.data import read_calibration
from prunekit.models import pick_device
from prunekit.storage.hessian_store import HessianStore
from prunekit.storage.packing import QPARAMS, save_grids
from stages.common import Paths, TokenizerFiles, log, model_fingerprint, open_model


def prune_into(params: Params, sparsity: dict[str, float] | float, out_dir: Path, step, schedule: str) -> None:
    """The dense model pruned with `sparsity` (per linear, or one value for all) and prune's
    settings, saved to `out_dir`; `schedule` names where the sparsity came from."""
    paths, p, device = Paths.of(params), params.prune, pick_device(params.runtime.device)
    # streamed: one decoder layer in memory at a time, written to out_dir as it goes
    source = open_model(params, paths.model, device, out_dir=out_dir)
    keys = [f"{i}.{n}" for i in range(len(source.layers)) for n in source.adapter.linears]
    if not isinstance(sparsity, dict):
        sparsity = dict.fromkeys(keys, float(sparsity))
    missing = [k for k in keys if k not in sparsity]
    if missing:
        raise ConfigError(f"{paths.schedule} has no sparsity for {missing[0]} (+{len(missing) - 1} more): made for "
                          f"another model? rerun the schedule stage")
    if p.mode == "sequential":
        windows, _ = read_calibration(paths.calib)
        stats = prune_model(source, sparsity, p, runner=source.runner(windows),
                            hessian_dtype=getattr(torch, params.hessians.dtype), step=step)
    else:
        store = HessianStore.open_for_reading(paths.hessians, model_fingerprint(paths.model),
                                              read_calibration(paths.calib)[1]["fingerprint"])
        stats = prune_model(source, sparsity, p, store=store, step=step)
    overall = sum(s["sparsity"] * s["params"] for s in stats.values()) / sum(s["params"] for s in stats.values())
    log.info("pruned to %.4f overall sparsity of the decoder linears (%s schedule)", overall, schedule)
    extra = {"dense_fingerprint": model_fingerprint(paths.model), "prune": p.model_dump(mode="json"),
             "schedule": schedule, "overall_sparsity": overall, "linears": stats}
    source.save(TokenizerFiles(paths.model), extra)


def quantize_into(params: Params, model_dir: Path, out_dir: Path, step) -> None:
    """GPTQ of the model in `model_dir` (its exact zeros kept) with quantize's settings, saved
    to `out_dir` with its grids; with quantize.enabled false, a folder that says so."""
    paths, q, device = Paths.of(params), params.quantize, pick_device(params.runtime.device)
    if not q.enabled:
        # The out must exist for DVC; it records that this run has no quantized model.
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_json(tmp / "prunekit.json", {"quantize": q.model_dump(mode="json"), "enabled": False})
        replace_dir(tmp, out_dir)
        return
    windows, _ = read_calibration(paths.calib)
    log.info("GPTQ %d-bit (%s) of %s on %d calibration windows, %s", q.bits,
             f"groups of {q.groupsize}" if q.groupsize else "per channel", model_dir, len(windows), device)
    # streamed: one decoder layer in memory at a time, written to out_dir as it goes
    source = open_model(params, model_dir, device, out_dir=out_dir)
    grids: dict = {}
    stats = quantize_model(source, source.runner(windows), q, hessian_dtype=getattr(torch, params.hessians.dtype),
                           step=step, grids=grids)
    head = stats.pop("head", None)
    extra = {"source_fingerprint": read_json(model_dir / "prunekit.json")["fingerprint"],
             "quantize": q.model_dump(mode="json"), "enabled": True, "linears": stats, "head": head, "qparams": QPARAMS}
    # The grids let the export stage store integer codes that read back to these exact weights;
    # written into the folder before it is published, so a model never appears without them.
    source.save(TokenizerFiles(model_dir), extra, more_files=lambda folder: save_grids(folder / QPARAMS, grids))
