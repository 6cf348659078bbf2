"""Pruning drivers: every decoder linear of a model pruned layer by layer, one factorisation
per shared input.

Sequential mode (faithful to SparseGPT): layer l's Hessians come from the inputs produced by
the already-pruned layers < l. Parallel mode: every layer uses the cached dense Hessians of
the store, so layers are independent and may run on other workers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import kernels
from ..config import PruneParams
from ..forward.layerwise import LayerwiseRunner
from ..models import Adapter
from ..steps import Step, call, submit

if TYPE_CHECKING:  # the store (zarr) is needed only by the stages that read or write it
    from ..forward.sources import LayerSource
    from ..storage.hessian_store import HessianStore


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


def prune_model(source: LayerSource, sparsity: dict[str, float], params: PruneParams, *,
                runner: LayerwiseRunner | None = None, store: HessianStore | None = None,
                hessian_dtype: torch.dtype = torch.float32, step: Step = call,
                quant: kernels.QuantSpec | None = None) -> dict[str, dict]:
    """Prune every decoder layer of `source` in place (a streamed source writes each layer out).

    Sequential mode (runner given: the calibration windows' `source.runner(windows)`): layer
    l's Hessians come from inputs produced by the already pruned layers < l. Parallel mode
    (store given): every layer uses the cached dense Hessians. quant (sequential mode): joint
    sparse + quantized in one pass per linear (`prune_layer`).
    """
    if (runner is None) == (store is None):
        raise ValueError("give exactly one of runner (sequential) or store (parallel)")
    if quant is not None and store is not None:
        raise ValueError("joint quantization runs in sequential mode (give runner)")
    adapter = source.adapter
    stats: dict[str, dict] = {}
    n = len(source.layers)
    if store is not None and not source.streamed:
        # Layers are independent given the dense Hessians: submit them all (a Dask or process
        # runner spreads them over workers, each reading its layer from the store) and put the
        # pruned weights back in order.
        futures = [submit(step, prune_stored_layer, source.layers[i], i, adapter, store, sparsity, params)
                   for i in range(n)]
        for layer, future in zip(source.layers, tqdm(futures, desc=f"prune ({params.mode})", unit="layer")):
            layer_stats, weights = future.result()
            for name, weight in weights.items():
                layer.get_submodule(name).weight.data = weight
            stats.update(layer_stats)
        return stats
    for i in tqdm(range(n), desc=f"prune ({params.mode})", unit="layer"):
        with source.layer(i) as layer:
            if store is not None:  # streamed: one layer at a time
                layer_stats, weights = step(prune_stored_layer, layer, i, adapter, store, sparsity, params)
                for name, weight in weights.items():
                    layer.get_submodule(name).weight.data = weight
                stats.update(layer_stats)
                continue
            hessians = {k: a.H for k, a in step(runner.hessians, i, hessian_dtype).items()}
            stats.update(step(prune_layer, layer, i, adapter, hessians, sparsity, params, quant))
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
