"""The final model in the forms people serve, written from its saved folder one decoder layer at
a time (memory holds about one layer, never the model):

- `write_hf`: an HF folder in a 16-bit dtype (bf16 for Gemma-3), pruned zeros exact (0 is exact
  in every float dtype), with config, generation config and tokenizer: `from_pretrained` loads it.
- `write_compressed_tensors`: W4A16 through the compressed-tensors library ("pack-quantized":
  int codes packed into int32, one scale per group of `groupsize` input columns, no activation
  quantization), loaded by transformers with compressed-tensors installed and no prunekit.

GPTQ's grid maps onto compressed-tensors' exactly: our code q = round(w / s) + z in [0, 2^b − 1]
is its signed code q − 2^(b−1) with zero point z − 2^(b−1); a symmetric grid has z = 2^(b−1), so
compressed-tensors' symmetric form (no zero point) holds it. Scales are stored in the export
dtype, as compressed-tensors' own checkpoints do; dequantized weights then differ from the
pipeline's fp32 ones by that rounding only, and pruned weights (code q = z) stay exactly zero.
transformers (5.24) loads asymmetric zero points only when it dequantizes at load (llm-compressor
#1618: its compressed path allocates them unpacked, the format stores them packed). An
asymmetric export therefore sets `dequantize: true` in its `quantization_config`, the option
transformers' CompressedTensorsConfig reads from config.json: `from_pretrained(dir)` loads it on
the default path (weights dequantized to the export dtype once, at load; a symmetric export stays
compressed until the first forward). compressed-tensors' QuantizationConfig ignores the key and
vLLM's reader takes only the keys it knows; the tensors are the format's own.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..artifacts import read_json, write_json
from ..config import ConfigError
from .checkpoint import SINGLE_FILE, CheckpointReader, TensorFileWriter
from .export import decoder_linears, read_batches
from .packing import Grid, with_dtype

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# a saved tokenizer's files (what AutoTokenizer.from_pretrained reads), as glob patterns
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab.*",
                   "merges.txt")


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of a model folder; ConfigError when it has none."""
    files = sorted({f for pattern in TOKENIZER_FILES for f in folder.glob(pattern) if f.is_file()})
    if not any(f.name == "tokenizer_config.json" for f in files):
        raise ConfigError(f"{folder} has no tokenizer (no tokenizer_config.json): rerun the prepare_model stage")
    return files


def model_files(folder: Path) -> list[Path]:
    """What a model folder holds besides weights and config that every export form carries: its
    tokenizer files and generation config (when it has one)."""
    gen = folder / "generation_config.json"
    return tokenizer_files(folder) + ([gen] if gen.is_file() else [])


def copy_files(files: list[Path], out: Path) -> None:
    """Copy `files` into the folder `out`, as they are."""
    for f in files:
        shutil.copyfile(f, out / f.name)


def _write_form(source: Path, out: Path, dtype: str, desc: str,
                linear: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None) -> None:
    """The model folder `source` as an HF folder at `out` (created; the caller publishes it):
    generation config and tokenizer copied, config.json naming `dtype`, and one safetensors file
    written one decoder layer at a time: floating tensors cast to `dtype`, each decoder linear's
    weight replaced by `linear(name, weight)` ({tensor name: tensor}) when given."""
    out.mkdir(parents=True, exist_ok=True)
    copy_files(model_files(source), out)
    config = read_json(source / "config.json")
    write_json(out / "config.json", with_dtype(config, dtype))
    reader, cast = CheckpointReader(source), DTYPES[dtype]
    linears = set(decoder_linears(reader.weight_map, config["model_type"])) if linear is not None else set()
    writer = TensorFileWriter(out / SINGLE_FILE, metadata={"format": "pt"})
    for batch in tqdm(read_batches(reader.weight_map, config["model_type"]), desc=desc, unit="part"):
        for name, t in reader.read(batch).items():
            parts = linear(name, t) if name in linears else {name: t.to(cast) if t.is_floating_point() else t}
            for key, value in parts.items():
                writer.write(key, value)
    writer.close()


def write_hf(source: Path, out: Path, dtype: str) -> dict:
    """The model folder `source` as an HF folder in `dtype` at `out` (created; the caller publishes it)."""
    _write_form(source, out, dtype, f"hf {dtype}")
    return {"dir": out.name, "dtype": dtype, "bytes": _bytes(out)}


def quantization_scheme(quant: dict):
    """The compressed-tensors scheme of a GPTQ grid (quantize params): int weights, groups along
    the input columns (or one grid per row), symmetric or not; activations stay in the model's
    dtype (W·A16)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    grouped = quant["groupsize"] is not None
    args = QuantizationArgs(num_bits=quant["bits"], type="int", symmetric=quant["sym"],
                            strategy="group" if grouped else "channel", group_size=quant["groupsize"])
    return QuantizationScheme(targets=["Linear"], weights=args)


def write_compressed_tensors(source: Path, out: Path, grids: dict[str, Grid], quant: dict, dtype: str) -> dict:
    """The quantized model folder `source` (its GPTQ grids {weight name: (scales, zeros)}, made with the `quant` params)
    as a compressed-tensors "pack-quantized" HF folder in `dtype` at `out`."""
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    scheme, cast = quantization_scheme(quant), DTYPES[dtype]
    offset = 2 ** (quant["bits"] - 1)  # our unsigned codes -> compressed-tensors' signed ones

    def packed(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        module = name.removesuffix(".weight")
        scales, zeros = grids[name]
        state = {"weight": weight, "weight_scale": scales.to(torch.float32)}
        if not quant["sym"]:
            state["weight_zero_point"] = (zeros - offset).to(torch.int8)
        elif not bool((zeros == offset).all()):
            raise ConfigError(f"{module}: a symmetric grid has zero point {offset}; the grids do not match "
                              "quantize.sym (rerun `dvc repro -f quantize`)")
        return {f"{module}.{key}": (value.to(cast) if key == "weight_scale" else value).contiguous()
                for key, value in PackedQuantizationCompressor.compress(state, scheme).items()}

    _write_form(source, out, dtype, "compressed-tensors", packed)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status=QuantizationStatus.COMPRESSED, ignore=["lm_head"])
    ModelCompressor(quantization_config=qconfig).update_config(str(out))
    if not quant["sym"]:
        config = read_json(out / "config.json")
        config["quantization_config"]["dequantize"] = True
        write_json(out / "config.json", config)
    return {"dir": out.name, "dtype": dtype, "format": "pack-quantized", "bytes": _bytes(out),
            "compressed_tensors": compressed_tensors.__version__,
            "loads_with": "AutoModelForCausalLM.from_pretrained(dir)"}


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
