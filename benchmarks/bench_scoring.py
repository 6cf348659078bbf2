"""Evaluation cost: the one scoring path (windows run layer by layer, chunked output head)
against the model's own full forward (full-vocabulary logits), on the same windows.

    python benchmarks/bench_scoring.py                          # embedded Gemma-3-270M, 4 x 256 tokens
    python benchmarks/bench_scoring.py --seqlen 2048 --windows 8

Prints both times, their ratio, both NLLs and their relative difference, measured in one run.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from prunekit.data import bos_id, eval_windows, load_text, tokenize
from prunekit.forward.scoring import perplexity
from prunekit.forward.sources import InMemoryModel
from prunekit.models import load_model, load_tokenizer, pick_device


@torch.no_grad()
def full_forward_nll(model, windows: torch.Tensor) -> float:
    total = 0.0
    for row in windows:
        logits = model(input_ids=row.unsqueeze(0).to(model.device), use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, row[1:].to(model.device), reduction="sum").item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m")
    parser.add_argument("--text", default="wikitext2")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, device=device), load_tokenizer(args.model)
    windows = eval_windows(tokenize(load_text(args.text), tokenizer), args.seqlen, bos_id(tokenizer), args.windows)
    source = InMemoryModel(model, device)
    times: dict[str, list[float]] = {"full forward": [], "scoring path": []}
    for _ in range(args.repeats):  # interleaved, so a slow phase of the machine hits both
        t = time.perf_counter()
        reference = full_forward_nll(model, windows)
        times["full forward"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ours = perplexity(source, windows)["nll"]
        times["scoring path"].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    print(f"{args.model}, {len(windows)} windows x {args.seqlen} tokens on {device} ({torch.get_num_threads()} threads), "
          f"best of {args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:13s} {seconds:7.2f} s")
    print(f"  ratio full forward / scoring path: {best['full forward'] / best['scoring path']:.2f}x")
    print(f"  NLL {reference:.6f} vs {ours:.6f} (relative difference {abs(ours - reference) / reference:.1e})")


if __name__ == "__main__":
    main()
