"""baseline@<model>: what the compressed model is compared with, made exactly like it.

    prunekit stage baseline uniform     # dense -> data/uniform/<model>: prune.sparsity in every linear
    prunekit stage baseline quantized   # dense -> data/quantized/<model>: GPTQ alone (quantize's settings)

The uniform model is SparseGPT (or prune.method) at the same sparsity with the same settings
and calibration as the scheduled one, so that pruned / uniform measures the schedule alone;
the quantized model is the dense one through the same GPTQ, so that compressed / quantized
measures what pruning costs on top of quantization.
"""
from __future__ import annotations

from prunekit.config import Params
from stages import common
from stages.common import Paths
from stages.making import prune_into, quantize_into

VARIANTS = common.BASELINES  # the stage runs once per baseline (dvc.yaml's foreach)


def check(params: Params) -> None:
    pass


def needs(paths: Paths, variant: str = "uniform") -> list:
    return [paths.model, paths.calib]


def run(params: Params, step, variant: str = "uniform") -> None:
    paths = Paths.of(params)
    out = paths.model_dir(variant)
    if variant == "uniform":
        prune_into(params, params.prune.sparsity, out, step, schedule="uniform")
    else:
        quantize_into(params, paths.model, out, step)
