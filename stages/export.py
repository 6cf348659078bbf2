"""export: the final model -> data/export/<model>/ (packed form, README, export.json) and
reports/metrics/export.json.

The final model is data/compressed/<model> (or data/pruned/<model> when quantize.enabled is false).
It has two export forms:

- HF: that folder itself (fp32 safetensors, pruned weights stored as zeros, config, tokenizer),
  which `AutoModelForCausalLM.from_pretrained` loads as the evaluated model. It is not copied
  (DVC would keep a second ~1 GB copy in the workspace); export.json and the README name it
  and record the sha256 of its weight files.
- packed/: `prunekit.packing`'s format — per decoder linear a bitmask of the nonzeros and their
  4-bit GPTQ codes (or fp16 values when not quantized), everything else fp16 — plus manifest.json
  and config.json; `prunekit.packing.load_packed` / `unpack_to_folder` read it back. The stage
  reads it back once and fails if a quantized weight does not come back bit-identical.

Packing and the check read the model one decoder layer at a time (and every other tensor on
its own) from its safetensors files, and the packed file is written as it goes
(`packing.PackedWriter`): memory holds about one layer, never the model, with or without
`runtime.stream`, so there is one export path and its output does not depend on that flag.
"""
from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prunekit import packing
from prunekit.artifacts import read_json, replace_dir, sha256_file, write_atomic, write_json
from prunekit.config import ConfigError, Params
from prunekit.models import ADAPTERS, Adapter
from prunekit.streaming import CheckpointReader
from stages.common import Paths, log, main
from stages.quantize import QPARAMS


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.pruned, paths.compressed]


def run(params: Params, step) -> None:
    paths = Paths.of(params)
    compressed = read_json(paths.compressed / "prunekit.json")
    quantized = compressed.get("enabled", False)
    source = paths.compressed if quantized else paths.pruned
    if quantized and not (source / QPARAMS).is_file():
        raise ConfigError(f"{source} has no {QPARAMS} (quantized before the stage saved its grids): "
                          "rerun `dvc repro -f quantize`")
    out = paths.export
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    summary = step(_pack, source, tmp / "packed", compressed["quantize"] if quantized else None)
    hf_dir = str(source.relative_to(paths.reports.parent))
    summary = {"model": params.model.name, "source": hf_dir, "quantized": quantized, "hf_dir": hf_dir,
               "hf_sha256": {f.name: sha256_file(f) for f in sorted(source.glob("model*.safetensors"))},
               "packed_dir": str((out / "packed").relative_to(paths.reports.parent)), **summary}
    write_json(tmp / "export.json", summary)
    write_atomic(tmp / "README.md", _readme(summary))
    replace_dir(tmp, out)
    r = summary["ratios_vs_fp16"]
    log.info("packed export: decoder linears %.3fx fp16, whole model file %.3fx fp16", r["linears"], r["model_file"])
    write_json(paths.reports / "metrics" / "export.json", {
        "linears_vs_fp16": r["linears"], "model_file_vs_fp16": r["model_file"],
        "model_file_vs_stored": summary["bytes"]["packed_file"] / summary["bytes"]["stored_files"],
        "packed_mb": summary["bytes"]["packed_file"] / 1e6,
    })


def _adapter(model_type: str) -> Adapter:
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise ConfigError(f"cannot export architecture {model_type!r}")
    return adapter


def decoder_linears(names: Iterable[str], model_type: str) -> list[str]:
    """Names of the decoder linears' weights among a saved state's tensor names (from the adapter table)."""
    adapter = _adapter(model_type)
    pattern = re.compile(rf"{re.escape(adapter.layers)}\.\d+\.({'|'.join(map(re.escape, adapter.linears))})\.weight")
    linears = [n for n in names if pattern.fullmatch(n)]
    if not linears:
        raise ConfigError(f"no decoder linears found in the saved model ({model_type})")
    return linears


def read_batches(names: Iterable[str], model_type: str) -> list[list[str]]:
    """The saved tensors in the groups that are read together: every decoder layer's tensors,
    in layer order, then each other tensor alone (the embedding may be the largest of all).
    Sorted by name within a group, so the packed file does not depend on the sharding."""
    layer = re.compile(rf"{re.escape(_adapter(model_type).layers)}\.(\d+)\.")
    layers: dict[int, list[str]] = {}
    rest = []
    for name in sorted(names):
        match = layer.match(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name)
        else:
            rest.append([name])
    return [layers[i] for i in sorted(layers)] + rest


