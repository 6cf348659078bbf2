"""SIGKILL the hessians and prune stages at random points (benchmarks/kill_resume.py; the benchmark
runs 5 trials per stage, the test 2 to keep the suite short):
reruns keep finished Hessian layers and end bit-identical to an uninterrupted run; a killed
prune never leaves a partial model folder."""
import os

import pytest
from conftest import ROOT

from benchmarks.kill_resume import ok, run_trials


@pytest.mark.slow
def test_kill_and_resume(prefect_api, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    results = run_trials(tmp_path, env, trials=2, seed=0)
    assert all(map(ok, results)), [r for r in results if not ok(r)]
    assert sum(r["killed"] for r in results) >= 2  # trials really were cut short
