"""Perplexity under the project's protocol: the one perplexity function."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import bos_id, eval_windows, load_text, tokenize


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl") -> dict:
    """exp(mean NLL) over every predicted token of the windows (n, seqlen).

    Each window is scored on its own (no state carried between windows); position t predicts
    token t+1, so a window contributes seqlen - 1 predictions.
    """
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}


def evaluate_model(model: nn.Module, tokenizer, datasets: tuple[str, ...], seqlen: int,
                   max_windows: int | None, batch_size: int = 1) -> dict[str, dict]:
    """Perplexity on each dataset ('wikitext2', 'c4' = C4 documents 0–999, or a text file)."""
    bos = bos_id(tokenizer)
    results = {}
    for name in datasets:
        windows = eval_windows(tokenize(load_text(name), tokenizer), seqlen, bos, max_windows)
        results[name] = perplexity(model, windows, batch_size, desc=f"ppl {name}")
    return results


def protocol(seqlen: int, max_windows: int | None, bos: bool) -> str:
    """One line naming the protocol, so every number in a report says how it was measured."""
    windows = "all windows" if max_windows is None else f"first {max_windows} windows only (reduced protocol)"
    return (f"non-overlapping {seqlen}-token windows, {windows}, "
            f"{'BOS first in every window, ' if bos else ''}ppl = exp(mean NLL over predicted tokens)")
