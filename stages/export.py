"""export: the final model -> data/export/<model>/ (packed form, README, export.json) and
reports/metrics/export.json.

The final model is data/compressed/<model> (or data/pruned/<model> when quantize.enabled is
false). Its HF form is that folder itself (not copied: export.json records the sha256 of its
weight files); the packed form is written by `prunekit.storage.export.export_model`, one
decoder layer in memory at a time whatever `runtime.stream` says.
"""
from __future__ import annotations

from prunekit.artifacts import read_json, write_json
from prunekit.config import Params
from prunekit.storage.export import export_model
from stages.common import Paths


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.pruned, paths.compressed]


def run(params: Params, step) -> None:
    paths = Paths.of(params)
    compressed = read_json(paths.compressed / "prunekit.json")
    quantized = compressed.get("enabled", False)
    source = paths.compressed if quantized else paths.pruned
    summary = step(export_model, source, paths.export, compressed["quantize"] if quantized else None,
                   name=params.model.name, root=paths.reports.parent)
    r, b = summary["ratios_vs_fp16"], summary["bytes"]
    write_json(paths.reports / "metrics" / "export.json", {
        "linears_vs_fp16": r["linears"], "model_file_vs_fp16": r["model_file"],
        "model_file_vs_stored": b["packed_file"] / b["stored_files"], "packed_mb": b["packed_file"] / 1e6,
    })
