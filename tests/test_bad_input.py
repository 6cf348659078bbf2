"""Bad input through the real stage CLIs: one clear line on stderr, exit status 2, no outs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_params


def _stage(cwd: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models, prefect_api) -> Path:
    """A working directory with a prepared tiny model, as after `dvc repro prepare_model`."""
    cwd = tmp_path_factory.mktemp("bad")
    (cwd / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_models["llama"])))
    assert _stage(cwd, "prepare_model").returncode == 0
    return cwd


def _gpt2(tmp: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(path)
    return path


CASES = {
    "sparsity above 1": ("prune", {"prune": {"sparsity": 1.5}}, "invalid parameter prune.sparsity", None),
    "no samples": ("calibrate", {"calibration": {"nsamples": 0}}, "invalid parameter calibration.nsamples", "calib"),
    "unknown key": ("schedule", {"schedule": {"allocatr": "uniform"}}, "invalid parameter schedule.allocatr", None),
    "missing model path": ("prepare_model", {"model": {"name": "other", "source": "./no/such/model"}},
                           "model path not found", "model"),
    "unknown embedded model": ("prepare_model", {"model": {"name": "other", "source": "embedded:llama-9000"}},
                               "unknown embedded model", "model"),
    "missing input": ("hessians", {}, "missing input", "hessians"),
    "seqlen beyond the model": ("calibrate", {"calibration": {"seqlen": 4096}}, "exceeds the model's limit", "calib"),
    "text too short": ("calibrate", {"calibration": {"source": "SHORT", "nsamples": 64}}, "too short", "calib"),
    "missing text file": ("calibrate", {"calibration": {"source": "./nope.txt"}}, "calibration text file not found", "calib"),
    "calibrating on test text": ("calibrate", {"calibration": {"source": "wikitext2"}}, "evaluation text", "calib"),
    "c4 overlap": ("calibrate", {"calibration": {"c4_docs": [900, 1100]}}, "overlap the C4 evaluation", "calib"),
    "N:M with kmeans": ("schedule", {"prune": {"structure": "2:4", "sparsity": 0.5}}, "needs schedule.allocator 'uniform'", "schedule"),
    "unsupported architecture": ("prepare_model", {"model": {"name": "other", "source": "GPT2"}},
                                 "unsupported architecture 'gpt2'", "model"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(case, workdir, tiny_models, tmp_path):
    stage, override, message, out = CASES[case]
    params = tiny_params(tiny_models["llama"], **override)
    if params["calibration"]["source"] == "SHORT":
        (tmp_path / "short.txt").write_text("Too short to calibrate on.\n")
        params["calibration"]["source"] = str(tmp_path / "short.txt")
    if params["model"]["source"] == "GPT2":
        params["model"]["source"] = str(_gpt2(tmp_path))
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _stage(workdir, stage)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-3:]
    assert "Traceback" not in proc.stderr
    if out == "model":
        assert not (workdir / "data" / "models" / "other").exists()
    elif out == "calib":
        assert not list((workdir / "data").glob("calib/*"))
    elif out == "hessians":
        assert not (workdir / "data" / "hessians").exists()
    elif out == "schedule":
        assert not (workdir / "data" / "schedule").exists()
