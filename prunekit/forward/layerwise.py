"""Run calibration windows through a causal LM one decoder layer at a time.

The inputs of the first decoder layer, and the keyword arguments the model passes to each layer
(attention mask, rotary embeddings, ALiBi...), are captured by one pass of the base model with
every decoder layer swapped for a pass-through recorder: this costs the embeddings only and
works for every architecture in the adapter table without re-implementing its mask logic.
Then each layer is run on its own: hooks on the linears accumulate Hessians, the layer may be
modified (pruned, quantized), and its outputs become the next layer's inputs.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models import Adapter, decoder_layers


class HessianAccumulator:
    """Running mean H = (2/N) Σ_t x_tᵀ x_t over N tokens of one linear input (d_in × d_in).

    Accumulated in `dtype` (fp32 default, fp64 optional) as a running mean rather than a sum so
    the magnitude stays that of a single token's outer product however many tokens are seen.
    """

    def __init__(self, d_in: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.H = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        t = x.shape[0]
        total = self.n_tokens + t
        self.H.mul_(self.n_tokens / total)
        x = x * math.sqrt(2.0 / total)
        self.H.addmm_(x.T, x)
        self.n_tokens = total

    @staticmethod
    def merge(parts: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
        """Count-weighted mean of partial Hessians [(H_k, N_k)] — the reduce of a map-reduce."""
        total = sum(n for _, n in parts)
        H = sum(h.to(torch.float64) * (n / total) for h, n in parts)
        return H.to(parts[0][0].dtype), total


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its input and kwargs, returns the input as is."""

    def __init__(self, index: int, sink: dict, tuple_output: bool):
        super().__init__()
        self.index, self.sink, self.tuple_output = index, sink, tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.sink.setdefault("inputs", []).append(hidden_states)
        self.sink.setdefault("kwargs", {}).setdefault(self.index, kwargs)
        return (hidden_states,) if self.tuple_output else hidden_states


class LayerwiseRunner:
    """Holds the current activations of the calibration windows between decoder layers.

    Activations live on `device` as one (1, seqlen, hidden) tensor per window; the per-layer
    kwargs are captured once (every window has the same length and no padding, so they are
    shared by all windows).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, windows: torch.Tensor, device: torch.device):
        self.model, self.adapter, self.device = model, adapter, device
        self.layers = decoder_layers(model, adapter)
        self.inputs, self.layer_kwargs = self._capture(windows)

    @torch.no_grad()
    def _capture(self, windows: torch.Tensor) -> tuple[list[torch.Tensor], dict[int, dict]]:
        sink: dict = {}
        originals = list(self.layers)
        for i in range(len(originals)):
            self.layers[i] = _Recorder(i, sink, self.adapter.tuple_output)
        try:
            for row in windows:
                self.model.base_model(input_ids=row.unsqueeze(0).to(self.device), use_cache=False)
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        return sink["inputs"], sink["kwargs"]

    def __len__(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder layer `index` applied to one window's hidden states x (1, seqlen, hidden)."""
        out = self.layers[index](x, **self.layer_kwargs[index])
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """x through decoder layers start..stop−1 (default: to the last)."""
        for i in range(start, len(self) if stop is None else stop):
            x = self.forward(i, x)
        return x

    @contextmanager
    def _hessian_hooks(self, index: int, dtype: torch.dtype) -> Iterator[dict[str, HessianAccumulator]]:
        layer = self.layers[index]
        accumulators: dict[str, HessianAccumulator] = {}
        handles = []
        for group in self.adapter.groups:
            linear = layer.get_submodule(group[0])
            acc = HessianAccumulator(linear.in_features, dtype, self.device)
            accumulators[self.adapter.group_key(group)] = acc
            handles.append(linear.register_forward_hook(lambda _m, args, _out, acc=acc: acc.add(args[0])))
        try:
            yield accumulators
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def hessians(self, index: int, dtype: torch.dtype = torch.float32, advance: bool = False) -> dict[str, HessianAccumulator]:
        """Hessians of every distinct linear input of layer `index` over all windows.

        With advance=True the same pass also moves the activations past this layer (valid only
        when the layer will not be modified afterwards, as for dense Hessians).
        """
        with self._hessian_hooks(index, dtype) as accumulators:
            outputs = [self.forward(index, x) for x in self.inputs]
        if advance:
            self.inputs = outputs
        return accumulators

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Replace the activations by layer `index`'s outputs (after it was modified)."""
        for k, x in enumerate(self.inputs):  # in place: one window's activations more, not all of them
            self.inputs[k] = self.forward(index, x)
