"""Layer loops: dense Hessians into the store, pruning, quantization.

Each loop is plain Python over decoder layers. The per-layer work goes through `step(fn, *args)`
— by default a direct call; the Prefect flows pass a step that runs `fn` as a named task, so
orchestration wraps the same loop instead of copying it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import kernels
from .config import PruneParams, QuantizeParams
from .layerwise import LayerwiseRunner
from .mapreduce import submit
from .models import Adapter, decoder_layers

if TYPE_CHECKING:  # the store (zarr) is needed only by the stages that read or write it
    from .hessian_store import HessianStore
    from .streaming import LayerStream

log = logging.getLogger(__name__)
Step = Callable[..., Any]


def call(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def loaded(stream: LayerStream | None, i: int) -> AbstractContextManager:
    """Layer i's weights read from disk for the body, written out and freed after it
    (`streaming.LayerStream`); nothing to do for a model held in memory."""
    return nullcontext() if stream is None else stream.layer(i)


def collect_hessians(runner: LayerwiseRunner, store: HessianStore, dtype: torch.dtype, step: Step = call,
                     stream: LayerStream | None = None) -> None:
    """Dense Hessians of every layer into the store, layer by layer.

    Layers already complete in the store (from an interrupted run) are only run forward to
    produce the next layer's inputs.
    """
    adapter = runner.adapter
    for i in tqdm(range(len(runner)), desc="hessians", unit="layer"):
        with loaded(stream, i):
            if store.has_layer(i):
                runner.advance(i)
                continue
            step(_hessian_layer, runner, store, i, dtype, adapter)


def _hessian_layer(runner: LayerwiseRunner, store: HessianStore, i: int, dtype: torch.dtype, adapter: Adapter) -> None:
    accumulators = runner.hessians(i, dtype, advance=True)
    groups = {adapter.group_key(g): list(g) for g in adapter.groups}
    store.write_layer(i, {k: (a.H, a.n_tokens) for k, a in accumulators.items()}, groups)


def prune_layer(layer: nn.Module, index: int, adapter: Adapter, hessians: dict[str, torch.Tensor],
                sparsity: dict[str, float], params: PruneParams, quant: kernels.QuantSpec | None = None) -> dict[str, dict]:
    """Prune every linear of one decoder layer in place; one factorisation per shared input.

    hessians: {input key: H} for this layer; sparsity: {'<layer>.<linear>': target}; quant
    (SparseGPT only): quantize the survivors in the same pass (joint sparse + quantized).
    Returns per-linear stats {'<layer>.<linear>': {'target', 'sparsity', 'loss'}}.
    """
    if quant is not None and params.method != "sparsegpt":
        raise ValueError(f"joint quantization needs method sparsegpt, got {params.method!r}")
    prunen, prunem = params.n_m
    stats = {}
    for group in adapter.groups:
        H = hessians[adapter.group_key(group)]
        factor = kernels.factorize(H, params.percdamp) if params.method != "magnitude" else None
        linears = [layer.get_submodule(name) for name in group]
        targets = [sparsity[f"{index}.{name}"] for name in group]
        weights = [linear.weight.data for linear in linears]
        if params.method == "sparsegpt":
            # One sweep over the rows of every linear reading this input (same result, less work).
            results = kernels.sparsegpt_many(weights, factor, targets, prunen=prunen, prunem=prunem,
                                             blocksize=params.blocksize, quant=quant)
        elif params.method == "wanda":
            results = [kernels.wanda(W, factor, t, prunen=prunen, prunem=prunem) for W, t in zip(weights, targets)]
        else:
            results = [kernels.magnitude(W, t, prunen=prunen, prunem=prunem) for W, t in zip(weights, targets)]
        for name, linear, target, result in zip(group, linears, targets, results):
            linear.weight.data = result.weight
            stats[f"{index}.{name}"] = {
                "params": result.weight.numel(),
                "target": target,
                "sparsity": float((result.weight == 0).float().mean()),
                "loss": float(result.loss),
            }
    return stats


def prune_model(model: nn.Module, adapter: Adapter, sparsity: dict[str, float], params: PruneParams, *,
                runner: LayerwiseRunner | None = None, store: HessianStore | None = None,
                hessian_dtype: torch.dtype = torch.float32, step: Step = call,
                stream: LayerStream | None = None, quant: kernels.QuantSpec | None = None) -> dict[str, dict]:
    """Prune the whole model layer by layer (one layer in memory at a time with `stream`).

    Sequential mode (runner given): layer l's Hessians come from inputs produced by the already
    pruned layers < l. Parallel mode (store given): every layer uses the cached dense Hessians.
    quant (sequential mode): joint sparse + quantized in one pass per linear (`prune_layer`).
    """
    if (runner is None) == (store is None):
        raise ValueError("give exactly one of runner (sequential) or store (parallel)")
    if quant is not None and store is not None:
        raise ValueError("joint quantization runs in sequential mode (give runner)")
    stats: dict[str, dict] = {}
    layers = decoder_layers(model, adapter)
    if store is not None and stream is not None:
        for i in tqdm(range(len(layers)), desc=f"prune ({params.mode}, streamed)", unit="layer"):
            with stream.layer(i) as layer:
                layer_stats, weights = step(prune_stored_layer, layer, i, adapter, store, sparsity, params)
                for name, weight in weights.items():
                    layer.get_submodule(name).weight.data = weight
            stats.update(layer_stats)
        return stats
    if store is not None:
        # Layers are independent given the dense Hessians: submit them all (a Dask or process
        # runner spreads them over workers, each reading its layer from the store) and put the
        # pruned weights back in order.
        futures = [submit(step, prune_stored_layer, layers[i], i, adapter, store, sparsity, params)
                   for i in range(len(layers))]
        for layer, future in zip(layers, tqdm(futures, desc=f"prune ({params.mode})", unit="layer")):
            layer_stats, weights = future.result()
            for name, weight in weights.items():
                layer.get_submodule(name).weight.data = weight
            stats.update(layer_stats)
        return stats
    for i in tqdm(range(len(layers)), desc=f"prune ({params.mode})", unit="layer"):
        with loaded(stream, i):
            hessians = {k: a.H for k, a in step(runner.hessians, i, hessian_dtype).items()}
            stats.update(step(prune_layer, layers[i], i, adapter, hessians, sparsity, params, quant))
            runner.advance(i)
    return stats


def prune_stored_layer(layer: nn.Module, index: int, adapter: Adapter, store: HessianStore,
                       sparsity: dict[str, float], params: PruneParams) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Parallel mode's unit of work: read layer `index`'s dense Hessians, prune the layer.

    Returns (per-linear stats, {linear: pruned weight}); the weights travel back because a
    worker prunes its own copy of the layer.
    """
    device = next(layer.parameters()).device
    hessians = store.hessians(index, device)
    stats = prune_layer(layer, index, adapter, hessians, sparsity, params)
    return stats, {name: layer.get_submodule(name).weight.data for name in adapter.linears}


