"""Export of a final model: the packed form (`packing`) written from its safetensors files,
read back and checked, with its sizes, export.json and a README.

The final model is a pruned (and possibly quantized) HF folder. Its packed form holds, per
decoder linear, a bitmask of the nonzeros and their GPTQ codes (or their values in the export
dtype when not quantized), the LM head's codes when it was quantized (`quantize.head`), every other tensor in
the export dtype, plus manifest.json, config, generation config and tokenizer: a folder that
needs nothing else; `load_packed` / `unpack_to_folder` read it back. Packing and the check read the model one decoder layer at a
time (and every other tensor on its own) and write the packed file as they go: memory holds
about one layer, never the model.
"""
from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..artifacts import read_json, replace_dir, sha256_file, write_atomic, write_json
from ..config import ConfigError
from ..models import ADAPTERS, Adapter
from .checkpoint import CheckpointReader
from .packing import (
    MANIFEST,
    QPARAMS,
    WEIGHTS,
    PackedWriter,
    PackingError,
    load_grids,
    load_packed,
    pack_state,
    with_dtype,
)

log = logging.getLogger(__name__)


def export_model(source: Path, out: Path, quant: dict | None, *, name: str, root: Path,
                 dtype: str = "bfloat16", source_bytes: int | None = None, gguf_source: Path | None = None) -> dict:
    """The model folder `source` (quantized with the `quant` params, or only pruned) in its
    deployable forms: out/hf/ (`dtype`), out/compressed-tensors/ (when quantized), out/packed/
    and out/<name>.gguf (when the run started from the GGUF file `gguf_source` and the grid maps
    onto GGUF blocks), with out/export.json and out/README.md; the folder appears whole or not at
    all. Paths in the summary are relative to `root`; `source_bytes`: the size of the file the
    run started from, for the size ratios. Returns the summary."""
    from .gguf_form import gguf_form, write_gguf
    from .hf_forms import write_compressed_tensors, write_hf

    reader = CheckpointReader(source)
    linears = decoder_linears(reader.weight_map, read_json(source / "config.json")["model_type"])
    widths = {name: reader.header(name)[1][1] for name in linears}  # input widths
    grids = None
    if quant is not None:
        if not (source / QPARAMS).is_file():
            raise ConfigError(f"{source} has no {QPARAMS} (quantized before the stage saved its grids): "
                              "rerun `dvc repro -f quantize`")
        grids = load_grids(source / QPARAMS)
        _check_groups(quant, widths)
    skipped = {}
    if gguf_source is None:
        skipped["gguf"] = "the run did not start from a GGUF file (llama.cpp's convert_hf_to_gguf.py converts hf/)"
    elif reason := gguf_form(quant, list(widths.values())):
        skipped["gguf"] = reason
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    src = str(source.relative_to(root))
    try:
        forms = {"hf": write_hf(source, tmp / "hf", dtype)}
        if quant is not None:
            forms["compressed_tensors"] = write_compressed_tensors(source, tmp / "compressed-tensors", grids, quant,
                                                                   dtype)
        if "gguf" not in skipped:
            forms["gguf"] = write_gguf(source, gguf_source, tmp / f"{name}.gguf", grids, quant, linears)
        summary = {"model": name, "source": src, "quantized": quant is not None,
                   "source_sha256": {f.name: sha256_file(f) for f in sorted(source.glob("model*.safetensors"))},
                   "source_bytes": source_bytes, "forms": forms, "skipped_forms": skipped, "packed_dir": str((out / "packed").relative_to(root)),
                   **_pack(source, reader, set(linears), tmp / "packed", quant, grids, dtype)}
        write_json(tmp / "export.json", summary)
        write_atomic(tmp / "README.md", _readme(summary))
        replace_dir(tmp, out)
    except OSError as exc:  # e.g. a read-only or full disk: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"export to {out} failed: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    r = summary["ratios_vs_fp16"]
    log.info("export: %s; packed decoder linears %.3fx fp16, whole packed file %.3fx fp16",
             ", ".join(f"{n} {f['bytes'] / 1e6:.1f} MB" for n, f in summary["forms"].items()), r["linears"],
             r["model_file"])
    return summary


def _check_groups(quant: dict, widths: dict[str, int]) -> None:
    """compressed-tensors holds whole groups only: every decoder linear's input width ({weight
    name: width}) must be a multiple of quantize.groupsize (prunekit's own grid allows a narrower
    last group)."""
    if quant["groupsize"] is None:
        return
    for name, width in widths.items():
        if width % quant["groupsize"]:
            raise ConfigError(f"quantize.groupsize {quant['groupsize']} does not divide the input width {width} of "
                              f"{name.removesuffix('.weight')}: compressed-tensors stores whole groups only; use a "
                              "groupsize that divides every input width (e.g. 32, 64, 128)")


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


