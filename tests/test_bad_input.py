"""Bad input through the real entry points: one clear line on stderr, exit status 2, no traceback,
and nothing half-written. Cases that params.yaml alone refuses run `prunekit stage` in this
process (its `main`); the others run it in a process of its own, as `dvc repro` does.

Every case: (stage [args], params overrides, expected message, out that must not appear, setup).
The setups make the bad artifact (a model with NaN weights, a Hessian store that is corrupted,
truncated, from another model or not a Hessian, a broken schedule or calibration file) next to
the good ones of a prepared working directory.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml
import zarr
from conftest import tiny_params

import flows.pipeline  # noqa: F401  Prefect sets up its logging on import: here, not under a test's captured stderr
from prunekit.storage.hessian_store import HessianStore

STORE, CALIB = "data/hessians/tiny__c4.zarr", "data/calib/tiny__c4.parquet"


def _stage(cwd: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", "stage", name, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models, prefect_api) -> Path:
    """A working directory after `dvc repro hessians`: prepared tiny model, calibration, store."""
    cwd = tmp_path_factory.mktemp("bad")
    (cwd / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_models["llama"])))
    for stage in ("prepare_model", "calibrate", "hessians"):
        proc = _stage(cwd, stage)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd


@dataclass
class Case:
    stage: str
    override: dict
    message: str
    absent: str | None = None  # relative to the working directory
    setup: str | None = None
    args: tuple = ()


# --- setups: each gets (workdir, params dict, tmp_path) and may change the params ---------------

def _gpt2(cwd, params, tmp):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp / "gpt2")
    params["model"]["source"] = str(tmp / "gpt2")


def _short_text(cwd, params, tmp):
    (tmp / "short.txt").write_text("Too short to calibrate on.\n")
    params["calibration"]["source"] = str(tmp / "short.txt")


def _nan_weights(cwd, params, tmp):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = params["model"]["source"]
    model = AutoModelForCausalLM.from_pretrained(source)
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    model.save_pretrained(tmp / "nan")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp / "nan")
    params["model"].update(name="nan", source=str(tmp / "nan"))


def _params_missing(cwd, params, tmp):
    (cwd / "params.yaml").unlink()


def _params_not_yaml(cwd, params, tmp):
    (cwd / "params.yaml").write_text("prune: [sparsity: 0.7\n  mode: {\n")


def _params_a_list(cwd, params, tmp):
    (cwd / "params.yaml").write_text("- prune\n- sparsity\n")


def _copy_store(cwd, params, name: str) -> Path:
    """The good calibration and store under calibration name `name` (same fingerprints)."""
    params["calibration"]["name"] = name
    shutil.copy(cwd / CALIB, cwd / f"data/calib/tiny__{name}.parquet")
    dst = cwd / f"data/hessians/tiny__{name}.zarr"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(cwd / STORE, dst)
    return dst


def _rewrite_layer1(path: Path, change) -> None:
    """Rewrite layer 1 with valid checksums, the q/k/v Hessian replaced by change(H)."""
    store = HessianStore(path, zarr.open_group(path, mode="r+"))
    layer = store.read_layer(1)
    layer["self_attn.q_proj"] = (change(layer["self_attn.q_proj"][0]), layer["self_attn.q_proj"][1])
    store.write_layer(1, layer, dict(store.root["layer_001"].attrs["linears"]))


def _nan_hessian(cwd, params, tmp):
    _rewrite_layer1(_copy_store(cwd, params, "nanh"), lambda H: H.fill_diagonal_(float("nan")))


def _not_psd_hessian(cwd, params, tmp):
    _rewrite_layer1(_copy_store(cwd, params, "notpsd"), lambda H: -H)
    _valid_schedule(cwd, params, tmp)


def _store_of_other_model(cwd, params, tmp):
    path = _copy_store(cwd, params, "othermodel")
    zarr.open_group(path, mode="r+").attrs["model_fingerprint"] = "0123456789abcdef"


def _store_of_other_calibration(cwd, params, tmp):
    path = _copy_store(cwd, params, "othercalib")
    zarr.open_group(path, mode="r+").attrs["calib_fingerprint"] = "0123456789abcdef"
    _valid_schedule(cwd, params, tmp)


def _shard(path: Path) -> Path:
    return path / "layer_001" / "self_attn.q_proj" / "c" / "0" / "0"


def _corrupted_shard(cwd, params, tmp):
    shard = _shard(_copy_store(cwd, params, "corrupt"))
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))


def _truncated_shard(cwd, params, tmp):
    shard = _shard(_copy_store(cwd, params, "truncated"))
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])


def _valid_schedule(cwd, params, tmp):
    from prunekit.models import adapter_for, load_model, prunable_parameters

    model = load_model(str(cwd / "data/models/tiny"))
    keys = prunable_parameters(model, adapter_for(model))
    path = cwd / "data/schedule/tiny.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sparsity": {k: 0.7 for k in keys}}))


def _schedule_missing(cwd, params, tmp):
    (cwd / "data/schedule/tiny.json").unlink(missing_ok=True)


def _schedule_not_json(cwd, params, tmp):
    path = cwd / "data/schedule/tiny.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"sparsity": {"0.self_attn.q_proj": 0.7,')


def _schedule_of_other_model(cwd, params, tmp):
    path = cwd / "data/schedule/tiny.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sparsity": {"0.attention.query_key_value": 0.7}}))


def _calibration_not_parquet(cwd, params, tmp):
    params["calibration"]["name"] = "junk"
    (cwd / "data/calib/tiny__junk.parquet").write_bytes(b"PAR1 this is not a parquet file")


FRESH = {"name": "fresh"}  # calibrate cases write to another name: the good file must stay
CASES = {
    # params.yaml itself
    "params.yaml missing": Case("prune", {}, "parameter file not found", "data/pruned", "_params_missing"),
    "params.yaml not YAML": Case("prune", {}, "params.yaml is not valid YAML: expected ',' or ']', but got ':' at line 2",
                                 "data/pruned", "_params_not_yaml"),
    "params.yaml a list": Case("schedule", {}, "invalid parameters in params.yaml", "data/schedule", "_params_a_list"),
    "unknown key": Case("schedule", {"schedule": {"allocatr": "uniform"}}, "invalid parameter schedule.allocatr"),
    "wrong type": Case("calibrate", {"calibration": {**FRESH, "nsamples": "many"}},
                       "invalid parameter calibration.nsamples", "data/calib/tiny__fresh.parquet"),
    "sparsity above 1": Case("prune", {"prune": {"sparsity": 1.5}}, "invalid parameter prune.sparsity"),
    "sparsity NaN": Case("prune", {"prune": {"sparsity": float("nan")}}, "invalid parameter prune.sparsity"),
    "unsupported structure 3:2": Case("prune", {"prune": {"structure": "3:2"}}, "invalid parameter prune.structure",
                                      "data/pruned"),
    "N:M with kmeans": Case("schedule", {"prune": {"structure": "2:4", "sparsity": 0.5}},
                            "needs schedule.allocator 'uniform'", "data/schedule"),
    "quantize bits 1": Case("quantize", {"quantize": {"bits": 1}}, "invalid parameter quantize.bits", "data/compressed"),
    "quantize bits 9": Case("quantize", {"quantize": {"bits": 9}}, "invalid parameter quantize.bits", "data/compressed"),
    "unknown task runner": Case("hessians", {"runtime": {"task_runner": "ray"}}, "invalid parameter runtime.task_runner"),
    "dask address without dask": Case("hessians", {"runtime": {"dask_address": "tcp://10.0.0.1:8786"}},
                                      "runtime.dask_address needs runtime.task_runner 'dask'"),
    "no workers": Case("prune", {"runtime": {"workers": 0}}, "invalid parameter runtime.workers"),
    # the model
    "missing model path": Case("prepare_model", {"model": {"name": "other", "source": "./no/such/model"}},
                               "model path not found", "data/models/other"),
    "unknown embedded model": Case("prepare_model", {"model": {"name": "other", "source": "embedded:llama-9000"}},
                                   "unknown embedded model", "data/models/other"),
    "unsupported architecture": Case("prepare_model", {"model": {"name": "other"}}, "unsupported architecture 'gpt2'",
                                     "data/models/other", "_gpt2"),
    "NaN weights": Case("prepare_model", {}, "has NaN or inf weights in model.layers.1.mlp.up_proj.weight",
                        "data/models/nan", "_nan_weights"),
    "NaN weights, streamed": Case("prepare_model", {"runtime": {"stream": True}},
                                  "has NaN or inf weights in model.layers.1.mlp.up_proj.weight", "data/models/nan",
                                  "_nan_weights"),
    "unsupported architecture, streamed": Case("prepare_model",
                                               {"model": {"name": "other"}, "runtime": {"stream": True}},
                                               "unsupported architecture 'gpt2'", "data/models/other", "_gpt2"),
    # calibration
    "no samples": Case("calibrate", {"calibration": {**FRESH, "nsamples": 0}}, "invalid parameter calibration.nsamples",
                       "data/calib/tiny__fresh.parquet"),
    "seqlen beyond the model": Case("calibrate", {"calibration": {**FRESH, "seqlen": 4096}},
                                    "exceeds the model's limit", "data/calib/tiny__fresh.parquet"),
    "text too short": Case("calibrate", {"calibration": {**FRESH, "nsamples": 64}}, "too short",
                           "data/calib/tiny__fresh.parquet", "_short_text"),
    "missing text file": Case("calibrate", {"calibration": {**FRESH, "source": "./nope.txt"}},
                              "calibration text file not found", "data/calib/tiny__fresh.parquet"),
    "calibrating on test text": Case("calibrate", {"calibration": {**FRESH, "source": "wikitext2"}}, "evaluation text",
                                     "data/calib/tiny__fresh.parquet"),
    "c4 overlap": Case("calibrate", {"calibration": {**FRESH, "c4_docs": [900, 1100]}}, "overlap the C4 evaluation",
                       "data/calib/tiny__fresh.parquet"),
    "missing input": Case("hessians", {"calibration": {"name": "nocalib"}}, "missing input",
                          "data/hessians/tiny__nocalib.zarr"),
    "calibration file not parquet": Case("hessians", {}, "is not a calibration file written by the calibrate stage",
                                         "data/hessians/tiny__junk.zarr", "_calibration_not_parquet"),
    # the Hessian store
    "store from another model": Case("estimate", {}, "was computed for another model; run `dvc repro -f hessians`",
                                     "data/estimates", "_store_of_other_model"),
    "store from other calibration": Case("prune", {"prune": {"mode": "parallel"}},
                                         "was computed from other calibration data", "data/pruned",
                                         "_store_of_other_calibration"),
    "corrupted store shard": Case("estimate", {}, "layer 1 array self_attn.q_proj", "data/estimates",
                                  "_corrupted_shard"),
    "truncated store shard": Case("estimate", {}, "layer 1 array self_attn.q_proj", "data/estimates",
                                  "_truncated_shard"),
    "NaN Hessian": Case("estimate", {}, "layer 1 array self_attn.q_proj holds NaN or inf", "data/estimates",
                        "_nan_hessian"),
    "Hessian not positive semi-definite": Case("prune", {"prune": {"mode": "parallel"}},
                                               "layer 1 array self_attn.q_proj is not positive semi-definite",
                                               "data/pruned", "_not_psd_hessian"),
    # the schedule
    "schedule missing": Case("prune", {}, "missing input", "data/pruned", "_schedule_missing"),
    "schedule not JSON": Case("prune", {}, "tiny.json is unreadable or not JSON (JSONDecodeError); rerun the schedule",
                              "data/pruned", "_schedule_not_json"),
    "schedule of another model": Case("prune", {}, "has no sparsity for 0.self_attn.q_proj", "data/pruned",
                                      "_schedule_of_other_model"),
    # evaluation
    "unknown evaluation dataset": Case("evaluate", {"evaluate": {"datasets": ["imagenet"]}},
                                       "unknown evaluation dataset 'imagenet'", "reports/metrics/dense.json",
                                       args=("dense",)),
    "unknown model variant": Case("evaluate", {}, "needs one of dense, quantized, uniform, pruned, compressed, got 'bogus'", "reports/metrics", args=("bogus",)),
}


def _refused_by_params(workdir: Path, stage: str) -> bool:
    """Whether params.yaml alone refuses the stage (load_params or the stage's check)."""
    from flows.pipeline import stage_module
    from prunekit.config import ConfigError, load_params

    try:
        stage_module(stage).check(load_params(workdir / "params.yaml"))
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_cleanly(name, workdir, tiny_models, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    params = tiny_params(tiny_models["llama"], **case.override)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    if case.absent:  # left by an earlier case's setup: the check is that this run makes none
        shutil.rmtree(workdir / case.absent) if (workdir / case.absent).is_dir() else (workdir / case.absent).unlink(
            missing_ok=True)
    if case.setup:
        globals()[case.setup](workdir, params, tmp_path)
        if not case.setup.startswith("_params_"):  # those break params.yaml itself
            (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    if _refused_by_params(workdir, case.stage):  # pure validation: the command's own main, in process
        from flows import cli

        monkeypatch.chdir(workdir)
        # the command configures logging for its process: give this one its own back afterwards
        monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
        monkeypatch.setattr(logging.root, "level", logging.root.level)
        with mock.patch.dict(os.environ):
            code = cli.main(["stage", case.stage, *case.args])
        stderr = capsys.readouterr().err
    else:  # the stage runs: its own process, as dvc repro starts it
        proc = _stage(workdir, case.stage, *case.args)
        code, stderr = proc.returncode, proc.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-2000:]
    assert lines[-1].startswith("error: ") and case.message in lines[-1], lines[-3:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert "Traceback" not in stderr
    if case.absent:
        assert not (workdir / case.absent).exists(), case.absent
    assert (workdir / CALIB).is_file() and HessianStore.open_for_reading(
        workdir / STORE, json.loads((workdir / "data/models/tiny/prunekit.json").read_text())["fingerprint"])