def quantize_layer(layer: nn.Module, index: int, adapter: Adapter, hessians: dict[str, torch.Tensor],
                   params: QuantizeParams) -> dict[str, dict]:
    """GPTQ on every linear of one layer in place; exact zeros (pruned weights) stay zero.

    Each linear's stats also carry its grid, 'scales' and 'zeros' ((d_out, n_groups) fp32 on the
    CPU), which quantize_model hands over separately so that an export can store integer codes.
    """
    spec = kernels.QuantSpec(bits=params.bits, sym=params.sym, groupsize=params.groupsize, act_order=params.act_order,
                             mse=params.mse)
    stats = {}
    for group in adapter.groups:
        H = hessians[adapter.group_key(group)]
        for name in group:
            linear = layer.get_submodule(name)
            result = kernels.gptq(linear.weight.data, H, spec, percdamp=params.percdamp,
                                  blocksize=params.blocksize, keep_zeros=True)
            linear.weight.data = result.weight
            stats[f"{index}.{name}"] = {
                "sparsity": float((result.weight == 0).float().mean()),
                "loss": float(result.loss),
                "scales": result.scales.cpu(),
                "zeros": result.zeros.cpu(),
            }
    return stats


def quantize_model(model: nn.Module, adapter: Adapter, runner: LayerwiseRunner, params: QuantizeParams, *,
                   hessian_dtype: torch.dtype = torch.float32, step: Step = call,
                   grids: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   stream: LayerStream | None = None) -> dict[str, dict]:
    """Sequential GPTQ over all layers (Hessians from the already-quantized prefix).

    grids: when given, filled with {'<layer>.<linear>': (scales, zeros)}, the grid of every
    linear (code of W_ij in group g: round(W_ij / scales[i, g]) + zeros[i, g]).
    """
    stats: dict[str, dict] = {}
    layers = decoder_layers(model, adapter)
    for i in tqdm(range(len(layers)), desc="quantize", unit="layer"):
        with loaded(stream, i):
            hessians = {k: a.H for k, a in step(runner.hessians, i, hessian_dtype).items()}
            for key, s in step(quantize_layer, layers[i], i, adapter, hessians, params).items():
                grid = (s.pop("scales"), s.pop("zeros"))
                if grids is not None:
                    grids[key] = grid
                stats[key] = s
            runner.advance(i)
    return stats