def _pack(source: Path, reader: CheckpointReader, linears: set[str], out: Path, quant: dict | None,
          grids: dict | None, dtype: str) -> dict:
    """Pack the model in `source` (read by `reader`; its decoder `linears`) into `out`
    (self-contained: config naming `dtype`, generation config, tokenizer), read it back, and
    measure sizes; one batch of tensors (`read_batches`) in memory at a time."""
    from .hf_forms import DTYPES, model_files

    config = read_json(source / "config.json")
    batches = read_batches(reader.weight_map, config["model_type"])
    bits, groupsize = (quant["bits"], quant["groupsize"]) if quant is not None else (4, None)
    head = [n for n in (grids or {}) if n not in linears]  # the LM head, quantized too
    head_bits = (quant or {}).get("head", {}).get("bits")
    if head and head_bits is None:
        raise ConfigError(f"{source} has grids for {head} but its quantize params no quantize.head.bits: "
                          "rerun `dvc repro -f quantize`")
    cast = DTYPES[dtype]
    log.info("packing %d decoder linears (%s), %s and %d other tensors (%s)", len(linears),
             f"{bits}-bit codes" if quant else f"{dtype} values", f"the head as {head_bits}-bit codes" if head else
             "no quantized head", len(reader.weight_map) - len(linears) - len(head), dtype)
    writer = PackedWriter(out)
    for batch in tqdm(batches, desc="pack", unit="part"):
        writer.add(*pack_state(reader.read(batch), [n for n in batch if n in linears], grids, bits=bits,
                               groupsize=groupsize, float_dtype=cast, tensor_bits=dict.fromkeys(head, head_bits)))
    weights = writer.close(extra_files=model_files(source))
    write_json(out / "config.json", with_dtype(config, dtype))

    coded = linears | set(head) if quant is not None else set()
    for batch in tqdm(batches, desc="check packed", unit="part"):
        restored = load_packed(out, batch)
        for name, t in reader.read(batch).items():
            expected = t if name in coded or not t.is_floating_point() else t.to(cast).to(t.dtype)
            if not torch.equal(restored[name], expected):
                raise PackingError(f"{name} does not read back from the packed file as written")

    sizes = writer.sizes()
    nnz = sum(writer.entries[n]["nnz"] for n in linears)
    numel = sum(math.prod(writer.entries[n]["shape"]) for n in linears)
    stored = sum(f.stat().st_size for f in source.glob("model*.safetensors"))
    fp16_file = sizes["tensors"]["fp16_bytes"]
    folder = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {
        "format": {"weights": WEIGHTS, "manifest": MANIFEST, "linears": len(linears),
                   "values": f"int{bits} codes, per-{'group ' + str(groupsize) if groupsize else 'channel'} grid"
                   if quant else dtype, "head": f"int{head_bits} codes, no mask" if head else "as other tensors",
                   "other_tensors": dtype},
        "linear_density": nnz / numel,
        "bytes": {"packed_file": weights.stat().st_size, "packed_folder": folder, "stored_files": stored,
                  "fp16_tensors": fp16_file, "packed_linears": sizes["linears"]["packed_bytes"],
                  "fp16_linears": sizes["linears"]["fp16_bytes"]},
        "ratios_vs_fp16": {"linears": sizes["linears"]["ratio_vs_fp16"],
                           "model_file": weights.stat().st_size / fp16_file},
    }


def _readme(s: dict) -> str:
    b, r, forms = s["bytes"], s["ratios_vs_fp16"], s["forms"]
    hf = forms["hf"]
    lines = [f"# Export of {s['model']}", "",
             f"Made by the `export` stage from `{s['source']}` ({'pruned + quantized' if s['quantized'] else 'pruned'}).",
             "Each folder holds config, generation config and tokenizer: it needs nothing else.", "",
             f"- `hf/`: {hf['dtype']} safetensors, pruned weights stored as exact zeros"
             f"{', quantized ones as their grid values' if s['quantized'] else ''}: "
             "`AutoModelForCausalLM.from_pretrained(\"hf\")`."]
    if "compressed_tensors" in forms:
        ct = forms["compressed_tensors"]
        lines.append(f"- `compressed-tensors/`: W4A16 `{ct['format']}` (compressed-tensors {ct['compressed_tensors']}),"
                     f" scales in {ct['dtype']}; with `pip install compressed-tensors`: `{ct['loads_with']}`"
                     ".")
    if "gguf" in forms:
        g = forms["gguf"]
        lines.append(f"- `{g['file']}`: GGUF for llama.cpp (and transformers' `gguf_file=`), {g['dtype']} "
                     f"(written: {g['written_types']}), metadata, tokenizer and every other tensor copied from "
                     f"`{g['copied_from']}`; sparsity buys no bytes in GGUF.")
    lines += [f"- no {form}: {why}." for form, why in s.get("skipped_forms", {}).items()]
    fmt = s["format"]
    lines += [f"- `packed/`: {fmt['linears']} decoder linears as a bitmask of nonzeros + {fmt['values']}; the LM head"
              f" {fmt['head']}; every other tensor {fmt['other_tensors']}. Read it back with"
              " `prunekit.storage.packing.load_packed(\"packed\")` (a state dict) or `prunekit unpack packed unpacked`"
              " (a bf16 HF folder with its tokenizer; a large file such as tokenizer.json is stored as `.xz`).", "",
              "| form | bytes | vs fp16 tensors |", "|---|---:|---:|"]
    lines += [f"| {f.get('file', name.replace('_', '-'))} | {f['bytes']:,} | {f['bytes'] / b['fp16_tensors']:.3f} |"
              for name, f in forms.items()]
    lines += [f"| packed (decoder linears only) | {b['packed_linears']:,} | {r['linears']:.3f} |",
              f"| packed (weights file) | {b['packed_file']:,} | {r['model_file']:.3f} |",
              f"| packed (folder, with tokenizer) | {b['packed_folder']:,} | {b['packed_folder'] / b['fp16_tensors']:.3f} |",
              f"| pipeline's folder (fp32) | {b['stored_files']:,} | {b['stored_files'] / b['fp16_tensors']:.3f} |", "",
              f"Density of the decoder linears: {s['linear_density']:.4f} (fp16 = 2 bytes per weight).", ""]
    return "\n".join(lines)
