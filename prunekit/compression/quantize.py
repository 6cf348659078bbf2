"""Quantization driver: sequential GPTQ over every decoder linear (Hessians from the
already-quantized prefix); exact zeros of a pruned model stay zero."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import kernels
from ..config import QuantizeParams
from ..forward.layerwise import LayerwiseRunner
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
    """Sequential GPTQ over all layers of `source` (runner: `source.runner(windows)`).

    grids: when given, filled with {'<layer>.<linear>': (scales, zeros)}, the grid of every
    linear (code of W_ij in group g: round(W_ij / scales[i, g]) + zeros[i, g]).
    """
    stats: dict[str, dict] = {}
    for i in tqdm(range(len(source.layers)), desc="quantize", unit="layer"):
        with source.layer(i) as layer:
            hessians = {k: a.H for k, a in step(runner.hessians, i, hessian_dtype).items()}
            for key, s in step(quantize_layer, layer, i, source.adapter, hessians, params).items():
                grid = (s.pop("scales"), s.pop("zeros"))
                if grids is not None:
                    grids[key] = grid
                stats[key] = s
            runner.advance(i)
    return stats
