"""check: params.yaml -> data/params.checked, before any other stage runs.

Every stage of dvc.yaml depends on this one, so `dvc repro` and `dvc exp run -S key=value` run
every stage's check(params) (types, ranges, keys, the calibration and evaluation texts, the model
source) before DVC deletes a single output of the stages that a changed parameter would rerun:
a bad value ends here with one line, the workspace as it was and nothing of it in dvc.lock.

The out is a constant line (persist: it is never deleted, and a change of parameters leaves it
the same), so passing the check reruns nothing downstream by itself.
"""
from __future__ import annotations

from prunekit.artifacts import write_atomic
from prunekit.config import Params
from prunekit.models import pick_device
from stages import (
    baseline,
    calibrate,
    estimate,
    evaluate,
    export,
    hessians,
    prepare_model,
    prune,
    quantize,
    report,
    schedule,
    sensitivity,
)
from stages.common import Paths

CHECKED = b"params.yaml passed every stage's check (stages/check.py)\n"


def check(params: Params) -> None:
    pick_device(params.runtime.device)  # one this machine has
    for stage in (prepare_model, calibrate, hessians, estimate, sensitivity, schedule, prune, quantize, baseline,
                  export, evaluate, report):
        stage.check(params)


def needs(paths: Paths) -> list:
    return []


def run(params: Params, step) -> None:
    check(params)  # also when run by the pipeline flow
    path = Paths.of(params).checked
    if not path.is_file() or path.read_bytes() != CHECKED:
        write_atomic(path, CHECKED)
