"""Bad input through the real entry points: one clear line on stderr, exit status 2, no traceback,
and the working directory exactly as it was (no file written, deleted or touched). Cases that
params.yaml alone refuses run `prunekit stage` in this process (its `main`); the others run it
in a process of its own, as `dvc repro` does (tests/test_pipeline_dvc.py runs bad values through
`dvc repro` and `dvc exp run -S`).

Every case: (stage [args], params overrides, expected message, out that must not appear, setup).
The setups make the bad input (a model with NaN weights; a GGUF file of random bytes or cut in
half; a config that is not JSON; a hub id while offline; a text that is not UTF-8; a checkpoint
cut in half; a Hessian store that is corrupted, truncated, from another model or other
calibration; a broken schedule, one for another sparsity, a calibration file that is not one)
next to the good ones of a prepared working directory.
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
import torch
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
    path.write_text(json.dumps({"target": 0.7, "sparsity": {k: 0.7 for k in keys}}))


def _schedule_missing(cwd, params, tmp):
    (cwd / "data/schedule/tiny.json").unlink(missing_ok=True)


def _schedule_not_json(cwd, params, tmp):
    path = cwd / "data/schedule/tiny.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"sparsity": {"0.self_attn.q_proj": 0.7,')


def _schedule_of_other_model(cwd, params, tmp):
    path = cwd / "data/schedule/tiny.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target": 0.7, "sparsity": {"0.attention.query_key_value": 0.7}}))


def _random_gguf(cwd, params, tmp):
    (tmp / "random.gguf").write_bytes(os.urandom(4096))
    params["model"].update(name="other", source=str(tmp / "random.gguf"))


def _truncated_gguf(cwd, params, tmp):
    """A valid GGUF file (written by the gguf package) cut in half."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(tmp / "whole.gguf", "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.ones((256, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = (tmp / "whole.gguf").read_bytes()
    (tmp / "half.gguf").write_bytes(data[: len(data) // 2])
    params["model"].update(name="other", source=str(tmp / "half.gguf"))


def _config_not_json(cwd, params, tmp):
    shutil.copytree(params["model"]["source"], tmp / "badconfig")
    (tmp / "badconfig" / "config.json").write_text('{"model_type": "llama",')
    params["model"].update(name="other", source=str(tmp / "badconfig"))


def _hub_id_offline(cwd, params, tmp):
    params["model"].update(name="other", source="some-org/some-model")


def _text_not_utf8(cwd, params, tmp):
    (tmp / "latin1.txt").write_bytes("Le café est très chaud. ".encode("latin-1") * 2000)
    params["calibration"]["source"] = str(tmp / "latin1.txt")


def _model_as(cwd, params, name: str) -> Path:
    """The prepared tiny model and its evaluation tokens under model name `name`; the copied folder."""
    params["model"]["name"] = name
    shutil.copy(cwd / "data/calib/tiny__eval.parquet", cwd / f"data/calib/{name}__eval.parquet")
    dst = cwd / "data/pruned" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(cwd / "data/models/tiny", dst)
    return dst


def _truncated_safetensors(cwd, params, tmp):
    weights = _model_as(cwd, params, "cut") / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


def _nan_in_pruned(cwd, params, tmp):
    from safetensors.torch import load_file, save_file

    weights = _model_as(cwd, params, "naneval") / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})


def _changed_pruned(cwd, params, tmp):
    """The pruned folder edited after the prune stage wrote it (one finite weight changed)."""
    from safetensors.torch import load_file, save_file

    weights = _model_as(cwd, params, "changed") / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] += 0.5
    save_file(tensors, weights, metadata={"format": "pt"})


def _estimates_and_a_search(cwd, params, tmp):
    """The schedule stage's inputs (made by their stages), and the reports of an earlier search
    that a refusal must keep."""
    for stage, out in (("estimate", "data/estimates/tiny.parquet"), ("sensitivity", "data/sensitivity/tiny__c4.parquet")):
        if not (cwd / out).is_file():
            proc = _stage(cwd, stage)
            assert proc.returncode == 0, proc.stderr[-2000:]
    (cwd / "reports").mkdir(exist_ok=True)
    (cwd / "reports/search.csv").write_text("generation,fitness,accepted,seconds\n0,1.5,True,0.1\n")


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
    "random bytes as .gguf": Case("prepare_model", {}, "does not start with the GGUF magic bytes", "data/models/other",
                                  "_random_gguf"),
    "truncated .gguf": Case("prepare_model", {}, "(a damaged or truncated GGUF file?)", "data/models/other",
                            "_truncated_gguf"),
    "config.json not JSON": Case("prepare_model", {}, "config.json' is not a valid JSON file", "data/models/other",
                                 "_config_not_json"),
    "hub id while offline": Case("prepare_model", {}, "cannot read the tokenizer of some-org/some-model",
                                 "data/models/other", "_hub_id_offline"),
    "device the machine lacks": Case("check", {"runtime": {"device": "cuda:7" if torch.cuda.is_available() else "cuda"}},
                                     "runtime.device", "data/params.checked"),
    "device name unknown": Case("check", {"runtime": {"device": "gpu"}}, "is not a device name", "data/params.checked"),
    "extra CLI argument": Case("prune", {}, "stage prune takes no variant, got 'extra'", "data/pruned", args=("extra",)),
    "two variants": Case("evaluate", {}, "unrecognized arguments: pruned", "reports/metrics/dense.json",
                         args=("dense", "pruned")),
    # calibration
    "text not UTF-8": Case("calibrate", {"calibration": {**FRESH}}, "latin1.txt is not UTF-8 text (byte 6 of",
                           "data/calib/tiny__fresh.parquet", "_text_not_utf8"),
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
    "estimate from a store of other calibration": Case("estimate", {}, "was computed from other calibration data",
                                                       "data/estimates", "_store_of_other_calibration"),
    # the schedule
    "schedule for another sparsity": Case("prune", {"prune": {"sparsity": 0.5}},
                                          "was made for sparsity 0.7, prune.sparsity is 0.5", "data/pruned",
                                          "_valid_schedule"),
    "kmeans K above the blocks": Case("schedule", {"schedule": {"allocator": "kmeans", "k": 50}},
                                      "schedule.k = 50 exceeds the number of units", "data/schedule",
                                      "_estimates_and_a_search"),
    "schedule missing": Case("prune", {}, "missing input", "data/pruned", "_schedule_missing"),
    "schedule not JSON": Case("prune", {}, "tiny.json is unreadable or not JSON (JSONDecodeError); rerun the schedule",
                              "data/pruned", "_schedule_not_json"),
    "schedule of another model": Case("prune", {}, "has no sparsity for 0.self_attn.q_proj", "data/pruned",
                                      "_schedule_of_other_model"),
    # evaluation
    "unknown evaluation dataset": Case("evaluate", {"evaluate": {"datasets": ["imagenet"]}},
                                       "unknown evaluation dataset 'imagenet'", "reports/metrics/dense.json",
                                       args=("dense",)),
    "evaluate a truncated checkpoint": Case("evaluate", {}, "(damaged or truncated files? rerun the stage that wrote it)",
                                            "reports/metrics/pruned.json", "_truncated_safetensors", args=("pruned",)),
    "evaluate NaN weights": Case("evaluate", {}, "has NaN or inf weights in model.layers.1.mlp.up_proj.weight; no "
                                 "perplexity recorded", "reports/metrics/pruned.json", "_nan_in_pruned", args=("pruned",)),
    "evaluate a folder changed after its stage": Case("evaluate", {}, "holds other weights (fingerprint",
                                                      "reports/metrics/pruned.json", "_changed_pruned", args=("pruned",)),
    "unknown model variant": Case("evaluate", {}, "needs one of dense, quantized, uniform, pruned, compressed, got 'bogus'", "reports/metrics", args=("bogus",)),
}


def _snapshot(cwd: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file of the working directory but Prefect's state."""
    return {str(p.relative_to(cwd)): (p.stat().st_size, p.stat().st_mtime_ns) for p in cwd.rglob("*")
            if p.is_file() and ".prefect" not in p.relative_to(cwd).parts}


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
    before = _snapshot(workdir)
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
    assert _snapshot(workdir) == before  # nothing written, deleted or touched
    assert (workdir / CALIB).is_file() and HessianStore.open_for_reading(
        workdir / STORE, json.loads((workdir / "data/models/tiny/prunekit.json").read_text())["fingerprint"])
