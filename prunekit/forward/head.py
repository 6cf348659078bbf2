"""The output head: final norm(s) + LM head (+ logit soft-capping), scored in chunks of tokens.

A 262k-entry vocabulary makes a full (seqlen × vocab) fp32 logit tensor per window the largest
object of an evaluation (2 GiB at 2048 tokens); the head computes the logits of at most
`chunk_tokens` positions at a time and reduces them at once.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models import adapter_for


class OutputHead:
    """Summed next-token NLL (or KL from a reference) of one window from its last hidden states."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024):
        self.norms: list[nn.Module] = []
        for path in adapter_for(model).final:
            module = model
            for part in path.split("."):
                module = getattr(module, part, None)
            if module is not None:  # a final module the checkpoint lacks (OPT's project_out)
                self.norms.append(module)
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.chunk_tokens = chunk_tokens

    def _logits(self, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """fp32 logits of positions 0..seqlen−2 of one window (hidden (1, seqlen, d)), in chunks."""
        h = hidden[0, :-1]
        for module in self.norms:
            h = module(h)
        for start in range(0, h.shape[0], self.chunk_tokens):
            logits = self.lm_head(h[start : start + self.chunk_tokens]).float()
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            yield start, logits

    @torch.no_grad()
    def nll_sum(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Σ_t −log p(tokens[t+1] | position t) over one window; hidden (1, seqlen, d), tokens (seqlen,)."""
        targets = tokens[1:]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start, logits in self._logits(hidden):
            total += F.cross_entropy(logits, targets[start : start + self.chunk_tokens], reduction="sum").double()
        return total

    @torch.no_grad()
    def kl_sum(self, hidden: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Σ_t KL(p_reference(· | t) ‖ p(· | t)) over the same positions as `nll_sum`, where
        `reference` is another model's (e.g. the dense one's) last hidden states for the window."""
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for (_, logits), (_, ref) in zip(self._logits(hidden), self._logits(reference)):
            total += F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                              reduction="sum").double()
        return total
