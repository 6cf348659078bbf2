"""The one scoring path: per-window NLL (or KL) of windows run through decoder layers and the
chunked output head, and perplexity under the project's protocol.

Evaluation (in memory or streamed), the sensitivity measurement and the search's fitness all
call `window_scores`; nothing else computes a next-token loss.

Protocol: non-overlapping windows of seqlen tokens (BOS first in every window for tokenizers
that add one); each window is scored on its own; position t predicts token t+1, so a window
contributes seqlen − 1 predictions; ppl = exp(mean NLL over every predicted token).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..config import NonFiniteError
from ..data import eval_windows
from .head import OutputHead
from .layerwise import LayerwiseRunner

if TYPE_CHECKING:
    from .sources import LayerSource


@torch.no_grad()
def window_scores(runner: LayerwiseRunner, tokens: torch.Tensor, head: OutputHead, *, start: int = 0,
                  inputs: list[torch.Tensor] | None = None, reference: list[torch.Tensor] | None = None,
                  record: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
    """Per-window summed loss, float64 (n,), of the windows `tokens` (n, seqlen).

    Each window's hidden states `inputs[w]` (default `runner.inputs`: the inputs of layer
    `start`) run through decoder layers start..L−1, then the head scores them: Σ_t −log p(token
    t+1 | t), or with `reference` (last hidden states of another model, one per window)
    Σ_t KL(p_reference ‖ p). record: L+1 lists; record[i] gets each window's input of layer i
    (i ≥ start) and record[L] its last hidden states, for callers that re-score from a layer on.
    """
    inputs = runner.inputs if inputs is None else inputs
    scores = torch.zeros(len(tokens), dtype=torch.float64, device=tokens.device)
    for w, (x, row) in enumerate(zip(inputs, tokens)):
        for i in range(start, len(runner)):
            if record is not None:
                record[i].append(x)
            x = runner.forward(i, x)
        if record is not None:
            record[len(runner)].append(x)
        scores[w] = head.nll_sum(x, row) if reference is None else head.kl_sum(x, reference[w])
    return scores


@torch.no_grad()
def require_finite(value: float, what: str, runner: LayerwiseRunner, inputs: list[torch.Tensor], start: int = 0) -> float:
    """`value` if finite; else NonFiniteError naming the first decoder layer (from `start`, with
    the weights the runner's layers hold now) whose output is not finite on `inputs`, or the
    output head when every layer's output is finite."""
    if math.isfinite(value):
        return value
    for w, x in enumerate(inputs):
        for i in range(start, len(runner)):
            x = runner.forward(i, x)
            if not all(math.isfinite(float(v)) for v in torch.aminmax(x.float())):
                raise NonFiniteError(f"{what} is {value}: decoder layer {i}'s output is not finite (window {w}); "
                                     f"check that layer's weights and the model's inputs")
    raise NonFiniteError(f"{what} is {value}: every decoder layer's output is finite, the output head's "
                         f"(final norm, LM head) is not; check their weights")


@torch.no_grad()
def perplexity(source: LayerSource, windows: torch.Tensor, desc: str = "ppl") -> dict:
    """exp(mean NLL) over every predicted token of the windows (n, seqlen), with the mean NLL
    of each window (`window_nll`).

    The windows go through the model one decoder layer at a time (a streamed source reads
    each layer once), then through the chunked output head. Memory, besides the model (or one
    layer of it): the hidden states of all windows, n · seqlen · hidden elements, and one chunk
    of fp32 logits (1024 × vocab); score fewer windows per call to lower it.
    """
    runner = source.runner(windows)
    for i in tqdm(range(len(runner)), desc=desc, unit="layer", leave=False):
        with source.layer(i):
            runner.advance(i)
    tokens = windows.to(source.device)
    with source.head() as model:
        sums = window_scores(runner, tokens, OutputHead(model), start=len(runner))
    predicted = windows.shape[1] - 1
    nll = float(sums.sum()) / (len(windows) * predicted)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": len(windows) * predicted, "windows": len(windows),
            "window_nll": (sums / predicted).tolist()}


def evaluate_model(source: LayerSource, streams: dict[str, torch.Tensor], bos: int | None, seqlen: int,
                   max_windows: int | None) -> dict[str, dict]:
    """Perplexity on each tokenized text {name: ids} ('wikitext2', 'c4' = C4 documents 0–999, or a
    text file, as the calibrate stage tokenized them), BOS `bos` first in every window."""
    return {name: perplexity(source, eval_windows(ids, seqlen, bos, max_windows), desc=f"ppl {name}")
            for name, ids in streams.items()}


def protocol(seqlen: int, max_windows: int | None, bos: bool) -> str:
    """One line naming the protocol, so every number in a report says how it was measured."""
    windows = "all windows" if max_windows is None else f"first {max_windows} windows only (reduced protocol)"
    return (f"non-overlapping {seqlen}-token windows, {windows}, "
            f"{'BOS first in every window, ' if bos else ''}ppl = exp(mean NLL over predicted tokens)")
