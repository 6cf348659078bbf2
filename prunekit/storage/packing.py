"""Packed export of a pruned (and optionally GPTQ-quantized) model with real on-disk reduction.

A pruned linear keeps only its nonzeros: a bitmask of W != 0 (np.packbits over the row-major
entries, d_out·d_in/8 bytes) and the nonzero entries in row-major order, either

- as values (``kind="sparse"``: fp16 by default, or the stored dtype), or
- as integer codes on the GPTQ grid (``kind="sparse_int"``): code k = round(W_ij / s) + z with
  the (d_out, n_groups) fp32 scales s and integer zero points z of the quantize stage; codes of
  ≤ 4 bits are packed two per byte (low nibble first), wider codes one per byte; so are the
  zero points of a ≤ 4-bit grid (``"zeros": "nibbles"`` in the manifest entry).

A quantized tensor that is not pruned (the LM head / tied embedding, `quantize.head`) keeps every
code and no mask (``kind="int"``). Reading a code back computes (k - z) · s in fp32, the same
operations as ``QuantSpec.quantize``, so it restores GPTQ's fp32 weight exactly; `pack_state`
checks that for every weight and raises PackingError instead of writing a lossy file. Every other
tensor (norms, biases, a float embedding) is stored as fp16 (floating tensors) or as stored. The
packed model is one safetensors file plus a JSON manifest (`MANIFEST`) that says how to read
every tensor; `PackedWriter` writes it one part of the state at a time, `load_packed` reads it
back whole or by name, `unpack_to_folder` makes an HF folder of it.

Size per weight at sparsity p: 1/8 byte of mask + (1 - p)·(2 bytes fp16 | ½ byte int4) + the
grids: at p = 0.7 with 4-bit codes ≈ 0.28 bytes against 2 bytes of fp16 (≈ 0.14×); a 4-bit
dense tensor in groups of 128: ½ + 5/128 bytes (≈ 0.27×).

Example:
    >>> W = torch.randn(8, 16) * (torch.rand(8, 16) > 0.7)
    >>> packed, manifest = pack_state({"w": W}, linears=["w"], float_dtype=None)
    >>> torch.equal(unpack_state(packed, manifest)["w"], W)
    True
"""
from __future__ import annotations

import json
import logging
import lzma
import math
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import TensorFileWriter

log = logging.getLogger(__name__)

FORMAT = "prunekit-packed"
VERSION = 2  # 2 added kind "int"; version 1 files read as before
READABLE = (1, 2)
WEIGHTS = "model.packed.safetensors"
MANIFEST = "manifest.json"
QPARAMS = "qparams.safetensors"  # GPTQ grid of every decoder linear, saved next to a quantized model
# A large extra file (Gemma-3's tokenizer.json: 33 MB, 10% of the packed model) is stored
# xz-compressed; `unpack_to_folder` restores it.
COMPRESS_OVER = 1 << 20
XZ_PRESET = 1  # 33 MB -> 4.6 MB in about a second (preset 6: 3.5 MB, over ten times slower)
Grid = tuple[Tensor, Tensor]


def with_dtype(config: dict, dtype: str) -> dict:
    """An HF config.json naming `dtype` (transformers' key; the older torch_dtype dropped)."""
    return {**{k: v for k, v in config.items() if k != "torch_dtype"}, "dtype": dtype}


class PackingError(ValueError):
    """A tensor cannot be packed so that it reads back exactly (or a packed file is inconsistent)."""


def _bitmask(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def _unbitmask(bits: Tensor, numel: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))


