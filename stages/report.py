"""report: per-model metrics + schedule + pruning stats (+ export sizes) -> reports/metrics.json,
reports/report.md, reports/runs.csv (one row per parameter set, kept across runs),
reports/plots/ppl_vs_sparsity.png and reports/provenance.json (`prunekit audit` checks it)."""
from __future__ import annotations

from prunekit.artifacts import read_json
from prunekit.config import Params
from prunekit.reporting.report import write_report
from prunekit.storage.packing import MANIFEST
from stages import common
from stages.common import Paths


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.reports / "metrics" / f"{v}.json" for v in common.VARIANTS] + [paths.schedule, paths.pruned]


def run(params: Params, step) -> None:
    paths = Paths.of(params)
    root = paths.reports.parent
    export_file = paths.export / "export.json"
    artifacts = {
        "model": paths.model, "calibration": paths.calib, "hessians": paths.hessians, "estimates": paths.estimates,
        "schedule": paths.schedule, "pruned": paths.pruned, "compressed": paths.compressed, "uniform": paths.uniform,
        "quantized": paths.quantized, "export": paths.export,
        "metrics": paths.reports / "metrics", "metrics_summary": paths.reports / "metrics.json",
        "report": paths.reports / "report.md", "runs": paths.reports / "runs.csv", "plots": paths.reports / "plots",
        "params_file": root / "params.yaml",
    }
    exported = read_json(export_file) if export_file.is_file() else None
    if exported is not None:  # every tensor's shape and nonzeros: the size table sizes each model from them
        exported["manifest"] = read_json(paths.export / "packed" / MANIFEST)
    store_meta = paths.hessians / "zarr.json"
    write_report(params, {v: read_json(paths.reports / "metrics" / f"{v}.json") for v in common.VARIANTS},
                 read_json(paths.pruned / "prunekit.json"), read_json(paths.schedule),
                 exported, paths.reports, artifacts,
                 read_json(store_meta).get("attributes") if store_meta.is_file() else None)
