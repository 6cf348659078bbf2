"""export: the final model -> data/export/<model>/ and reports/metrics/export.json.

The final model is data/compressed/<model> (or data/pruned/<model> when quantize.enabled is
false). `prunekit.storage.export.export_model` writes its deployable forms, one decoder layer in
memory at a time whatever `runtime.stream` says: hf/ (export.dtype, from_pretrained loads it),
compressed-tensors/ (W4A16 pack-quantized, when quantized), <model>.gguf (when the run started
from a GGUF file and the grid maps onto GGUF blocks), packed/ (prunekit's smallest form),
with export.json (sizes, sha256 of the source's weights) and README.md.
"""
from __future__ import annotations

from pathlib import Path

from prunekit.artifacts import read_json, write_json
from prunekit.config import Params
from prunekit.models import resolve_source
from prunekit.storage.export import export_model
from stages.common import Paths


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.pruned, paths.compressed]


def source_bytes(source: str) -> int | None:
    """Bytes of the weights the pipeline started from (a .gguf file, or a folder's safetensors);
    None for a hub id (not on disk here)."""
    where, gguf = resolve_source(source)
    if gguf is not None:
        return (Path(where) / gguf).stat().st_size
    files = list(Path(where).glob("*.safetensors")) if Path(where).is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def run(params: Params, step) -> None:
    paths = Paths.of(params)
    compressed = read_json(paths.compressed / "prunekit.json")
    quantized = compressed.get("enabled", False)
    source = paths.compressed if quantized else paths.pruned
    where, gguf = resolve_source(params.model.source)
    summary = step(export_model, source, paths.export, compressed["quantize"] if quantized else None,
                   name=params.model.name, root=paths.reports.parent, dtype=params.export.dtype,
                   source_bytes=source_bytes(params.model.source),
                   gguf_source=None if gguf is None else Path(where) / gguf)
    r, b = summary["ratios_vs_fp16"], summary["bytes"]
    forms = summary["forms"]
    write_json(paths.reports / "metrics" / "export.json", {
        "linears_vs_fp16": r["linears"], "model_file_vs_fp16": r["model_file"],
        "model_file_vs_stored": b["packed_file"] / b["stored_files"], "packed_mb": b["packed_file"] / 1e6,
        "packed_folder_mb": b["packed_folder"] / 1e6,
        **{f"{name}_mb": form["bytes"] / 1e6 for name, form in forms.items()},
        **({f"{name}_vs_source": size / summary["source_bytes"] for name, size in
            {**{n: f["bytes"] for n, f in forms.items()}, "packed_folder": b["packed_folder"]}.items()}
           if summary["source_bytes"] else {}),
    })
