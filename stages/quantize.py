"""quantize: pruned model + calibration -> data/compressed/<model> (GPTQ, zeros kept exactly)."""
from __future__ import annotations

from prunekit.config import Params
from stages.common import Paths
from stages.making import quantize_into


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.pruned, paths.calib]


def run(params: Params, step) -> None:
    paths = Paths.of(params)
    quantize_into(params, paths.pruned, paths.compressed, step)
