"""Distributed work: Hessians as map-reduce over calibration shards, parallel pruning as
independent submissions, and the stage flows on a 2-worker Dask LocalCluster equal to threads."""
import json
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_params

from prunekit.compression.hessians import collect_hessians, split
from prunekit.forward.layerwise import HessianAccumulator
from prunekit.forward.sources import InMemoryModel
from prunekit.models import adapter_for, decoder_layers, load_model, prunable_parameters
from prunekit.storage.hessian_store import HessianStore


def test_split_keeps_order_and_sizes():
    items = list(range(7))
    assert split(items, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split(items, 10) == [[i] for i in items]
    assert split(items, 1) == [items]


def test_merge_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (5, 40, 13)]
    whole = HessianAccumulator(16, torch.float64)
    parts = []
    for x in xs:
        whole.add(x)
        acc = HessianAccumulator(16, torch.float64)
        acc.add(x)
        parts.append((acc.H, acc.n_tokens))
    H, n = HessianAccumulator.merge(parts)
    X = torch.cat(xs)
    assert n == whole.n_tokens == 58
    assert torch.allclose(H, 2 / 58 * X.T @ X, rtol=1e-12) and torch.allclose(H, whole.H, rtol=1e-12)


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_sharded_hessians_equal_single_process(model_type, tiny_models, tmp_path):
    model = load_model(str(tiny_models[model_type]))
    adapter = adapter_for(model)
    windows = torch.randint(4, 500, (7, 32), generator=torch.Generator().manual_seed(0))
    n_layers = len(decoder_layers(model, adapter))
    stores = {}
    with ThreadPoolExecutor(3) as pool:
        steps = {"one": None, "inline": lambda fn, *a: fn(*a), "threads": _ThreadStep(pool)}
        for name, step in steps.items():
            store = HessianStore.open_for_writing(tmp_path / f"{name}.zarr", "m", "c", n_layers, "float32")
            source = InMemoryModel(model)
            if step is None:
                collect_hessians(source, source.runner(windows), store, torch.float32)
            else:
                collect_hessians(source, source.runner(windows), store, torch.float32, step, shards=3)
            stores[name] = HessianStore.open_for_reading(tmp_path / f"{name}.zarr", "m", "c")
    for i in range(n_layers):
        one = stores["one"].read_layer(i)
        for name in ("inline", "threads"):
            many = stores[name].read_layer(i)
            assert one.keys() == many.keys()
            for key, (H, n) in one.items():
                H3, n3 = many[key]
                assert n3 == n == 7 * 32, (name, i, key)
                assert (H3 - H).norm() / H.norm() < 1e-5, (name, i, key)


class _ThreadStep:
    """A step whose submit runs the shards concurrently on one shared layer, as Prefect's
    thread runner does (Futures among the arguments resolved first)."""

    def __init__(self, pool):
        self.pool = pool

    def __call__(self, fn, *args):
        return fn(*args)

    def submit(self, fn, *args):
        return self.pool.submit(lambda: fn(*[a.result() if isinstance(a, Future) else a for a in args]))


def _stage(cwd: Path, name: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "flows", "stage", name, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run_parallel_pipeline(cwd: Path, model_dir: Path, runtime: dict) -> None:
    """prepare_model, calibrate, hessians, then prune in parallel mode with a uniform schedule."""
    cwd.mkdir()
    params = tiny_params(model_dir, runtime={"device": "cpu", **runtime}, prune={"mode": "parallel"})
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare_model", "calibrate", "hessians"):
        _stage(cwd, stage)
    model = load_model(str(cwd / "data" / "models" / "tiny"))
    keys = prunable_parameters(model, adapter_for(model))
    schedule = cwd / "data" / "schedule" / "tiny.json"
    schedule.parent.mkdir(parents=True)
    schedule.write_text(json.dumps({"target": 0.7, "sparsity": {k: 0.7 for k in keys}}))
    _stage(cwd, "prune")


@pytest.mark.parametrize("runner", ["dask", "processes"])
def test_stages_on_workers_equal_threads(runner, tiny_models, prefect_api, tmp_path):
    """Two calibration shards per layer and parallel pruning on 2 workers (a Dask LocalCluster
    or Prefect's process pool) vs the same in threads."""
    runs = {"threads": {"task_runner": "threads", "hessian_shards": 2},
            runner: {"task_runner": runner, "workers": 2}}
    for name, runtime in runs.items():
        _run_parallel_pipeline(tmp_path / name, tiny_models["llama"], runtime)
    stores = {name: HessianStore.open_for_reading(tmp_path / name / "data/hessians/tiny__c4.zarr",
                                                  json.loads((tmp_path / name / "data/models/tiny/prunekit.json")
                                                             .read_text())["fingerprint"]) for name in runs}
    for i in range(3):
        threads, workers = stores["threads"].read_layer(i), stores[runner].read_layer(i)
        for key, (H, n) in threads.items():
            assert workers[key][1] == n == 8 * 64
            assert (workers[key][0] - H).norm() / H.norm() < 1e-6, (i, key)
    models = {name: load_model(str(tmp_path / name / "data/pruned/tiny")) for name in runs}
    adapter = adapter_for(models["threads"])
    for layer_t, layer_w in zip(decoder_layers(models["threads"], adapter), decoder_layers(models[runner], adapter)):
        for name in adapter.linears:
            w_t, w_w = layer_t.get_submodule(name).weight, layer_w.get_submodule(name).weight
            assert torch.equal(w_t == 0, w_w == 0), name
            assert torch.allclose(w_t, w_w, rtol=1e-4, atol=1e-6), name
