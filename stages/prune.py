"""prune: model + calibration (+ dense Hessians in parallel mode) + schedule -> data/pruned/<model>."""
from __future__ import annotations

import math
from pathlib import Path

from prunekit.config import ConfigError, Params
from stages.common import Paths, read_artifact
from stages.making import prune_into


def check(params: Params) -> None:
    pass


def read_schedule(path: Path, target: float) -> dict[str, float]:
    """The schedule stage's {'layer.linear': sparsity}, every value in [0, 1), made for the
    overall sparsity `target` (prune.sparsity)."""
    schedule = read_artifact(path, "schedule")
    sparsity = schedule.get("sparsity") if isinstance(schedule, dict) else None
    if not isinstance(sparsity, dict) or not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in sparsity.values()):
        raise ConfigError(f"{path} holds no valid 'sparsity' table (values in [0, 1)); rerun the schedule stage")
    made_for = schedule.get("target")
    if not isinstance(made_for, (int, float)) or not math.isclose(made_for, target, abs_tol=1e-9):
        raise ConfigError(f"{path} was made for sparsity {made_for}, prune.sparsity is {target}: rerun the schedule "
                          f"stage (dvc repro schedule)")
    return sparsity


def needs(paths: Paths) -> list:
    return [paths.model, paths.calib, paths.schedule]


def run(params: Params, step) -> None:
    paths = Paths.of(params)
    prune_into(params, read_schedule(paths.schedule, params.prune.sparsity), paths.pruned, step, schedule=params.schedule.allocator)
