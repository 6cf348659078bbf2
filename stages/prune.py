"""prune: model + calibration (+ dense Hessians in parallel mode) + schedule -> data/pruned/<model>."""
from __future__ import annotations

from pathlib import Path

from prunekit.config import ConfigError, Params
from stages.common import Paths, read_artifact
from stages.making import prune_into


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
    paths = Paths.of(params)
    prune_into(params, read_schedule(paths.schedule), paths.pruned, step, schedule=params.schedule.allocator)
