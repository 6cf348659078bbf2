"""The whole pipeline as one Prefect flow, in process, on tiny models; the library's layer loops
on every architecture."""
import json
import logging

import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_params
from tiny import CONFIGS

from prunekit.config import Params
from prunekit.models import adapter_for, decoder_layers

SCHEDULES = {  # llama: the default (search from uniform) in the DVC test
    "opt": {"allocator": "owl"},
    "bloom": {"allocator": "kmeans"},
    "gemma3_text": {"allocator": "search", "search": {"init": "ranked", "database": "dense", "unit": "block",
                                                      "generations": 3}},
}


@pytest.mark.parametrize("model_type", sorted(SCHEDULES))
def test_pipeline_flow(model_type, tiny_models, prefect_api, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from flows.pipeline import pipeline

    monkeypatch.chdir(tmp_path)
    raw = tiny_params(tiny_models[model_type], schedule=SCHEDULES[model_type],
                      prune={"mode": "parallel" if model_type == "bloom" else "sequential"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    pipeline(Params.model_validate(raw))

    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.7, abs=0.01)
    assert set(metrics["compressed"]) == {"wikitext2", "c4"}
    schedule = json.loads((tmp_path / "data" / "schedule" / "tiny.json").read_text())
    sensitivity = pd.read_parquet(tmp_path / "data" / "sensitivity" / "tiny__c4.parquet")
    blocks = {key.split(".")[0] for key in schedule["sparsity"]}
    assert len(sensitivity) == (len(blocks) if model_type == "gemma3_text" else 0)  # measured only when read
    if model_type == "gemma3_text":  # the ranked start was scored, whichever won
        assert schedule["search"]["start"] <= schedule["search"]["uniform"] + 1e-12
    store = tmp_path / "data" / "hessians" / "tiny__c4.zarr"
    assert (store / "zarr.json").is_file() and (store / "layer_002").is_dir()

    # The exported models are plain HF folders: pruned zeros stay zero through quantization and
    # every group of 32 inputs of a row holds at most 2^4 levels besides the pruned zeros.
    compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "data" / "compressed" / "tiny")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "data" / "pruned" / "tiny")
    adapter = adapter_for(pruned)
    for layer_q, layer_p in zip(decoder_layers(compressed, adapter), decoder_layers(pruned, adapter)):
        for name in adapter.linears:
            w_q, w_p = layer_q.get_submodule(name).weight, layer_p.get_submodule(name).weight
            assert (w_q[w_p == 0] == 0).all(), name
            assert (w_p == 0).float().mean() > 0.5, name
            assert len(torch.unique(w_q[0, :32])) <= 2 ** 4 + 1, name


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_prune_and_quantize_every_architecture(model_type, tiny_models):
    from prunekit.compression.prune import prune_model
    from prunekit.compression.quantize import quantize_model
    from prunekit.config import PruneParams, QuantizeParams
    from prunekit.forward.sources import InMemoryModel
    from prunekit.models import load_model, prunable_parameters

    model = load_model(str(tiny_models[model_type]))
    adapter = adapter_for(model)
    source = InMemoryModel(model)
    windows = torch.randint(4, 500, (4, 48))
    sparsity = {key: 0.6 for key in prunable_parameters(model, adapter)}
    stats = prune_model(source, sparsity, PruneParams(sparsity=0.6), runner=source.runner(windows))
    assert set(stats) == set(sparsity)
    assert all(abs(s["sparsity"] - 0.6) < 0.01 for s in stats.values())
    layers = decoder_layers(model, adapter)
    pruned = {(i, n): layers[i].get_submodule(n).weight == 0 for i in range(len(layers)) for n in adapter.linears}
    quantize_model(source, source.runner(windows), QuantizeParams(bits=3, groupsize=None, act_order=False, mse=False))
    for (i, name), mask in pruned.items():
        w = layers[i].get_submodule(name).weight
        assert (w[mask] == 0).all()  # quantization may round more survivors to 0, never revive one
        assert len(torch.unique(w[0])) <= 2 ** 3 + 1


def test_flow_runs_carry_logs_artifacts_and_labels(tiny_models, prefect_api, tmp_path, monkeypatch):
    """What happened is in Prefect: every stage's flow run is tagged with the commit, the params
    fingerprint and the DVC experiment, the stages' logs reach the API, and the evaluations and
    the report are artifacts of their flow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.pipeline import pipeline, run_labels

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-tern")
    logging.getLogger("stages").setLevel(logging.INFO)  # as the command line sets it
    raw = tiny_params(tiny_models["opt"], schedule={"allocator": "uniform"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = Params.model_validate(raw)
    labels = run_labels(params)
    assert labels["experiment"] == "exp:tidy-tern" and labels["params"].startswith("params:")
    # the session's server fixture turns log shipping off (nothing left to flush at teardown)
    with temporary_settings(updates={PREFECT_LOGGING_TO_API_ENABLED: True}):
        pipeline(params)
        APILogWorker.drain_all(timeout=30)  # the logs still queued for the API

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=list(labels.values()))))
        names = {run.name.split()[0] for run in runs}
        assert {"prepare_model", "hessians", "prune", "evaluate@pruned", "report"} <= names
        assert all(run.name.endswith(labels["params"]) for run in runs)
        ids = [run.id for run in runs]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        assert any("pruned to 0.7" in log.message for log in logs)  # a stage's own log line
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        keys = {a.key for a in artifacts}
        assert {"ppl-dense", "ppl-pruned", "ppl-compressed", "report", "metrics"} <= keys
        report = next(a for a in artifacts if a.key == "report")
        assert report.data == (tmp_path / "reports" / "report.md").read_text()
