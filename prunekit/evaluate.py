"""Perplexity under the project's protocol: the one perplexity function.

The model is either held in memory (one forward pass of the whole model per batch of windows)
or streamed from its safetensors files one decoder layer at a time (`streamed_nll`, for models
larger than memory); both score the same predictions and agree to float rounding.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import bos_id, eval_windows, load_text, tokenize
from .sensitivity import OutputHead

if TYPE_CHECKING:
    from .streaming import LayerStream


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl",
               stream: LayerStream | None = None) -> dict:
    """exp(mean NLL) over every predicted token of the windows (n, seqlen).

    Each window is scored on its own (no state carried between windows); position t predicts
    token t+1, so a window contributes seqlen - 1 predictions. With `stream` (model is then
    its meta-device skeleton) the model is read one decoder layer at a time (`streamed_nll`)
    and batch_size is not used.
    """
    if stream is not None:
        nll = streamed_nll(stream, windows, desc)
    else:
        nll = 0.0
        device = next(model.parameters()).device
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
    count = windows.shape[0] * (windows.shape[1] - 1)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}


@torch.no_grad()
def streamed_nll(stream: LayerStream, windows: torch.Tensor, desc: str = "ppl") -> float:
    """Σ over the windows (n, seqlen) of −log p(token t+1 | tokens ≤ t), reading the model
    one decoder layer at a time.

    The embeddings are loaded to compute every window's input to layer 0 (`LayerStream.runner`);
    each decoder layer is then read once and applied to all windows, one window at a time;
    last, the final norm(s) and the LM head are loaded (`LayerStream.head`) and `OutputHead`
    scores each window in chunks of tokens (with the model's logit soft-capping, if any).

    Memory bound, besides the largest of {one decoder layer, the embedding, norm + head}: the
    hidden states of all windows, n · seqlen · hidden_size elements of the model dtype on
    `stream.device` (e.g. 4 MiB per 512-token window at hidden 2048, fp32), plus one window's
    intermediates inside a layer and one chunk of fp32 logits (1024 × vocab). Evaluate fewer
    windows per call to lower it; every call reads the whole model once.
    """
    runner = stream.runner(windows)
    for i in tqdm(range(len(runner)), desc=f"{desc} (streamed)", unit="layer", leave=False):
        with stream.layer(i):
            runner.advance(i)
    tokens = windows.to(stream.device)
    total = torch.zeros((), dtype=torch.float64, device=stream.device)
    with stream.head() as model:
        head = OutputHead(model)
        for x, row in zip(runner.inputs, tokens):
            total += head.nll_sum(x, row)
    return float(total)


def evaluate_model(model: nn.Module, tokenizer, datasets: tuple[str, ...], seqlen: int,
                   max_windows: int | None, batch_size: int = 1, stream: LayerStream | None = None) -> dict[str, dict]:
    """Perplexity on each dataset ('wikitext2', 'c4' = C4 documents 0–999, or a text file);
    with `stream`, one streamed pass over the model per dataset."""
    bos = bos_id(tokenizer)
    results = {}
    for name in datasets:
        windows = eval_windows(tokenize(load_text(name), tokenizer), seqlen, bos, max_windows)
        results[name] = perplexity(model, windows, batch_size, desc=f"ppl {name}", stream=stream)
    return results


def protocol(seqlen: int, max_windows: int | None, bos: bool) -> str:
    """One line naming the protocol, so every number in a report says how it was measured."""
    windows = "all windows" if max_windows is None else f"first {max_windows} windows only (reduced protocol)"
    return (f"non-overlapping {seqlen}-token windows, {windows}, "
            f"{'BOS first in every window, ' if bos else ''}ppl = exp(mean NLL over predicted tokens)")
