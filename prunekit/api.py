"""Compress your own model from Python: load → calibration windows → schedule → prune →
quantize → save, the same library calls the pipeline's stages make (without DVC or Prefect).

Example (any causal LM of the adapter table: a local HF folder, a .gguf file, a hub id when
online, or "embedded:gemma3-270m")::

    >>> import prunekit
    >>> model, tokenizer = prunekit.load(source)
    >>> windows = prunekit.calibration(tokenizer, "c4", nsamples=8, seqlen=64)
    >>> sparsity = prunekit.schedule(model, windows, 0.7, allocator="uniform")
    >>> stats = prunekit.prune(model, windows, sparsity)
    >>> grids = prunekit.quantize(model, windows, bits=4, groupsize=32)
    >>> prunekit.save(model, tokenizer, out_dir)
    >>> round(prunekit.sparsity_of(model), 2)
    0.7

`schedule` takes allocator "uniform", "kmeans" (the paper's log-loss K-means), "owl" or
"search" (the project's search scored end to end; `search=prunekit.SearchParams(...)` sets
its budget). `compress` runs the whole recipe of params.yaml's defaults in one call.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .allocation.estimate import estimate_layer
from .allocation.schedule import allocate
from .allocation.search import search_schedule
from .compression.prune import prune_model
from .compression.quantize import quantize_model
from .config import ConfigError, Params, PruneParams, QuantizeParams, ScheduleParams, SearchParams
from .data import bos_id, calibration_windows, eval_windows, load_text, tokenize
from .forward.scoring import perplexity as _perplexity
from .forward.sources import InMemoryModel
from .models import adapter_for, decoder_layers, layer_linears, load_model, load_tokenizer, pick_device, save_model

log = logging.getLogger(__name__)
DEFAULTS = Params()  # the defaults of params.yaml


def load(source: str, device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """(model in fp32 eval mode on `device`, tokenizer) from an HF folder, a .gguf file, a hub
    id or an embedded model ("embedded:gemma3-270m"); device "auto" picks CUDA when present."""
    return load_model(source, device=pick_device(str(device))), load_tokenizer(source)


def calibration(tokenizer, source: str = DEFAULTS.calibration.source, *, nsamples: int = DEFAULTS.calibration.nsamples,
                seqlen: int = DEFAULTS.calibration.seqlen, seed: int = DEFAULTS.calibration.seed,
                c4_docs: tuple[int, int] = DEFAULTS.calibration.c4_docs) -> torch.Tensor:
    """(nsamples, seqlen) token windows drawn with `seed` from a text: "c4" (documents
    `c4_docs`, never the evaluation documents 0–999), "wikitext2-valid", or a text file."""
    if source == "wikitext2":
        raise ConfigError("'wikitext2' is the evaluation text; calibrate on c4, wikitext2-valid or a file")
    ids = tokenize(load_text(source, c4_docs), tokenizer)
    return calibration_windows(ids, nsamples, seqlen, seed, bos_id(tokenizer))


def dense_hessians(model: nn.Module, windows: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {input key: H}}: every decoder layer's dense Hessians H = (2/N) Σ xᵀx over the windows."""
    runner = InMemoryModel(model).runner(windows)
    return {i: {k: a.H for k, a in runner.hessians(i, dtype, advance=True).items()} for i in range(len(runner))}


