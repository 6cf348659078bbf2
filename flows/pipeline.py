"""Prefect orchestration: each stage runs as a flow whose per-layer steps are tasks, and the
whole pipeline runs as one flow of stage subflows.

    python -m flows.pipeline            # every stage, in order, as one Prefect flow (no DVC cache)
    dvc repro                           # the same stages, each in its own process, cached by DVC

The library's layer loops call `step(fn, *args)` for every per-layer unit of work; here that
step becomes a Prefect task named after the function, so runs show one task per layer with its
state, timing and logs.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from prunekit.config import ConfigError, Params, load_params
from prunekit.hessian_store import StoreError

STAGES = ("prepare_model", "calibrate", "hessians", "estimate", "schedule", "prune", "quantize", "evaluate", "report")


def prefect_step(fn: Callable, *args, **kwargs):
    """Run one per-layer unit of work as a Prefect task (not cached: inputs are live tensors)."""
    name = fn.__name__.strip("_")
    layer = next((a for a in args if isinstance(a, int) and not isinstance(a, bool)), None)
    run_name = f"{name}-{layer}" if layer is not None else name
    return task(fn, name=name, task_run_name=run_name, cache_policy=NO_CACHE, persist_result=False)(*args, **kwargs)


def run_stage(name: str, run: Callable[..., None], params: Params, *args: str) -> None:
    """Run one stage's `run(params, step, *args)` as a Prefect flow named after the stage.

    Bad input found inside the stage (ConfigError, StoreError) fails the flow run with the
    user's one-line reason as its state message — no traceback in the logs — and is raised
    again here for the caller to report. Anything else propagates with its traceback.
    """
    refused: list[Exception] = []

    def stage(params: Params, step: Callable, *args: str):
        try:
            run(params, step, *args)
        except (ConfigError, StoreError) as exc:
            refused.append(exc)
            return Failed(message=str(exc))

    stage.__name__ = name
    state = flow(stage, name="@".join((name, *args)), log_prints=True, persist_result=False,
                 validate_parameters=False)(params, prefect_step, *args, return_state=True)
    if refused:
        raise refused[0]
    state.result()


def stage_module(name: str):
    return importlib.import_module(f"stages.{name}")


@flow(name="pipeline", persist_result=False, validate_parameters=False)
def pipeline(params: Params) -> None:
    """Every stage in dvc.yaml order, as subflows of one flow run."""
    from stages.common import Paths, require

    for name in STAGES:
        module = stage_module(name)
        for variant in getattr(module, "VARIANTS", [None]):
            args = () if variant is None else (variant,)
            require(*module.needs(Paths.of(params), *args))
            run_stage(name, module.run, params, *args)


def main() -> None:
    from stages.common import setup_environment

    setup_environment()
    try:
        params = load_params("params.yaml")
        for name in STAGES:
            stage_module(name).check(params)
        pipeline(params)
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