def _nibbles(codes: Tensor) -> Tensor:
    """uint8 codes < 16, two per byte: element 2i in the low nibble, 2i+1 in the high one."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4)


def _unnibbles(packed: Tensor, count: int) -> Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:count]


def _expand(grid: Tensor, d_in: int, groupsize: int | None) -> Tensor:
    """(d_out, n_groups) -> (d_out, d_in): every column gets its group's value."""
    if grid.shape[1] == 1:
        return grid.expand(-1, d_in)
    if groupsize is None or -(-d_in // groupsize) != grid.shape[1]:
        raise PackingError(f"grid with {grid.shape[1]} groups does not match d_in {d_in} and groupsize {groupsize}")
    return grid.repeat_interleave(groupsize, dim=1)[:, :d_in]


def grid_codes(W: Tensor, grid: Grid, *, bits: int, groupsize: int | None) -> Tensor:
    """The integer codes k = round(W / s) + z (as fp32, W's shape) of a weight on its grid
    (scales s, zero points z, each (d_out, n_groups)); PackingError unless every code lies in
    [0, 2^bits − 1] and reads back exactly, (k − z)·s == W in fp32."""
    W = W.detach().cpu().to(torch.float32)
    scales, zeros = (g.detach().cpu().to(torch.float32) for g in grid)
    if scales.shape != zeros.shape or scales.shape[0] != W.shape[0]:
        raise PackingError(f"grid shapes {tuple(scales.shape)}, {tuple(zeros.shape)} do not fit weight {tuple(W.shape)}")
    if not bool((zeros == zeros.round()).all()) or bool((zeros < 0).any()) or bool((zeros > 255).any()):
        raise PackingError("zero points must be integers in 0..255")
    s = _expand(scales, W.shape[1], groupsize)
    z = _expand(zeros, W.shape[1], groupsize)
    k = torch.round(W / s).add_(z)
    maxq = 2**bits - 1
    if bool((k < 0).any()) or bool((k > maxq).any()):
        raise PackingError(f"codes outside 0..{maxq}: the weight is not on its {bits}-bit grid")
    restored = (k - z).mul_(s)
    if not torch.equal(restored, W):
        bad = int((restored != W).sum())
        raise PackingError(f"{bad} of {W.numel()} weights do not read back exactly from their codes")
    return k


def pack_linear(W: Tensor, grid: Grid | None = None, *, bits: int = 4, groupsize: int | None = None,
                float_dtype: torch.dtype | None = torch.float16, sparse: bool = True) -> tuple[dict[str, Tensor], dict]:
    """Pack one (d_out, d_in) weight: mask + values, or mask + codes + grid when `grid` is given;
    without `sparse` (a quantized tensor that was not pruned), every code and no mask.

    Returns (tensors keyed by suffix, manifest entry). Raises PackingError when a quantized weight
    is off its grid (codes outside [0, 2^bits - 1] or (k - z)·s != W) or an fp16 value overflows.
    """
    if W.dim() != 2:
        raise PackingError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not sparse and grid is None:
        raise PackingError("a tensor packed without a mask needs its grid")
    W = W.detach().cpu()
    mask = W != 0 if sparse else torch.ones(W.shape, dtype=torch.bool)
    nnz = int(mask.sum())
    entry = {"shape": list(W.shape), "dtype": str(W.dtype).removeprefix("torch."), "nnz": nnz}
    out = {"mask": _bitmask(mask)} if sparse else {}
    if grid is None:
        values = W[mask] if float_dtype is None else W[mask].to(float_dtype)
        if not bool(torch.isfinite(values).all()) and bool(torch.isfinite(W[mask]).all()):
            raise PackingError(f"a nonzero weight overflows {float_dtype}")
        out["values"] = values
        return out, {**entry, "kind": "sparse"}

    k = grid_codes(W, grid, bits=bits, groupsize=groupsize)
    scales, zeros = (g.detach().cpu().to(torch.float32) for g in grid)
    k = k[mask] if sparse else k.reshape(-1)
    codes = k.to(torch.uint8)
    entry = {**entry, "kind": "sparse_int" if sparse else "int", "bits": bits, "groupsize": groupsize}
    z8 = zeros.to(torch.uint8)
    if bits <= 4 and int(z8.max()) < 16:  # a zero point on a 4-bit grid is a 4-bit code too
        z8, entry["zeros"] = _nibbles(z8.reshape(-1)), "nibbles"
    out.update(codes=_nibbles(codes) if bits <= 4 else codes, scales=scales, zeros=z8)
    return out, entry


def packed_nbytes(shape: tuple[int, int], nnz: int, *, bits: int | None = None, groupsize: int | None = None,
                  sparse: bool = True, value_bytes: int = 2) -> int:
    """Tensor bytes `pack_linear` writes for a (d_out, d_in) weight with `nnz` nonzeros: its mask
    (when `sparse`) and values of `value_bytes` each, or with `bits` its codes, fp32 scales and
    zero points; sizes a model's packed form without packing it (the report's size table)."""
    d_out, d_in = shape
    numel = d_out * d_in
    count = nnz if sparse else numel
    mask = -(-numel // 8) if sparse else 0
    if bits is None:
        return mask + count * value_bytes
    grid = d_out * (1 if groupsize is None else -(-d_in // groupsize))
    def small(n: int) -> int:  # ≤ 4-bit codes and zero points: two per byte
        return -(-n // 2) if bits <= 4 else n
    return mask + small(count) + 4 * grid + small(grid)


def unpack_linear(tensors: Mapping[str, Tensor], entry: dict) -> Tensor:
    """The dense weight of one packed linear (see `pack_linear`), in its original dtype."""
    shape, nnz = tuple(entry["shape"]), entry["nnz"]
    dtype = getattr(torch, entry["dtype"])
    if entry.get("zeros") == "nibbles":
        scales = tensors["scales"]
        tensors = {**tensors, "zeros": _unnibbles(tensors["zeros"], scales.numel()).reshape(scales.shape)}
    if entry["kind"] == "int":  # every entry, no mask
        codes = tensors["codes"]
        k = (_unnibbles(codes, nnz) if entry["bits"] <= 4 else codes[:nnz]).to(torch.float32).reshape(shape)
        s = _expand(tensors["scales"], shape[1], entry["groupsize"])
        z = _expand(tensors["zeros"].to(torch.float32), shape[1], entry["groupsize"])
        return (k - z).mul_(s).to(dtype)
    mask = _unbitmask(tensors["mask"], math.prod(shape)).reshape(shape)
    if int(mask.sum()) != nnz:
        raise PackingError(f"mask holds {int(mask.sum())} nonzeros, manifest says {nnz}")
    W = torch.zeros(shape, dtype=torch.float32)
    if entry["kind"] == "sparse":
        W[mask] = tensors["values"].to(torch.float32)
    else:
        codes = tensors["codes"]
        k = (_unnibbles(codes, nnz) if entry["bits"] <= 4 else codes[:nnz]).to(torch.float32)
        s = _expand(tensors["scales"], shape[1], entry["groupsize"])[mask]
        z = _expand(tensors["zeros"].to(torch.float32), shape[1], entry["groupsize"])[mask]
        W[mask] = (k - z).mul_(s)
    return W.to(dtype)


def pack_state(tensors: Mapping[str, Tensor], linears: Iterable[str], grids: Mapping[str, Grid] | None = None, *,
               bits: int = 4, groupsize: int | None = None, float_dtype: torch.dtype | None = torch.float16,
               tensor_bits: Mapping[str, int] | None = None) -> tuple[dict[str, Tensor], dict]:
    """Pack a state dict: `linears` (names in `tensors`) as sparse, the rest dense.

    grids: {weight name: (scales, zeros)} of a quantized model (None: pruned only); every linear
    must then have one, and any other tensor with a grid (the LM head) is packed as codes without
    a mask. tensor_bits: {name: bits} where a tensor's grid is not `bits` wide (the head's).
    float_dtype: dtype of floating tensors that are not codes (None: as stored).
    Returns (flat {key: tensor} for one safetensors file, manifest).
    """
    linears = list(linears)
    missing = [n for n in linears if n not in tensors]
    if missing:
        raise PackingError(f"linears not in the state: {missing[:3]}")
    if grids is not None and (absent := [n for n in linears if n not in grids]):
        raise PackingError(f"quantized model without a grid for {absent[:3]}")
    packed: dict[str, Tensor] = {}
    entries: dict[str, dict] = {}
    for name in tqdm(linears, desc="pack linears", unit="linear", leave=False):
        parts, entries[name] = pack_linear(tensors[name], None if grids is None else grids[name], bits=bits,
                                           groupsize=groupsize, float_dtype=float_dtype)
        packed.update({f"{name}.__{suffix}": t.contiguous() for suffix, t in parts.items()})
    sparse = set(linears)
    for name, t in tensors.items():
        if name in sparse:
            continue
        if grids is not None and name in grids:
            parts, entries[name] = pack_linear(t, grids[name], bits=(tensor_bits or {}).get(name, bits),
                                               groupsize=groupsize, sparse=False)
            packed.update({f"{name}.__{suffix}": p.contiguous() for suffix, p in parts.items()})
            continue
        t = t.detach().cpu()
        keep = float_dtype is None or not t.is_floating_point()
        packed[name] = (t if keep else t.to(float_dtype)).contiguous()
        entries[name] = {"kind": "dense", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    return packed, {"format": FORMAT, "version": VERSION, "weights": WEIGHTS, "tensors": entries}


def unpack_state(packed: Mapping[str, Tensor], manifest: dict) -> dict[str, Tensor]:
    """The state dict that `pack_state` packed (dense tensors back in their original dtype)."""
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE:
        raise PackingError(f"not a {FORMAT} manifest of version {' or '.join(map(str, READABLE))}")
    state = {}
    for name, entry in tqdm(manifest["tensors"].items(), desc="unpack", unit="tensor", leave=False):
        if entry["kind"] == "dense":
            state[name] = packed[name].to(getattr(torch, entry["dtype"]))
        else:
            prefix = f"{name}.__"
            parts = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
            state[name] = unpack_linear(parts, entry)
    return state


def sizes(packed: Mapping[str, Tensor], manifest: dict) -> dict:
    """Tensor bytes of the packed (pruned) linears and of the whole state against the same tensors in fp16."""
    return _sizes({k: t.numel() * t.element_size() for k, t in packed.items()}, manifest)


def _sizes(nbytes: Mapping[str, int], manifest: dict) -> dict:
    """`sizes` from the bytes of every packed tensor, {key: bytes}."""
    entries = manifest["tensors"]
    sparse = {n for n, e in entries.items() if e["kind"] in ("sparse", "sparse_int")}
    fp16 = {n: 2 * math.prod(e["shape"]) for n, e in entries.items()}
    lin_packed = sum(n for k, n in nbytes.items() if k.split(".__")[0] in sparse and ".__" in k)
    all_packed = sum(nbytes.values())
    lin_fp16 = sum(fp16[n] for n in sparse)
    all_fp16 = sum(fp16.values())
    return {
        "linears": {"packed_bytes": lin_packed, "fp16_bytes": lin_fp16,
                    "ratio_vs_fp16": lin_packed / lin_fp16 if lin_fp16 else None},
        "tensors": {"packed_bytes": all_packed, "fp16_bytes": all_fp16, "ratio_vs_fp16": all_packed / all_fp16},
    }


def save_grids(path: str | Path, grids: Mapping[str, Grid]) -> None:
    """GPTQ grids {weight name: (scales, zeros)} as one safetensors file ('<name>.scales/.zeros')."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    flat = {f"{name}.{part}": t.detach().cpu().to(torch.float32).contiguous()
            for name, grid in grids.items() for part, t in zip(("scales", "zeros"), grid)}
    save_file(flat, tmp, metadata={"format": "prunekit-gptq-grids"})
    tmp.replace(path)


def load_grids(path: str | Path) -> dict[str, Grid]:
    """The grids `save_grids` wrote."""
    from safetensors.torch import load_file

    flat = load_file(path)
    names = {k.rsplit(".", 1)[0] for k in flat}
    return {n: (flat[f"{n}.scales"], flat[f"{n}.zeros"]) for n in sorted(names)}


class PackedWriter:
    """A packed folder written one part of the state at a time (e.g. a decoder layer's tensors),
    so that neither the model nor its packed form is ever whole in memory.

    Example (what `save_packed` does with a whole state)::

        writer = PackedWriter("packed")
        writer.add(*pack_state(layer_tensors, linears, grids, groupsize=128))  # once per part
        writer.close(extra_files=["config.json"])
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.file = TensorFileWriter(self.out_dir / WEIGHTS, metadata={"format": FORMAT})
        self.entries: dict[str, dict] = {}  # the manifest's "tensors"
        self.nbytes: dict[str, int] = {}  # bytes of every packed tensor

    def add(self, packed: Mapping[str, Tensor], manifest: dict) -> None:
        """Append one `pack_state` result."""
        for key, t in packed.items():
            self.file.write(key, t)
            self.nbytes[key] = t.numel() * t.element_size()
        self.entries.update(manifest["tensors"])

    @property
    def manifest(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "weights": WEIGHTS, "tensors": self.entries}

    def sizes(self) -> dict:
        """`sizes` of everything added."""
        return _sizes(self.nbytes, self.manifest)

    def close(self, extra_files: Iterable[Path] = ()) -> Path:
        """Finish the weights file, write the manifest and copy `extra_files` (e.g. config.json,
        the tokenizer's files; one over `COMPRESS_OVER` bytes as `<name>.xz`)."""
        self.file.close()
        (self.out_dir / MANIFEST).write_text(json.dumps(self.manifest, indent=1, sort_keys=True) + "\n")
        for f in map(Path, extra_files):
            if f.stat().st_size > COMPRESS_OVER:
                (self.out_dir / f"{f.name}.xz").write_bytes(lzma.compress(f.read_bytes(), preset=XZ_PRESET))
            else:
                shutil.copy2(f, self.out_dir / f.name)
        log.info("wrote packed model to %s (%.1f MB)", self.out_dir, (self.out_dir / WEIGHTS).stat().st_size / 1e6)
        return self.out_dir / WEIGHTS


def save_packed(out_dir: str | Path, packed: Mapping[str, Tensor], manifest: dict,
                extra_files: Iterable[Path] = ()) -> Path:
    """Write the packed weights, the manifest and `extra_files` (e.g. config.json) into out_dir."""
    writer = PackedWriter(out_dir)
    writer.add(packed, manifest)
    return writer.close(extra_files)


def load_packed(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """The unpacked state dict of a packed folder (see `save_packed`), or only its tensors `names`
    (read alone from the weights file)."""
    from safetensors import safe_open

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if names is not None:
        manifest["tensors"] = {n: manifest["tensors"][n] for n in names}
    with safe_open(folder / manifest["weights"], "pt") as f:
        packed = {k: f.get_tensor(k) for k in f.keys() if k.split(".__")[0] in manifest["tensors"]}
    return unpack_state(packed, manifest)


def unpack_to_folder(folder: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Rewrite a packed folder as a plain HF folder that `AutoModelForCausalLM.from_pretrained(out_dir)`
    loads: one model.safetensors with floating tensors in `dtype` (default: the dtype config.json
    names, the export's), and every other file of the folder (config, generation config,
    tokenizer). The folder appears whole or not at all."""
    from safetensors.torch import save_file

    from ..artifacts import replace_dir

    folder, out_dir = Path(folder), Path(out_dir)
    if not (folder / MANIFEST).is_file() or not (folder / "config.json").is_file():
        raise PackingError(f"{folder} is not a packed export (it needs {MANIFEST} and config.json)")
    config = json.loads((folder / "config.json").read_text())
    dtype = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    cast = getattr(torch, dtype, None)
    if not isinstance(cast, torch.dtype) or not cast.is_floating_point:
        raise PackingError(f"unknown floating dtype {dtype!r}: use bfloat16, float16 or float32")
    state = {n: t.to(cast) if t.is_floating_point() else t for n, t in load_packed(folder).items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        for f in folder.iterdir():
            if f.is_file() and f.name.endswith(".xz"):
                (tmp / f.name.removesuffix(".xz")).write_bytes(lzma.decompress(f.read_bytes()))
            elif f.is_file() and f.name not in (MANIFEST, WEIGHTS, "config.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(with_dtype(config, dtype), indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
