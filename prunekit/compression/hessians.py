"""Dense Hessians of every decoder layer into the store, in one process or as map-reduce over
calibration shards.

The layer loop is sequential over decoder layers (layer l+1's inputs are layer l's outputs),
so what spreads over workers is the work inside one layer: the calibration windows are split
into shards, each shard's activations run through the layer as one task that returns its
partial Hessians (with token counts) and its outputs, and the partials are reduced with the
count-weighted mean (`HessianAccumulator.merge`):

    H = Σ_k (N_k / N) H_k,   N = Σ_k N_k,   H_k = (2/N_k) Σ_{t∈k} x_tᵀ x_t

which equals one pass over all windows up to fp rounding. The layer itself is submitted once
per layer and its future handed to every shard task, so a Dask runner ships its weights to
each worker once, not once per shard. No Prefect or Dask here: see `prunekit.steps`.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..forward.layerwise import HessianAccumulator, LayerwiseRunner
from ..models import Adapter
from ..steps import Step, call, submit

if TYPE_CHECKING:
    from ..forward.sources import LayerSource
    from ..storage.hessian_store import HessianStore


def collect_hessians(source: LayerSource, runner: LayerwiseRunner, store: HessianStore, dtype: torch.dtype,
                     step: Step = call, shards: int = 1) -> None:
    """Dense Hessians of every layer into the store, layer by layer; with shards > 1 each
    layer's accumulation is mapped over that many calibration shards (on the step's runner).

    Layers already complete in the store (from an interrupted run) are only run forward to
    produce the next layer's inputs.
    """
    adapter = runner.adapter
    groups = {adapter.group_key(g): list(g) for g in adapter.groups}
    desc = "hessians" if shards == 1 else f"hessians ({shards} shards)"
    for i in tqdm(range(len(runner)), desc=desc, unit="layer"):
        with source.layer(i):
            if store.has_layer(i):
                runner.advance(i)
            elif shards > 1:
                store.write_layer(i, sharded_hessians(runner, i, dtype, step, shards, advance=True), groups)
            else:
                step(_hessian_layer, runner, store, i, dtype, groups)


def _hessian_layer(runner: LayerwiseRunner, store: HessianStore, i: int, dtype: torch.dtype,
                   groups: dict[str, list[str]]) -> None:
    accumulators = runner.hessians(i, dtype, advance=True)
    store.write_layer(i, {k: (a.H, a.n_tokens) for k, a in accumulators.items()}, groups)


def send_layer(layer: nn.Module) -> nn.Module:
    """Identity task: its future carries the layer's weights to the workers once per layer."""
    return layer


def split(items: list, shards: int) -> list[list]:
    """Contiguous, near-equal shards (fewer when there are fewer items); order preserved."""
    shards = max(1, min(shards, len(items)))
    size, extra = divmod(len(items), shards)
    bounds = [k * size + min(k, extra) for k in range(shards + 1)]
    return [items[bounds[k]:bounds[k + 1]] for k in range(shards)]


@torch.no_grad()
def shard_hessians(layer: nn.Module, index: int, layer_kwargs: dict, inputs: list[torch.Tensor], adapter: Adapter,
                   dtype: torch.dtype) -> tuple[dict[str, tuple[torch.Tensor, int]], list[torch.Tensor]]:
    """Map: run one shard of windows through decoder layer `index`.

    Returns ({input key: (H_k, N_k)} over this shard's tokens, the shard's layer outputs).
    """
    # With a thread runner every shard task shares this very module: each hook keeps only the
    # forwards of the thread that registered it.
    me = threading.get_ident()

    def hook(acc: HessianAccumulator):
        return lambda _m, args, _out: acc.add(args[0]) if threading.get_ident() == me else None

    accumulators: dict[str, HessianAccumulator] = {}
    handles = []
    for group in adapter.groups:
        linear = layer.get_submodule(group[0])
        acc = HessianAccumulator(linear.in_features, dtype, linear.weight.device)
        accumulators[adapter.group_key(group)] = acc
        handles.append(linear.register_forward_hook(hook(acc)))
    try:
        outputs = []
        for x in inputs:
            out = layer(x, **layer_kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        for h in handles:
            h.remove()
    return {key: (acc.H, acc.n_tokens) for key, acc in accumulators.items()}, outputs


def reduce_hessians(parts: list[dict[str, tuple[torch.Tensor, int]]]) -> dict[str, tuple[torch.Tensor, int]]:
    """Reduce: count-weighted mean of the shards' partial Hessians, per input key."""
    return {key: HessianAccumulator.merge([part[key] for part in parts]) for key in parts[0]}


def sharded_hessians(runner: LayerwiseRunner, index: int, dtype: torch.dtype, step: Callable, shards: int,
                     advance: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """Hessians of layer `index` over all windows as map-reduce over `shards` shards of them.

    With advance=True the shards' outputs become the runner's inputs (dense Hessians only).
    """
    layer = submit(step, send_layer, runner.layers[index])
    futures = [submit(step, shard_hessians, layer, index, runner.layer_kwargs[index], chunk, runner.adapter, dtype)
               for chunk in split(runner.inputs, shards)]
    results = [f.result() for f in futures]
    if advance:
        runner.inputs = [x for _, outputs in results for x in outputs]
    return reduce_hessians([parts for parts, _ in results])
