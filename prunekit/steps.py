"""How the library hands out units of work, without knowing who runs them.

Every layer loop calls `step(fn, *args)` for each per-layer unit of work; by default that is
`call`, a direct call. The Prefect flows pass a step that runs `fn` as a named task, so
orchestration wraps the same loop instead of copying it. Work that may leave the process goes
through `submit(step, fn, *args)`: a step with a `submit` method (the flows' Prefect step hands
it to the flow's task runner: threads, processes or Dask) returns a future with `.result()`;
a plain step runs the work at once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Step = Callable[..., Any]


def call(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


@dataclass(frozen=True)
class Done:
    """The future of work already run in place (a step without `submit`)."""

    value: Any

    def result(self) -> Any:
        return self.value


def submit(step: Step, fn: Callable, *args) -> Any:
    """`step.submit(fn, *args)` when the step can run work elsewhere, else run it now."""
    if hasattr(step, "submit"):
        return step.submit(fn, *args)
    return Done(step(fn, *[a.value if isinstance(a, Done) else a for a in args]))
