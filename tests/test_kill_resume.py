"""SIGKILL the hessians, prune, quantize and export stages at random points
(benchmarks/kill_resume.py; the benchmark runs 5 trials per stage, the test 2 of hessians and
prune and 1 of quantize and export, to keep the suite short): reruns keep finished Hessian
layers and end bit-identical to an uninterrupted run; a killed stage never leaves a partial
model folder, and its rerun leaves no temporary folder."""
import os

import pytest
from conftest import ROOT

from benchmarks.kill_resume import ok, run_trials


@pytest.mark.slow
def test_kill_and_resume(prefect_api, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    results = run_trials(tmp_path, env, trials={"hessians": 2, "prune": 2, "quantize": 1, "export": 1}, seed=0)
    assert all(map(ok, results)), [r for r in results if not ok(r)]
    assert sum(r["killed"] for r in results) >= 4  # trials really were cut short
