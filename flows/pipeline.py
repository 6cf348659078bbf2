"""Prefect orchestration: each stage runs as a flow whose per-layer steps are tasks, and the
whole pipeline runs as one flow of stage subflows.

    prunekit flow                       # every stage, in order, as one Prefect flow (no DVC cache)
    prunekit run                        # dvc repro: the same stages, each in its own process
                                        # (`prunekit stage <name>`), cached by DVC

The library's layer loops call `step(fn, *args)` for every per-layer unit of work; here that
step becomes a Prefect task named after the function, so runs show one task per layer with its
state, timing and logs. Work the library submits with `step.submit(fn, *args)` (calibration
shards of a layer's Hessians, independent layers in parallel pruning) goes to the stage flow's
task runner, chosen by `runtime.task_runner`:

    threads    Prefect's ThreadPoolTaskRunner (default; torch releases the GIL in its kernels)
    processes  Prefect's ProcessPoolTaskRunner with `runtime.workers` processes
    dask       prefect-dask's DaskTaskRunner: a LocalCluster of `runtime.workers` single-thread
               worker processes, or the existing scheduler at `runtime.dask_address`
"""
from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from prunekit.config import ConfigError, Params, RuntimeParams
from prunekit.storage.hessian_store import StoreError
from stages import STAGES
from stages.common import Paths, require


def _refusing(fn: Callable) -> Callable:
    """fn, with bad input (ConfigError, StoreError) ending its task run as Failed with the
    one-line reason — no traceback in the logs — and raised again from `.result()`/the call."""

    @functools.wraps(fn)
    def unit(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, StoreError) as exc:
            return Failed(message=str(exc), data=exc)

    return unit


class PrefectStep:
    """The `step` the library's loops get: each unit of work becomes a Prefect task named after
    the function and its layer (not cached: inputs are live tensors).

    `step(fn, *args)` runs the task here and returns its result; `step.submit(fn, *args)` hands
    it to the flow's task runner and returns a Prefect future (futures among the arguments are
    resolved where the task runs — on a Dask worker, without passing through this process).
    """

    @staticmethod
    def _task(fn: Callable, args: tuple):
        name = fn.__name__.strip("_")
        layer = next((a for a in args if isinstance(a, int) and not isinstance(a, bool)), None)
        run_name = f"{name}-{layer}" if layer is not None else name
        return task(_refusing(fn), name=name, task_run_name=run_name, cache_policy=NO_CACHE, persist_result=False)

    def __call__(self, fn: Callable, *args, **kwargs):
        result = self._task(fn, args)(*args, **kwargs)
        if isinstance(result, State) and result.is_failed():  # a refusal: raise it here
            result.result()
        return result

    def submit(self, fn: Callable, *args, **kwargs):
        return self._task(fn, args).submit(*args, **kwargs)


prefect_step = PrefectStep()


def task_runner(runtime: RuntimeParams) -> TaskRunner:
    """The task runner `runtime.task_runner` names (see the module docstring)."""
    if runtime.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=runtime.workers)
    if runtime.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=runtime.workers)
    from prefect_dask import DaskTaskRunner

    if runtime.dask_address is not None:
        return DaskTaskRunner(address=runtime.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": runtime.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "silence_logs": logging.ERROR})


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
                 validate_parameters=False, task_runner=task_runner(params.runtime))(
        params, prefect_step, *args, return_state=True)
    if refused:
        raise refused[0]
    state.result()


def stage_module(name: str):
    return importlib.import_module(f"stages.{name}")


@flow(name="pipeline", persist_result=False, validate_parameters=False)
def pipeline(params: Params) -> None:
    """Every stage in dvc.yaml order, as subflows of one flow run."""
    for name in STAGES:
        module = stage_module(name)
        for variant in getattr(module, "VARIANTS", [None]):
            args = () if variant is None else (variant,)
            require(*module.needs(Paths.of(params), *args))
            run_stage(name, module.run, params, *args)
