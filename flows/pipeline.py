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
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, tags, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging.handlers import APILogHandler
from prefect.states import Failed, State
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from prunekit.artifacts import fingerprint, read_json
from prunekit.config import ConfigError, Params, RuntimeParams
from prunekit.reporting.provenance import git_state
from prunekit.storage.hessian_store import StoreError
from stages import STAGES
from stages.common import VARIANTS, Paths, require


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


@contextmanager
def logs_to_prefect() -> Iterator[None]:
    """The library's and the stages' log records also go to the Prefect API while a stage's
    flow runs (attached to its flow or task run), besides the console."""
    handler = APILogHandler()
    loggers = [logging.getLogger(name) for name in ("prunekit", "stages")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def run_labels(params: Params) -> dict[str, str]:
    """Tags of every flow run: the commit, the parameters' fingerprint (`runtime` aside) and,
    under `dvc exp run`, the experiment's name — so the flow runs of experiment X are found by
    its tag, and a flow run names what made it."""
    config = params.model_dump(mode="json")
    config.pop("runtime")
    commit = git_state(Path.cwd()).get("commit")
    labels = {"params": f"params:{fingerprint(config)}", "commit": f"commit:{(commit or 'none')[:12]}"}
    if os.environ.get("DVC_EXP_NAME"):
        labels["experiment"] = f"exp:{os.environ['DVC_EXP_NAME']}"
    return labels


def publish_artifacts(name: str, params: Params, *args: str) -> None:
    """What a stage measured, as Prefect artifacts of its flow run: the perplexities of an
    evaluation (a table), and the report (markdown) with the summary metrics (a table)."""
    reports = Paths.of(params).reports
    if name == "evaluate":
        metrics = read_json(reports / "metrics" / f"{args[0]}.json")
        if "ppl" in metrics:
            create_table_artifact(key=f"ppl-{args[0]}", description=metrics["protocol"], table=[
                {"text": text, "ppl": ppl, "ci95_lo": metrics["ppl_ci95"][text][0], "ci95_hi": metrics["ppl_ci95"][text][1]}
                for text, ppl in metrics["ppl"].items()])
    elif name == "report":
        create_markdown_artifact(key="report", markdown=(reports / "report.md").read_text(),
                                 description=f"report of {params.model.name}")
        summary = read_json(reports / "metrics.json")
        create_table_artifact(key="metrics", table=[
            {"model": variant, "text": text, "ppl": ppl} for variant, values in summary.items()
            if variant in VARIANTS for text, ppl in values.items()])


def run_stage(name: str, run: Callable[..., None], params: Params, *args: str) -> None:
    """Run one stage's `run(params, step, *args)` as a Prefect flow named after the stage.

    Bad input found inside the stage (ConfigError, StoreError) fails the flow run with the
    user's one-line reason as its state message — no traceback in the logs — and is raised
    again here for the caller to report. Anything else propagates with its traceback.
    """
    refused: list[Exception] = []
    full_name = "@".join((name, *args))

    def stage(params: Params, step: Callable, *args: str):
        try:
            with logs_to_prefect():
                run(params, step, *args)
        except (ConfigError, StoreError) as exc:
            refused.append(exc)
            return Failed(message=str(exc))
        publish_artifacts(name, params, *args)

    stage.__name__ = name
    labels = run_labels(params)
    with tags(*labels.values()):
        state = flow(stage, name=full_name, flow_run_name=f"{full_name} {labels['params']}", log_prints=True,
                     persist_result=False, validate_parameters=False, task_runner=task_runner(params.runtime))(
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
