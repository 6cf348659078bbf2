"""The report stage on a tiny model: report.md sections, runs.csv across two parameter sets,
provenance.json, and `prunekit audit` catching a tampered, a deleted and a new file."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from test_export import run_stages

from stages.common import VARIANTS

pytestmark = pytest.mark.pipeline  # the stages of the pipeline, run in process


def _evaluate_and_report(params_path):
    from prunekit.config import load_params
    from prunekit.steps import call
    from stages import baseline, evaluate, report
    from stages.common import VARIANTS

    params = load_params(params_path)
    for variant in baseline.VARIANTS:
        baseline.run(params, call, variant)
    for variant in VARIANTS:
        evaluate.run(params, call, variant)
    report.run(params, call)
    return params


def _audit(cwd):
    return subprocess.run([sys.executable, "-m", "flows", "audit"], cwd=cwd, capture_output=True, text=True,
                          check=False)


def test_report_provenance_and_audit(tiny_models, tmp_path, monkeypatch):
    paths = run_stages(tmp_path, tiny_models["opt"], monkeypatch)
    _evaluate_and_report(tmp_path / "params.yaml")
    reports = paths.reports

    text = (reports / "report.md").read_text()
    for section in ("| model | wikitext2 | c4 |", "## Sparsity per block", "## Export", "## Runs under this protocol",
                    "## Configuration", "plots/ppl_vs_sparsity.png", "plots/schedule.png"):
        assert section in text, section
    assert (reports / "plots" / "ppl_vs_sparsity.png").stat().st_size > 1000
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["export"]["linears"] < 0.25

    record = json.loads((reports / "provenance.json").read_text())
    assert record["git"]["commit"] is None and record["git"]["error"]  # a temporary folder is no git repo
    assert record["params"]["model"]["name"] == "tiny"
    assert {"torch", "transformers", "dvc", "prefect", "zarr", "numpy", "python"} <= set(record["versions"])
    assert record["versions"]["torch"] and "cuda" in record["hardware"]
    assert {"model", "calibration", "pruned", "compressed", "export", "metrics", "report"} <= set(record["artifacts"])
    assert "hessians" in record["missing"]  # this run pruned sequentially without a store
    export_files = record["artifacts"]["export"]["files"]
    assert "data/export/tiny/packed/model.packed.safetensors" in export_files
    assert all(len(h) == 64 for h in export_files.values())

    assert record["hardware"]["cpu_count"] and "intra_op_threads" in record["hardware"]["torch"]
    assert set(record["metric_values"]) == {f"reports/metrics/{v}.json" for v in (*VARIANTS, "export")}
    assert "machine" in pd.read_csv(reports / "runs.csv") and "made on " in text

    # The baselines are made like the models they are compared with: this run's schedule is
    # uniform, so the uniform baseline is the pruned model bit for bit (ratio exactly 1), and
    # the quantized one is GPTQ of the dense model on the same calibration windows.
    from safetensors.torch import load_file

    import prunekit
    from prunekit.data import read_calibration
    from prunekit.models import load_model

    uniform, pruned = (load_file(d / "model.safetensors") for d in (paths.uniform, paths.pruned))
    assert uniform.keys() == pruned.keys() and all(torch.equal(uniform[k], pruned[k]) for k in pruned)
    assert all(r["ratio"] == 1.0 for r in metrics["ratios"]["pruned/uniform"].values())
    assert "| pruned / uniform | the uniform schedule against uniform pruning |" in text
    assert "| compressed / quantized |" in text and "(baseline)" in text
    dense = load_model(str(paths.model))
    prunekit.quantize(dense, read_calibration(paths.calib)[0], groupsize=32)
    quantized = load_file(paths.quantized / "model.safetensors")
    assert all(torch.equal(quantized[k], v) for k, v in dense.state_dict().items() if k in quantized)

    clean = _audit(tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.startswith("identical: ")

    manifest = tmp_path / "data/export/tiny/packed/manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # same JSON, other bytes
    unverified = _audit(tmp_path)
    assert unverified.returncode == 4 and unverified.stdout.splitlines()[0].startswith("unverified        export: ")
    (tmp_path / "data/compressed/tiny/tokenizer.json").unlink()
    (tmp_path / "data/pruned/tiny/extra.bin").write_bytes(b"x")
    dirty = _audit(tmp_path)
    assert dirty.returncode == 3
    lines = dirty.stdout.splitlines()
    assert any(line.startswith("different         compressed: 1 file(s) missing") for line in lines), lines
    assert any(line.startswith("different         pruned: 0 file(s) missing, 1 added") for line in lines), lines
    assert lines[-1].startswith("different: ")


def test_runs_accumulate_across_parameter_sets(tiny_models, tmp_path, monkeypatch):
    run_stages(tmp_path, tiny_models["llama"], monkeypatch)
    params = _evaluate_and_report(tmp_path / "params.yaml")
    _evaluate_and_report(tmp_path / "params.yaml")  # the same parameters replace their row
    runs_csv = tmp_path / "reports" / "runs.csv"
    assert len(pd.read_csv(runs_csv)) == 1

    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    run_stages(tmp_path, tiny_models["llama"], monkeypatch, structure="2:4", quantize=raw["quantize"])
    _evaluate_and_report(tmp_path / "params.yaml")
    runs = pd.read_csv(runs_csv)
    assert len(runs) == 2 and sorted(runs["structure"]) == ["2:4", "unstructured"]
    assert runs["achieved_sparsity"].round(1).tolist() == [0.7, 0.5]
    assert "ppl_compressed_wikitext2" in runs and runs["packed_linears_vs_fp16"].notna().all()
    text = (tmp_path / "reports" / "report.md").read_text()
    assert "2 run(s) recorded" in text and params.model.name == "tiny"


def test_another_floating_point_order_is_within_tolerance_and_a_parameter_is_not(tiny_models, tmp_path, monkeypatch):
    """What differs between CPUs, made here: the PyTorch kernels instead of the compiled ones and
    one thread instead of two. The audit of that run against the first one's record says
    "within tolerance", every perplexity inside the other run's interval; another sparsity is
    "different"."""
    import functools

    import torch

    from prunekit.kernels import native
    from prunekit.reporting.audit import audit, summary

    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    for root in (first, second, third):
        root.mkdir()
    run_stages(first, tiny_models["llama"], monkeypatch)
    _evaluate_and_report(first / "params.yaml")
    record = json.loads((first / "reports/provenance.json").read_text())

    threads = torch.get_num_threads()
    monkeypatch.setenv("PRUNEKIT_NATIVE", "0")
    monkeypatch.setattr(native, "_build", functools.cache(native._build.__wrapped__))
    torch.set_num_threads(1)
    try:
        run_stages(second, tiny_models["llama"], monkeypatch)
        _evaluate_and_report(second / "params.yaml")
    finally:
        torch.set_num_threads(threads)
    verdicts = {v.label: v for v in audit(record, second, against=first)}
    assert summary(list(verdicts.values()))[0] == "within tolerance", "\n".join(v.line() for v in verdicts.values())
    assert verdicts["pruned"].status == "within tolerance", verdicts["pruned"].line()  # bytes differ, numbers agree
    assert verdicts["metrics"].status == "within tolerance" and "inside" in verdicts["metrics"].detail
    for variant in VARIANTS:
        a, b = (json.loads((root / f"reports/metrics/{variant}.json").read_text()) for root in (first, second))
        for name, (lo, hi) in a["ppl_ci95"].items():
            assert lo <= b["ppl"][name] <= hi, (variant, name)

    monkeypatch.setattr(native, "_build", functools.cache(native._build.__wrapped__))
    monkeypatch.delenv("PRUNEKIT_NATIVE")
    run_stages(third, tiny_models["llama"], monkeypatch, structure="2:4")
    _evaluate_and_report(third / "params.yaml")
    verdicts = {v.label: v for v in audit(record, third, against=first)}
    assert verdicts["params_file"].status == "different" and "prune" in verdicts["params_file"].detail
    assert summary(list(verdicts.values()))[0] == "different"