def schedule(model: nn.Module, windows: torch.Tensor, sparsity: float = DEFAULTS.prune.sparsity, *,
             allocator: str = DEFAULTS.schedule.allocator, settings: ScheduleParams | None = None,
             search: SearchParams | None = None, prune: PruneParams | None = None) -> dict[str, float]:
    """Per-linear sparsity {'<layer>.<linear>': s} whose parameter-weighted mean is `sparsity`.

    settings: the allocator's parameters (params.yaml's `schedule`; its allocator is replaced
    by `allocator`); search: the search's (default `settings.search`); prune: the pruning
    parameters the search prunes its candidates with. The model is left unchanged.
    """
    settings = (settings or DEFAULTS.schedule).model_copy(update={"allocator": allocator})
    settings = ScheduleParams.model_validate(settings.model_dump())  # validates the allocator name
    prune = prune or DEFAULTS.prune
    if allocator == "search":
        result = search_schedule(model, adapter_for(model), windows, sparsity, search or settings.search,
                                 lo=settings.min_sparsity, hi=settings.max_sparsity,
                                 percdamp=prune.percdamp, blocksize=prune.blocksize)
        return result.sparsity
    if allocator == "ranked":
        raise ConfigError("allocator 'ranked' needs measured sensitivity curves: use the pipeline's sensitivity stage")
    adapter = adapter_for(model)
    if allocator == "uniform":
        return {f"{i}.{n}": float(sparsity) for i in range(len(decoder_layers(model, adapter))) for n in adapter.linears}
    e = DEFAULTS.estimate
    rows = []
    for i, H in dense_hessians(model, windows).items():
        weights = {n: lin.weight.data for n, lin in layer_linears(decoder_layers(model, adapter)[i], adapter).items()}
        rows += estimate_layer(i, weights, adapter.groups, H, e.grid, e.percdamp, e.owl_m)
    table = allocate(pd.DataFrame(rows), sparsity, settings)
    return dict(zip(table["key"], table["sparsity"].astype(float)))


def prune(model: nn.Module, windows: torch.Tensor, sparsity: dict[str, float] | float,
          params: PruneParams | None = None) -> dict[str, dict]:
    """Prune `model` in place, sequentially (layer l's Hessians from the pruned layers < l),
    with a per-linear schedule or one sparsity for all. Returns per-linear stats."""
    params = params or DEFAULTS.prune
    source = InMemoryModel(model)
    if not isinstance(sparsity, dict):
        sparsity = {f"{i}.{n}": float(sparsity) for i in range(len(source.layers)) for n in source.adapter.linears}
    return prune_model(source, sparsity, params, runner=source.runner(windows))


def quantize(model: nn.Module, windows: torch.Tensor, params: QuantizeParams | None = None,
             **settings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ in place (exact zeros kept); settings override `params` (e.g. bits=4, groupsize=128).
    Returns the grid of every decoder linear and of the LM head (params.head.bits; tied: the
    embedding) by state-dict name, {'model.layers.0.self_attn.q_proj.weight': (scales, zeros), ...}."""
    params = QuantizeParams.model_validate({**(params or DEFAULTS.quantize).model_dump(), **settings})
    source = InMemoryModel(model)
    grids: dict = {}
    quantize_model(source, source.runner(windows), params, grids=grids)
    return grids


def save(model: nn.Module, tokenizer, out_dir: str | Path) -> None:
    """An HF folder (safetensors, config, tokenizer) that `from_pretrained` loads, written atomically."""
    save_model(model.cpu(), tokenizer, out_dir)


def sparsity_of(model: nn.Module) -> float:
    """Fraction of exact zeros over the decoder linears' weights."""
    adapter = adapter_for(model)
    weights = [lin.weight for layer in decoder_layers(model, adapter) for lin in layer_linears(layer, adapter).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def perplexity(model: nn.Module, tokenizer, text: str = "wikitext2", *, seqlen: int = DEFAULTS.evaluate.seqlen,
               max_windows: int | None = DEFAULTS.evaluate.max_windows) -> dict:
    """Perplexity under the project's protocol on "wikitext2", "c4" (documents 0–999) or a text file."""
    windows = eval_windows(tokenize(load_text(text), tokenizer), seqlen, bos_id(tokenizer), max_windows)
    return _perplexity(InMemoryModel(model), windows)


def compress(model: nn.Module, windows: torch.Tensor, sparsity: float = DEFAULTS.prune.sparsity, *,
             allocator: str = DEFAULTS.schedule.allocator, bits: int | None = DEFAULTS.quantize.bits) -> dict:
    """The whole recipe with params.yaml's defaults: schedule, sequential SparseGPT, then GPTQ
    (bits None: no quantization). Returns {"sparsity": schedule, "prune": stats, "grids": ...}."""
    schedule_ = schedule(model, windows, sparsity, allocator=allocator)
    stats = prune(model, windows, schedule_)
    grids = quantize(model, windows, bits=bits) if bits is not None else None
    return {"sparsity": schedule_, "prune": stats, "grids": grids}
