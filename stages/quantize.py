"""quantize: pruned model + calibration -> data/compressed/<model> (GPTQ, zeros kept exactly)."""
from __future__ import annotations

import shutil

import torch

from prunekit.artifacts import read_json, state_fingerprint, write_json
from prunekit.config import Params
from prunekit.data import read_calibration
from prunekit.drivers import quantize_model
from prunekit.layerwise import LayerwiseRunner
from prunekit.models import adapter_for, load_model, load_tokenizer, pick_device, save_model
from stages.common import Paths, main


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.pruned, paths.calib]


def run(params: Params, step) -> None:
    paths, q, device = Paths.of(params), params.quantize, pick_device(params.runtime.device)
    if not q.enabled:
        # The out must exist for DVC; it records that this run has no quantized model.
        shutil.rmtree(paths.compressed, ignore_errors=True)
        write_json(paths.compressed / "prunekit.json", {"quantize": q.model_dump(mode="json"), "enabled": False})
        return
    windows, _ = read_calibration(paths.calib)
    model = load_model(str(paths.pruned), device=device)
    adapter = adapter_for(model)
    stats = quantize_model(model, adapter, LayerwiseRunner(model, adapter, windows, device), q,
                           hessian_dtype=getattr(torch, params.hessians.dtype), step=step)
    pruned_meta = read_json(paths.pruned / "prunekit.json")
    save_model(model.cpu(), load_tokenizer(str(paths.pruned)), paths.compressed, extra={
        "fingerprint": state_fingerprint(model), "pruned_fingerprint": pruned_meta["fingerprint"],
        "quantize": q.model_dump(mode="json"), "enabled": True, "linears": stats,
    })


if __name__ == "__main__":
    main("quantize")