def _pack(source: Path, out: Path, quant: dict | None) -> dict:
    """Pack the model in `source` into `out`, read it back, and measure sizes; one batch of
    tensors (`read_batches`) in memory at a time."""
    config = read_json(source / "config.json")
    reader = CheckpointReader(source)
    linears = set(decoder_linears(reader.weight_map, config["model_type"]))
    batches = read_batches(reader.weight_map, config["model_type"])
    grids = packing.load_grids(source / QPARAMS) if quant is not None else None
    bits, groupsize = (quant["bits"], quant["groupsize"]) if quant is not None else (4, None)
    log.info("packing %d decoder linears (%s) and %d other tensors", len(linears),
             f"{bits}-bit codes" if quant else "fp16 values", len(reader.weight_map) - len(linears))
    writer = packing.PackedWriter(out)
    for batch in tqdm(batches, desc="pack", unit="part"):
        writer.add(*packing.pack_state(reader.read(batch), [n for n in batch if n in linears], grids, bits=bits,
                                       groupsize=groupsize))
    extra = [source / n for n in ("config.json", "generation_config.json") if (source / n).is_file()]
    weights = writer.close(extra_files=extra)

    for batch in tqdm(batches, desc="check packed", unit="part"):
        restored = packing.load_packed(out, batch)
        for name, t in reader.read(batch).items():
            expected = t if (quant is not None and name in linears) or not t.is_floating_point() \
                else t.to(torch.float16).to(t.dtype)
            if not torch.equal(restored[name], expected):
                raise packing.PackingError(f"{name} does not read back from the packed file as written")

    sizes = writer.sizes()
    nnz = sum(writer.entries[n]["nnz"] for n in linears)
    numel = sum(math.prod(writer.entries[n]["shape"]) for n in linears)
    stored = sum(f.stat().st_size for f in source.glob("model*.safetensors"))
    fp16_file = sizes["tensors"]["fp16_bytes"]
    return {
        "format": {"weights": packing.WEIGHTS, "manifest": packing.MANIFEST, "linears": len(linears),
                   "values": f"int{bits} codes, per-{'group ' + str(groupsize) if groupsize else 'channel'} grid"
                   if quant else "fp16", "other_tensors": "fp16"},
        "linear_density": nnz / numel,
        "bytes": {"packed_file": weights.stat().st_size, "stored_files": stored, "fp16_tensors": fp16_file,
                  "packed_linears": sizes["linears"]["packed_bytes"], "fp16_linears": sizes["linears"]["fp16_bytes"]},
        "ratios_vs_fp16": {"linears": sizes["linears"]["ratio_vs_fp16"],
                           "model_file": weights.stat().st_size / fp16_file},
    }


def _readme(s: dict) -> str:
    b, r = s["bytes"], s["ratios_vs_fp16"]
    return f"""# Export of {s['model']}

Made by the `export` stage from `{s['source']}` ({'pruned + quantized' if s['quantized'] else 'pruned'}).

- HF form: `{s['hf_dir']}/`, the model as evaluated (fp32 safetensors, pruned weights stored as
  zeros, config, tokenizer): `AutoModelForCausalLM.from_pretrained("{s['hf_dir']}")`. Not copied
  here; `export.json` records the sha256 of its weight files.
- `packed/`: {s['format']['linears']} decoder linears as a bitmask of nonzeros + {s['format']['values']};
  every other tensor fp16. `manifest.json` says how each tensor is stored. Read it back with
  `prunekit.packing.load_packed("packed")` (a state dict) or
  `prunekit.packing.unpack_to_folder("packed", "unpacked")` (an HF folder; the tokenizer is in the HF form).
  {'Quantized linears read back bit-identical to the fp32 weights of the HF form.' if s['quantized'] else
   'Linear values are fp16-rounded copies of the fp32 weights of the HF form.'}

| | bytes | vs fp16 |
|---|---:|---:|
| decoder linears, packed | {b['packed_linears']:,} | {r['linears']:.3f} |
| whole packed file | {b['packed_file']:,} | {r['model_file']:.3f} |
| stored model (fp32 safetensors) | {b['stored_files']:,} | {b['stored_files'] / b['fp16_tensors']:.3f} |

Density of the decoder linears: {s['linear_density']:.4f} (fp16 = 2 bytes per weight).
"""


if __name__ == "__main__":
    main("export")
