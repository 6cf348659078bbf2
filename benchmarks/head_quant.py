"""What quantizing the LM head (and the embedding tied to it) costs in perplexity: 8 and 4 bits,
plain rounding (rtn) and GPTQ on the head's input Hessian, on the dense and the pruned model of
a pipeline run, each after GPTQ of its decoder linears as the quantize stage does.

Per base model the decoder linears are quantized once (`quantize_model` with the head kept in
float, params.yaml's quantize settings otherwise); every head variant then starts from that
model, replaces the head by `quantize_head`'s result and is evaluated on the same windows, so
the ratio to the float head is a paired comparison (bootstrap over windows, 95%). The texts are
not the test texts, so that `quantize.head` is chosen without looking at them: WikiText-2
validation, and the calibration documents of C4 (1000–1999; the calibration windows are drawn at
random from them, these are its first windows). `head_seconds` is the head's quantization time in
this run (on a shared machine, see the quantize stage's log instead).

    python benchmarks/head_quant.py                                  # after `prunekit run`
    python benchmarks/head_quant.py --windows 32 --json reports/head_quant.json
    python benchmarks/head_quant.py --variants 4:gptq:mse,4:gptq:minmax   # the head's grid search
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prunekit.compression.quantize import head_weight_name, quantize_head, quantize_model  # noqa: E402
from prunekit.config import load_params  # noqa: E402
from prunekit.data import bos_id, c4_text, eval_windows, load_text, read_calibration, tokenize  # noqa: E402
from prunekit.forward.scoring import perplexity  # noqa: E402
from prunekit.forward.sources import InMemoryModel  # noqa: E402
from prunekit.models import load_tokenizer  # noqa: E402
from prunekit.reporting.intervals import ppl_interval, ratio_interval  # noqa: E402
from stages.common import Paths  # noqa: E402

VARIANTS = [(None, None, None), (8, "rtn", None), (8, "gptq", None), (4, "rtn", None), (4, "gptq", None),
            (4, "gptq", False)]  # (bits, method, mse: None as quantize.mse); the first is the float head


def _variant(text: str) -> tuple:
    bits, method, *grid = text.split(":")
    return int(bits), method, {"": None, "mse": True, "minmax": False}[grid[0] if grid else ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows per text")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variants", type=lambda t: [_variant(v) for v in t.split(",")], default=None,
                    help="head variants besides the float head, e.g. 4:gptq,4:gptq:minmax (default: all)")
    ap.add_argument("--bases", default="dense,pruned", help="base models (default: dense,pruned)")
    args = ap.parse_args()
    variants = VARIANTS if args.variants is None else [VARIANTS[0], *args.variants]
    params = load_params(args.params)
    seqlen = params.evaluate.seqlen
    paths = Paths.of(params, ROOT)
    bases = {name: {"dense": paths.model, "pruned": paths.pruned}[name] for name in args.bases.split(",")}
    tokenizer = load_tokenizer(str(bases["dense"]))
    bos = bos_id(tokenizer)
    texts = {"wikitext2-valid": load_text("wikitext2-valid"), "c4-calibration-docs": c4_text(tuple(params.calibration.c4_docs))}
    windows = {t: eval_windows(tokenize(text, tokenizer), seqlen, bos, args.windows) for t, text in texts.items()}
    calib, _ = read_calibration(paths.calib)
    no_head = params.quantize.model_copy(update={"head": params.quantize.head.model_copy(update={"bits": None})})
    rows = []
    for base, folder in bases.items():
        source = InMemoryModel.load(folder)
        runner = source.runner(calib)
        quantize_model(source, runner, no_head)
        head = head_weight_name(source)
        original = source.model.state_dict(keep_vars=True)[head].data.clone()
        reference = None
        for bits, method, mse in variants:
            if bits is not None:
                q = params.quantize.model_copy(update={"head": params.quantize.head.model_copy(
                    update={"bits": bits, "method": method, "mse": mse})})
                started = time.perf_counter()
                result = quantize_head(source.model, runner.inputs, q)
                seconds = time.perf_counter() - started
                source.update(head, result.weight)
            scores = {t: perplexity(source, w, desc=f"{base} {bits} {method}") for t, w in windows.items()}
            source.update(head, original)
            reference = reference or scores
            row = {"base": base, "head_bits": bits, "method": method, "head_seconds": seconds if bits else None,
                   "head_mse": None if bits is None else params.quantize.mse if mse is None else mse}
            for t, r in scores.items():
                ratio = ratio_interval(r["window_nll"], reference[t]["window_nll"])
                row[t] = {"ppl": r["ppl"], "ppl_ci95": list(ppl_interval(r["window_nll"])),
                          "vs_float_head": list(ratio), "window_nll": r["window_nll"]}
            rows.append(row)
            grid = "" if bits is None else "mse" if row["head_mse"] else "minmax"
            print(f"{base:6s} head {str(bits or 'float'):5s} {method or '':4s} {grid:6s}  " + "  ".join(
                f"{t} {row[t]['ppl']:.2f} ({row[t]['vs_float_head'][0]:.3f}x [{row[t]['vs_float_head'][1]:.3f}, "
                f"{row[t]['vs_float_head'][2]:.3f}])" for t in windows), flush=True)
    if args.json:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "protocol": f"{args.windows} windows of {seqlen} tokens per text, BOS first; calibration "
                        f"{len(calib)} x {calib.shape[1]} tokens from {params.calibration.source}",
            "quantize": params.quantize.model_dump(mode="json"), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
