"""The report stage on a tiny model: report.md sections, runs.csv across two parameter sets,
provenance.json, and `prunekit audit` catching a tampered, a deleted and a new file."""
import json
import subprocess
import sys

import pandas as pd
import yaml
from test_export import run_stages


def _evaluate_and_report(params_path):
    from prunekit.config import load_params
    from prunekit.steps import call
    from stages import evaluate, report
    from stages.common import VARIANTS

    params = load_params(params_path)
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

    clean = _audit(tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.startswith("0 difference(s)")

    manifest = tmp_path / "data/export/tiny/packed/manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    (tmp_path / "data/compressed/tiny/tokenizer.json").unlink()
    (tmp_path / "data/pruned/tiny/extra.bin").write_bytes(b"x")
    dirty = _audit(tmp_path)
    assert dirty.returncode == 1
    lines = dirty.stdout.splitlines()
    assert "changed  data/export/tiny/packed/manifest.json  (export)" in lines
    assert "missing  data/compressed/tiny/tokenizer.json  (compressed)" in lines
    assert "added    data/pruned/tiny/extra.bin  (pruned)" in lines
    assert lines[-1].startswith("3 difference(s)")


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
    assert "2 parameter set(s)" in text and params.model.name == "tiny"
