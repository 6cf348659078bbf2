"""quantize: pruned model + calibration -> data/compressed/<model> (GPTQ, zeros kept exactly)."""
from __future__ import annotations

import shutil

import torch

from prunekit.artifacts import read_json, replace_dir, write_json
from prunekit.compression.quantize import quantize_model
from prunekit.config import Params
from prunekit.data import read_calibration
from prunekit.models import pick_device
from prunekit.storage.packing import QPARAMS, save_grids
from stages.common import Paths, log, open_model, tokenizer_of


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.pruned, paths.calib]


def run(params: Params, step) -> None:
    paths, q, device = Paths.of(params), params.quantize, pick_device(params.runtime.device)
    if not q.enabled:
        # The out must exist for DVC; it records that this run has no quantized model.
        tmp = paths.compressed.with_name(paths.compressed.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_json(tmp / "prunekit.json", {"quantize": q.model_dump(mode="json"), "enabled": False})
        replace_dir(tmp, paths.compressed)
        return
    windows, _ = read_calibration(paths.calib)
    log.info("GPTQ %d-bit (%s) of %s on %d calibration windows, %s", q.bits,
             f"groups of {q.groupsize}" if q.groupsize else "per channel", paths.pruned, len(windows), device)
    # streamed: one decoder layer in memory at a time, written to paths.compressed as it goes
    source = open_model(params, paths.pruned, device, out_dir=paths.compressed)
    grids: dict = {}
    stats = quantize_model(source, source.runner(windows), q, hessian_dtype=getattr(torch, params.hessians.dtype),
                           step=step, grids=grids)
    pruned_meta = read_json(paths.pruned / "prunekit.json")
    extra = {"pruned_fingerprint": pruned_meta["fingerprint"], "quantize": q.model_dump(mode="json"),
             "enabled": True, "linears": stats, "qparams": QPARAMS}
    # The grids let the export stage store integer codes that read back to these exact weights;
    # written into the folder before it is published, so a model never appears without them.
    grid_tensors = {f"{source.adapter.layers}.{key}.weight": g for key, g in grids.items()}
    source.save(tokenizer_of(paths.pruned), extra, more_files=lambda folder: save_grids(folder / QPARAMS, grid_tensors))
