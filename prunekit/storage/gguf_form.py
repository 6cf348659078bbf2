"""The final model as a GGUF file (llama.cpp's format, the one the embedded model arrived in),
written with the `gguf` package from the GGUF file the run started from.

The source file gives everything the pipeline does not change, byte for byte: its metadata
(architecture, hyper-parameters, tokenizer) and every tensor but the decoder linears and a
quantized LM head (norms keep llama.cpp's own conventions, e.g. Gemma's 1 + w). The decoder
linears (and the head, when `quantize.head` quantized it) are written from the pipeline's codes
onto GGUF block types, which hold 32 consecutive input columns under one fp16 scale:

- 4-bit asymmetric grid (code k, scale s, zero z: w = s·(k − z)) ↔ Q4_1 (w = d·k + m) with
  d = s, m = −s·z;  4-bit symmetric (z = 8) ↔ Q4_0 (w = d·(k − 8)) with d = s;
  8-bit symmetric (z = 128) ↔ Q8_0 (w = d·(k − 128)).
- A group of the grid must hold whole blocks (groupsize a multiple of 32, or one grid per row
  of a width that is); every block of a group gets the group's scale.
- Exact up to fp16: d (and m) are stored in fp16 where the pipeline keeps fp32 scales, a relative
  change of at most 2⁻¹¹ per block. With Q4_0/Q8_0 the pruned weights stay exactly zero; with
  Q4_1 a pruned weight reads back as d·z + m, the rounding of s·z to fp16 (≤ 2⁻¹¹·s·z).
- Not expressible: other widths (2, 3, 5–7 bits), an asymmetric 8-bit grid. GGUF has no sparse
  block type, so sparsity buys no bytes here; a pruned-only model's linears are written in F16.

`gguf_form` says which block type a grid maps to (or why none); `write_gguf` writes the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from .checkpoint import CheckpointReader
from .packing import Grid, grid_codes

BLOCK = 32  # input columns per GGUF block (Q4_0, Q4_1, Q8_0)


def block_type(bits: int, sym: bool):
    """The GGUF block type that holds a `bits`-bit grid, or None."""
    from gguf import GGMLQuantizationType as T

    return {(4, False): T.Q4_1, (4, True): T.Q4_0, (8, True): T.Q8_0}.get((bits, sym))


def gguf_form(quant: dict | None, widths: list[int]) -> str | None:
    """Why the quantized grid (quantize params, None: not quantized) of linears with these input
    widths has no GGUF block type, or None when every one maps exactly (up to fp16 scales)."""
    if quant is None:
        return None
    grids = [(quant["bits"], "the decoder linears")]
    if (quant.get("head") or {}).get("bits") is not None:
        grids.append((quant["head"]["bits"], "the LM head"))
    for bits, what in grids:
        if block_type(bits, quant["sym"]) is None:
            return (f"{what}' {'symmetric' if quant['sym'] else 'asymmetric'} {bits}-bit grid has no GGUF block type "
                    "(4-bit: Q4_1 asymmetric, Q4_0 symmetric; 8-bit: Q8_0 symmetric)")
    gs = quant["groupsize"]
    if gs is not None and gs % BLOCK:
        return f"groups of {gs} columns do not hold whole GGUF blocks of {BLOCK}: use a groupsize that is a multiple of 32"
    if gs is None and (odd := [w for w in widths if w % BLOCK]):
        return f"per-row grids on input widths {sorted(set(odd))} do not hold whole GGUF blocks of {BLOCK}"
    return None


def _blocks(weight: torch.Tensor, grid: Grid, bits: int, sym: bool, groupsize: int | None) -> tuple[np.ndarray, object]:
    """The GGUF blocks (uint8, one row of blocks per output row) of a weight on its grid."""
    qtype = block_type(bits, sym)
    rows, cols = weight.shape
    k = grid_codes(weight, grid, bits=bits, groupsize=groupsize).to(torch.int16)  # (rows, cols), 0..2^bits − 1
    scales, zeros = (g.to(torch.float32) for g in grid)
    per_group = (groupsize or cols) // BLOCK
    s = scales.repeat_interleave(per_group, dim=1)[:, : cols // BLOCK]  # the scale of every block
    z = zeros.repeat_interleave(per_group, dim=1)[:, : cols // BLOCK]
    d = s.numpy().astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    k = k.reshape(rows, cols // BLOCK, BLOCK).numpy()
    if bits == 4:
        qs = (k[..., : BLOCK // 2] | (k[..., BLOCK // 2 :] << 4)).astype(np.uint8)
        parts = [d, qs] if sym else [d, (-s * z).numpy().astype(np.float16).view(np.uint8).reshape(rows, -1, 2), qs]
    else:
        parts = [d, (k - 128).astype(np.int8).view(np.uint8)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1), qtype


def write_gguf(model_dir: Path, gguf_source: Path, out: Path, grids: dict[str, Grid] | None, quant: dict | None,
               linears: list[str]) -> dict:
    """The model folder `model_dir` (its decoder `linears`, quantized with `grids` and the `quant`
    params, or only pruned) as one GGUF file `out`, everything else copied from `gguf_source`."""
    import gguf

    reader = gguf.GGUFReader(gguf_source)
    arch = str(reader.fields["general.architecture"].contents())
    arch_id = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
    if arch_id is None:
        raise ConfigError(f"{gguf_source}: the gguf package does not know architecture {arch!r}")
    names = gguf.get_tensor_name_map(arch_id, int(reader.fields[f"{arch}.block_count"].contents()))
    checkpoint = CheckpointReader(model_dir)
    ours = set(linears) | set(grids or {})  # written from the pipeline's weights; the rest copied
    to_hf = {}
    for name in ours:
        mapped = names.get_name(name.removesuffix(".weight"))
        if mapped is None:
            raise ConfigError(f"no GGUF name for {name} in architecture {arch}")
        to_hf[f"{mapped}.weight"] = name
    missing = set(to_hf) - {t.name for t in reader.tensors}
    if missing:
        raise ConfigError(f"{gguf_source} lacks {sorted(missing)[:3]}: not the file this model was made from?")

    writer = gguf.GGUFWriter(out, arch)
    linear_type = gguf.GGMLQuantizationType.F16 if grids is None else block_type(quant["bits"], quant["sym"])
    types: dict[str, int] = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{linear_type.name}"))
    for tensor in reader.tensors:
        hf = to_hf.get(tensor.name)
        if hf is None:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        weight = checkpoint.read([hf])[hf].to(torch.float32)
        if grids is None or hf not in grids:
            data, qtype = weight.numpy().astype(np.float16), gguf.GGMLQuantizationType.F16
            writer.add_tensor(tensor.name, data)
        else:
            bits = quant["bits"] if hf in linears else quant["head"]["bits"]
            data, qtype = _blocks(weight, grids[hf], bits, quant["sym"], quant["groupsize"])
            writer.add_tensor(tensor.name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"file": out.name, "bytes": out.stat().st_size, "dtype": f"{linear_type.name} linears", "written_types": types,
            "copied_from": gguf_source.name}
