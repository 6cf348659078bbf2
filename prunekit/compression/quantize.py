"""Quantization driver: sequential GPTQ over every decoder linear (Hessians from the
already-quantized prefix), then the LM head (with the embedding, when tied to it) by GPTQ on
the final hidden states of the quantized model or by plain rounding; exact zeros of a pruned
model stay zero."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import kernels
from ..config import QuantizeParams
from ..forward.head import OutputHead
from ..forward.layerwise import HessianAccumulator, LayerwiseRunner
from ..models import Adapter
from ..steps import Step, call

if TYPE_CHECKING:
    from ..forward.sources import LayerSource


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


def quantize_model(source: LayerSource, runner: LayerwiseRunner, params: QuantizeParams, *,
                   hessian_dtype: torch.dtype = torch.float32, step: Step = call,
                   grids: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, dict]:
    """Sequential GPTQ over all layers of `source` (runner: `source.runner(windows)`), then its
    LM head when params.head.bits is set. Returns the stats of every linear ('<layer>.<linear>')
    and of the head ("head").

    grids: when given, filled with {state-dict name of the weight: (scales, zeros)}, the grid of
    every decoder linear (code of W_ij in group g: round(W_ij / scales[i, g]) + zeros[i, g]) and,
    when params.head.bits is set, of the LM head (`quantize_head`, under `head_weight_name`).
    """
    stats: dict[str, dict] = {}
    for i in tqdm(range(len(source.layers)), desc="quantize", unit="layer"):
        with source.layer(i) as layer:
            hessians = {k: a.H for k, a in step(runner.hessians, i, hessian_dtype).items()}
            for key, s in step(quantize_layer, layer, i, source.adapter, hessians, params).items():
                grid = (s.pop("scales"), s.pop("zeros"))
                if grids is not None:
                    grids[f"{source.adapter.layers}.{key}.weight"] = grid
                stats[key] = s
            runner.advance(i)
    if params.head.bits is not None:
        name = head_weight_name(source)
        with source.head() as model:
            result = step(quantize_head, model, runner.inputs, params, hessian_dtype)
        source.update(name, result.weight)
        if grids is not None:
            grids[name] = (result.scales.cpu(), result.zeros.cpu())
        stats["head"] = {"weight": name, "loss": result.loss, "bits": params.head.bits, "method": params.head.method}
    return stats


def head_weight_name(source: LayerSource) -> str:
    """The name the LM head's weight is saved under: the embedding's when the two are tied (a
    tied head is saved once, under the embedding's name)."""
    head = source.model.get_output_embeddings()
    path = next(n for n, m in source.model.named_modules() if m is head)
    return source.saved_name(f"{path}.weight")


def quantize_head(model: nn.Module, hidden: list[torch.Tensor], params: QuantizeParams,
                  hessian_dtype: torch.dtype = torch.float32) -> kernels.KernelResult:
    """The LM head's weight on params.head.bits-bit grids (groupsize and sym as the linears', mse
    as theirs unless params.head.mse says otherwise):
    GPTQ with the Hessian of the head's inputs — the final norm(s) of `hidden`, the last decoder
    layer's outputs of the calibration windows — or plain rounding (`method: rtn`). The model is
    not modified. A tied embedding's lookups get the same weights, though GPTQ weighs only the
    head's outputs (benchmarks/head_quant.py measures the whole model)."""
    mse = params.mse if params.head.mse is None else params.head.mse
    spec = kernels.QuantSpec(bits=params.head.bits, sym=params.sym, groupsize=params.groupsize,
                             act_order=params.act_order, mse=mse)
    W = model.get_output_embeddings().weight.data
    if params.head.method == "rtn":
        return kernels.rtn(W, spec)
    head = OutputHead(model)
    acc = HessianAccumulator(W.shape[1], hessian_dtype, W.device)
    with torch.no_grad():
        for x in hidden:
            h = x[0]
            for norm in head.norms:
                h = norm(h)
            acc.add(h)
    return kernels.gptq(W, acc.H, spec, percdamp=params.percdamp, blocksize=params.blocksize, keep_zeros=True)
