"""Layer loops: dense Hessians into the store, pruning, quantization.

Each loop is plain Python over decoder layers. The per-layer work goes through `step(fn, *args)`
— by default a direct call; the Prefect flows pass a step that runs `fn` as a named task, so
orchestration wraps the same loop instead of copying it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import kernels
from .config import PruneParams, QuantizeParams
from .layerwise import LayerwiseRunner
from .models import Adapter, decoder_layers

if TYPE_CHECKING:  # the store (zarr) is needed only by the stages that read or write it
    from .hessian_store import HessianStore

log = logging.getLogger(__name__)
Step = Callable[..., Any]


def call(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def collect_hessians(runner: LayerwiseRunner, store: HessianStore, dtype: torch.dtype, step: Step = call) -> None:
    """Dense Hessians of every layer into the store, layer by layer.

    Layers already complete in the store (from an interrupted run) are only run forward to
    produce the next layer's inputs.
    """
    adapter = runner.adapter
    for i in tqdm(range(len(runner)), desc="hessians", unit="layer"):
        if store.has_layer(i):
            runner.advance(i)
            continue
        step(_hessian_layer, runner, store, i, dtype, adapter)


def _hessian_layer(runner: LayerwiseRunner, store: HessianStore, i: int, dtype: torch.dtype, adapter: Adapter) -> None:
    accumulators = runner.hessians(i, dtype, advance=True)
    groups = {adapter.group_key(g): list(g) for g in adapter.groups}
    store.write_layer(i, {k: (a.H, a.n_tokens) for k, a in accumulators.items()}, groups)


def prune_layer(layer: nn.Module, index: int, adapter: Adapter, hessians: dict[str, torch.Tensor],
                sparsity: dict[str, float], params: PruneParams) -> dict[str, dict]:
    """Prune every linear of one decoder layer in place; one factorisation per shared input.

    hessians: {input key: H} for this layer; sparsity: {'<layer>.<linear>': target}.
    Returns per-linear stats {'<layer>.<linear>': {'target', 'sparsity', 'loss'}}.
    """
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
                                             blocksize=params.blocksize)
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
                hessian_dtype: torch.dtype = torch.float32, step: Step = call) -> dict[str, dict]:
    """Prune the whole model layer by layer.

    Sequential mode (runner given): layer l's Hessians come from inputs produced by the already
    pruned layers < l. Parallel mode (store given): every layer uses the cached dense Hessians.
    """
    if (runner is None) == (store is None):
        raise ValueError("give exactly one of runner (sequential) or store (parallel)")
    stats: dict[str, dict] = {}
    layers = decoder_layers(model, adapter)
    device = next(model.parameters()).device
    for i in tqdm(range(len(layers)), desc=f"prune ({params.mode})", unit="layer"):
        if runner is not None:
            hessians = {k: a.H for k, a in step(runner.hessians, i, hessian_dtype).items()}
        else:
            hessians = {k: h for k, (h, _) in store.read_layer(i, device).items()}
        stats.update(step(prune_layer, layers[i], i, adapter, hessians, sparsity, params))
        if runner is not None:
            runner.advance(i)
    return stats


def quantize_layer(layer: nn.Module, index: int, adapter: Adapter, hessians: dict[str, torch.Tensor],
                   params: QuantizeParams) -> dict[str, dict]:
    """GPTQ on every linear of one layer in place; exact zeros (pruned weights) stay zero."""
    spec = kernels.QuantSpec(bits=params.bits, sym=params.sym, groupsize=params.groupsize, act_order=params.act_order)
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
            }
    return stats


def quantize_model(model: nn.Module, adapter: Adapter, runner: LayerwiseRunner, params: QuantizeParams, *,
                   hessian_dtype: torch.dtype = torch.float32, step: Step = call) -> dict[str, dict]:
    """Sequential GPTQ over all layers (Hessians from the already-quantized prefix)."""
    stats: dict[str, dict] = {}
    layers = decoder_layers(model, adapter)
    for i in tqdm(range(len(layers)), desc="quantize", unit="layer"):
        hessians = {k: a.H for k, a in step(runner.hessians, i, hessian_dtype).items()}
        stats.update(step(quantize_layer, layers[i], i, adapter, hessians, params))
        runner.advance(i)
    return stats
