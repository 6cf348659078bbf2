"""Full-protocol quality numbers on Gemma-3-270M (shared DESIGN notes), on the GPU or CPU.

Protocol: calibration nsamples x seqlen tokens drawn (seed 0) from C4 documents 1000-1999,
sequential pruning unless a config says parallel, evaluation on every non-overlapping
seqlen-token window of WikiText-2 test and C4 documents 0-999, BOS first in every window.

Tokenize here (the tokenizer must be the one the project pins; another transformers release
splits this vocabulary differently), run anywhere:

    python benchmarks/full_protocol.py prepare --out .dev/tok/tokens.pt
    python benchmarks/full_protocol.py run --model MODEL --tokens .dev/tok/tokens.pt \\
        --configs dense,sgpt50,sgpt70,sgpt24,gptq4,sgpt70+q4 --out results.json

MODEL is a model source as params.yaml takes it (a .gguf file, a folder, embedded:gemma3-270m).
Each config starts from the dense weights; the dense Hessians are computed once and shared by
the allocators that need estimates, by parallel mode and by the sensitivity measurement.

Tables of result files: python benchmarks/full_protocol.py table results.json [more.json ...]

Sensitivity configs (ranked*, measured*) measure output-level curves once per unit kind
(block / half) on the first --sens-windows calibration windows and share them; the curves are
also written next to --out (<out>.sens-<unit>-n<nsamples>-w<windows>.csv) and reused by a
later run with the same calibration, so configs can be split over several invocations:

    python benchmarks/full_protocol.py run --tokens .dev/tok/tokens.pt \\
        --configs ranked70,measured70,measured80,ranked80,measured70h --out sens.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from prunekit.allocation.estimate import estimate_layer
from prunekit.allocation.sensitivity import allocate_measured, allocate_ranked, block_sensitivity
from prunekit.compression.prune import prune_model
from prunekit.compression.quantize import quantize_model
from prunekit.config import PruneParams, QuantizeParams, ScheduleParams
from prunekit.data import bos_id, calibration_windows, eval_windows, load_text, tokenize
from prunekit.forward.layerwise import LayerwiseRunner
from prunekit.forward.scoring import perplexity
from prunekit.forward.sources import InMemoryModel
from prunekit.kernels import QuantSpec
from prunekit.models import adapter_for, decoder_layers, layer_linears, load_model, load_tokenizer

log = logging.getLogger("full_protocol")

SENS_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)
SENS_RANKED = {"unit": "block", "grid": SENS_GRID, "at": 0.8, "spread": 0.2, "lo": 0.4, "hi": 0.95}
SENS_MEASURED = {"unit": "block", "grid": SENS_GRID, "lo": 0.4, "hi": 0.95}

# name -> (method, target, structure, allocator, mode, quant, overrides); quant: None, bits,
# (bits, groupsize) or {QuantizeParams fields, "joint": True for one pass with the pruning}.
# allocator uniform/kmeans/owl: prunekit.schedule.allocate, overrides go to ScheduleParams.
# allocator ranked/measured: prunekit.sensitivity on output-level curves measured on the first
# --sens-windows calibration windows; overrides: unit, grid, lo, hi (+ at, spread for ranked).
CONFIGS = {
    "dense": None,
    "gptq4": ("none", 0.0, "unstructured", "uniform", "sequential", 4, {}),
    "sgpt60": ("sparsegpt", 0.6, "unstructured", "uniform", "sequential", None, {}),
    "owl60": ("sparsegpt", 0.6, "unstructured", "owl", "sequential", None, {}),
    "kmeans60": ("sparsegpt", 0.6, "unstructured", "kmeans", "sequential", None, {"k": 3, "spread": 0.05}),
    "owl80": ("sparsegpt", 0.8, "unstructured", "owl", "sequential", None, {}),
    "kmeans80": ("sparsegpt", 0.8, "unstructured", "kmeans", "sequential", None, {"k": 3, "spread": 0.05}),
    "sgpt50": ("sparsegpt", 0.5, "unstructured", "uniform", "sequential", None, {}),
    "sgpt70": ("sparsegpt", 0.7, "unstructured", "uniform", "sequential", None, {}),
    "sgpt80": ("sparsegpt", 0.8, "unstructured", "uniform", "sequential", None, {}),
    "sgpt24": ("sparsegpt", 0.5, "2:4", "uniform", "sequential", None, {}),
    "sgpt70par": ("sparsegpt", 0.7, "unstructured", "uniform", "parallel", None, {}),
    "sgpt70+q4": ("sparsegpt", 0.7, "unstructured", "uniform", "sequential", 4, {}),
    "gptq4g128": ("none", 0.0, "unstructured", "uniform", "sequential", (4, 128), {}),
    "sgpt70+q4g128": ("sparsegpt", 0.7, "unstructured", "uniform", "sequential", (4, 128), {}),
    "sgpt70+q4g128mse": ("sparsegpt", 0.7, "unstructured", "uniform", "sequential",
                         {"bits": 4, "groupsize": 128, "mse": True}, {}),
    "sgpt70+q4g128ao": ("sparsegpt", 0.7, "unstructured", "uniform", "sequential",
                        {"bits": 4, "groupsize": 128, "mse": True, "act_order": True}, {}),
    "sgpt70q4g128joint": ("sparsegpt", 0.7, "unstructured", "uniform", "sequential",
                          {"bits": 4, "groupsize": 128, "joint": True}, {}),
    "sgpt70q4g128jointmse": ("sparsegpt", 0.7, "unstructured", "uniform", "sequential",
                             {"bits": 4, "groupsize": 128, "mse": True, "joint": True}, {}),
    # the quantize stage's settings (mse, act order, static groups of 128), asymmetric and symmetric grid
    "gptq4g128ao": ("none", 0.0, "unstructured", "uniform", "sequential",
                    {"bits": 4, "groupsize": 128, "mse": True, "act_order": True}, {}),
    "gptq4g128aosym": ("none", 0.0, "unstructured", "uniform", "sequential",
                       {"bits": 4, "groupsize": 128, "mse": True, "act_order": True, "sym": True}, {}),
    "sgpt70+q4g128aosym": ("sparsegpt", 0.7, "unstructured", "uniform", "sequential",
                           {"bits": 4, "groupsize": 128, "mse": True, "act_order": True, "sym": True}, {}),
    "gptq4g128mse": ("none", 0.0, "unstructured", "uniform", "sequential", {"bits": 4, "groupsize": 128, "mse": True}, {}),
    "wanda70": ("wanda", 0.7, "unstructured", "uniform", "sequential", None, {}),
    "owl70": ("sparsegpt", 0.7, "unstructured", "owl", "sequential", None, {}),
    "kmeans70": ("sparsegpt", 0.7, "unstructured", "kmeans", "sequential", None, {"k": 3, "spread": 0.05}),
    "ranked70": ("sparsegpt", 0.7, "unstructured", "ranked", "sequential", None, SENS_RANKED),
    "ranked60": ("sparsegpt", 0.6, "unstructured", "ranked", "sequential", None, SENS_RANKED),
    "ranked80": ("sparsegpt", 0.8, "unstructured", "ranked", "sequential", None, SENS_RANKED),
    "measured70": ("sparsegpt", 0.7, "unstructured", "measured", "sequential", None, SENS_MEASURED),
    "measured70h": ("sparsegpt", 0.7, "unstructured", "measured", "sequential", None, {**SENS_MEASURED, "unit": "half"}),
    "measured80": ("sparsegpt", 0.8, "unstructured", "measured", "sequential", None, SENS_MEASURED),
}
SENSITIVITY_ALLOCATORS = ("ranked", "measured")
# search: prunekit.search on the first fit_windows calibration windows (screen_windows of them
# screen the children); levels target ± k·step within [lo, hi].
SEARCH = {"step": 0.05, "lo": 0.4, "hi": 0.95, "fit_windows": 8, "generations": 150, "offspring": 16,
          "survivors": 4, "max_mutations": 3, "screen_windows": 2, "unit": "block", "seed": 0}
CONFIGS.update({
    "search70": ("sparsegpt", 0.7, "unstructured", "search", "sequential", None, SEARCH),
    "search80": ("sparsegpt", 0.8, "unstructured", "search", "sequential", None, SEARCH),
    "search60": ("sparsegpt", 0.6, "unstructured", "search", "sequential", None, SEARCH),
    "search70s": ("sparsegpt", 0.7, "unstructured", "search", "sequential", None,
                  {**SEARCH, "database": "sequential", "generations": 80}),
    "search70sr": ("sparsegpt", 0.7, "unstructured", "search", "sequential", None,
                   {**SEARCH, "database": "sequential", "generations": 60, "init": "ranked"}),
    "search70r": ("sparsegpt", 0.7, "unstructured", "search", "sequential", None,
                  {**SEARCH, "generations": 60, "init": "ranked"}),
})
# The best recipe so far: per-linear units, sequential database, ranked start; NLL or KL fitness.
SEARCH_LINEAR = {**SEARCH, "database": "sequential", "init": "ranked", "unit": "linear", "generations": 150}
CONFIGS.update({
    f"search{round(100 * t)}l{kind}": ("sparsegpt", t, "unstructured", "search", "sequential", None,
                                       {**SEARCH_LINEAR, "fitness": fitness})
    for t in (0.6, 0.7, 0.8) for kind, fitness in (("", "nll"), ("kl", "kl"))
})
# More scoring windows against overfitting the 8 (fit 32, screen 4); the database along the
# (snapped) start schedule; then a round with the database rebuilt along the schedule found.
SEARCH_W32 = {**SEARCH_LINEAR, "fit_windows": 32, "screen_windows": 4, "survivors": 2, "generations": 60,
              "along": "init", "rounds": [30]}
CONFIGS.update({f"search{round(100 * t)}lw32": ("sparsegpt", t, "unstructured", "search", "sequential", None, SEARCH_W32)
                for t in (0.6, 0.7, 0.8)})
# WikiText-2 validation is the text for choosing hyper-parameters; test and C4 only report.
EVAL_TEXTS = ("wikitext2", "c4", "wikitext2-valid")


# What a config's quantization means unless it says otherwise (the names say "mse", "ao", "sym"),
# fixed here so that a config keeps its meaning when QuantizeParams' defaults change.
QUANT_BASE = {"sym": False, "act_order": False, "mse": False}


def quant_fields(quant) -> dict:
    if not quant:
        return {}
    if isinstance(quant, dict):
        return {**QUANT_BASE, **quant}
    bits, groupsize = quant if isinstance(quant, tuple) else (quant, None)
    return {**QUANT_BASE, "bits": bits, "groupsize": groupsize}


def prepare(args) -> None:
    tokenizer = load_tokenizer(args.source)
    bos = bos_id(tokenizer)
    calib = calibration_windows(tokenize(load_text("c4", (1000, 2000)), tokenizer), args.nsamples, args.seqlen, 0, bos)
    evals = {name: eval_windows(tokenize(load_text(name), tokenizer), args.seqlen, bos) for name in EVAL_TEXTS}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"calib": calib.to(torch.int32), **{k: v.to(torch.int32) for k, v in evals.items()},
                "seqlen": args.seqlen, "bos": bos}, args.out)
    print(f"saved {args.out}: calib {tuple(calib.shape)}, " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in evals.items()))


def dense_hessians(model, adapter, windows, device) -> dict[int, dict[str, torch.Tensor]]:
    runner = LayerwiseRunner(model, adapter, windows, device)
    return {i: {k: a.H for k, a in runner.hessians(i, advance=True).items()} for i in range(len(runner))}


def estimates(model, adapter, hessians, grid=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)):
    import pandas as pd

    rows = []
    for i, layer in enumerate(decoder_layers(model, adapter)):
        weights = {n: lin.weight.data for n, lin in layer_linears(layer, adapter).items()}
        rows += estimate_layer(i, weights, adapter.groups, hessians[i], grid, 0.01, 5.0)
    return pd.DataFrame(rows)


def sensitivity_curves(model, adapter, calib, hessians, overrides, args, device, cache: dict):
    """Curves for (unit, grid): from this run's cache, else from a CSV next to --out written by
    an earlier run with the same calibration, else measured (and saved). Returns (curves, seconds)."""
    import pandas as pd

    unit, grid = overrides["unit"], tuple(overrides["grid"])
    if (unit, grid) in cache:
        return cache[unit, grid], 0.0
    out = Path(args.out)
    csv = out.with_name(f"{out.stem}.sens-{unit}-n{len(calib)}-w{args.sens_windows}.csv")
    t = time.time()
    curves = pd.read_csv(csv) if csv.exists() else None
    if curves is not None and set(curves["sparsity"]) == set(grid):
        log.info("sensitivity (%s) reused from %s", unit, csv)
    else:
        curves = block_sensitivity(model, adapter, calib[: args.sens_windows], hessians, grid, unit=unit, device=device)
        curves.to_csv(csv, index=False)
        log.info("sensitivity (%s) on %d windows measured in %.1f s, saved to %s",
                 unit, args.sens_windows, time.time() - t, csv)
    cache[unit, grid] = curves
    return curves, time.time() - t


def sensitivity_sparsity(curves, allocator, target, overrides) -> dict[str, float]:
    if allocator == "ranked":
        return allocate_ranked(curves, target, overrides["spread"], overrides["at"], overrides["lo"], overrides["hi"])
    return allocate_measured(curves, target, overrides["lo"], overrides["hi"])


def searched_sparsity(model, adapter, calib, hessians, target, o, device, args, sens_cache: dict, results: dict):
    """Schedule from prunekit.search.search_schedule: database (along uniform pruning, or with
    o['along'] == 'init' along the start schedule), search, then o['rounds'] (generations each)
    with the database rebuilt along the schedule found so far."""
    from prunekit.allocation.search import search_schedule
    from prunekit.config import SearchParams

    init = None
    if args.continue_from:  # another search's result (in --out), continued with this config's seed
        init = results[args.continue_from]["search"]["sparsity"]
        log.info("search continues from %s (calibration fitness %.4f)", args.continue_from,
                 results[args.continue_from]["search"]["fitness"])
    elif o.get("init") == "ranked":
        curves, _ = sensitivity_curves(model, adapter, calib, hessians, SENS_RANKED, args, device, sens_cache)
        init = sensitivity_sparsity(curves, "ranked", target, SENS_RANKED)
    o = {**o, **{k: v for k, v in (("seed", args.seed), ("generations", args.generations)) if v is not None}}
    spec = SearchParams(**{k: o[k] for k in ("generations", "offspring", "survivors", "max_mutations", "screen_windows",
                                             "unit", "seed", "step", "fit_windows")},
                        fitness=o.get("fitness", "nll"), database=o.get("database", "dense"),
                        rounds=tuple(o.get("rounds", ())), span=0.999)  # levels bounded by lo and hi alone
    result = search_schedule(model, adapter, calib, target, spec, lo=o["lo"], hi=o["hi"], init=init,
                             along_init=o.get("along") == "init", hessian_of=hessians.__getitem__, device=device)
    info = {"database_s": sum(r["database_s"] for r in result.rounds), "search_s": sum(r["search_s"] for r in result.rounds),
            "evaluations": result.evaluations, "uniform_fitness": result.uniform_fitness, "fitness": result.fitness,
            "rounds": result.rounds, "unit_sparsity": result.unit_sparsity,
            "history": result.history["fitness"].round(5).tolist(), "sparsity": result.sparsity,
            "spec": {**o, "continued_from": args.continue_from}}
    log.info("search: %s", {k: v for k, v in info.items() if k not in ("history", "sparsity", "unit_sparsity")})
    return result.sparsity, info


class _DenseStore:
    """The in-memory dense Hessians, read like the zarr store (parallel mode)."""

    def __init__(self, hessians):
        self.hessians = hessians

    def read_layer(self, i, device):
        return {k: (h.to(device), 0) for k, h in self.hessians[i].items()}


def run(args) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data = torch.load(args.tokens)
    calib = data["calib"].long()
    if args.nsamples:
        calib = calib[: args.nsamples]
    evals = {k: data[k].long()[: args.max_windows] for k in EVAL_TEXTS if k in data}
    t0 = time.time()
    model = load_model(args.model, device=device)
    adapter = adapter_for(model)
    source = InMemoryModel(model, device)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log.info("loaded %s in %.1f s on %s", args.model, time.time() - t0, device)
    hessians = est = None
    sens_cache: dict = {}
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for name in args.configs.split(","):
        model.load_state_dict(dense_state)
        t = time.time()
        spec = CONFIGS[name]
        info: dict = {"config": name}
        if spec is not None:
            method, target, structure, allocator, mode, bits, overrides = spec
            q = quant_fields(bits)
            joint = q.pop("joint", False)
            if method != "none":
                keys = [f"{i}.{n}" for i in range(len(decoder_layers(model, adapter))) for n in adapter.linears]
                if (allocator != "uniform" or mode == "parallel") and hessians is None:
                    hessians = dense_hessians(model, adapter, calib, device)
                if allocator in ("kmeans", "owl") and est is None:
                    est = estimates(model, adapter, hessians)
                if allocator == "uniform":
                    sparsity = dict.fromkeys(keys, target)
                elif allocator == "search":
                    sparsity, info["search"] = searched_sparsity(model, adapter, calib, hessians, target, overrides,
                                                                 device, args, sens_cache, results)
                elif allocator in SENSITIVITY_ALLOCATORS:
                    curves, info["sensitivity_s"] = sensitivity_curves(model, adapter, calib, hessians, overrides,
                                                                       args, device, sens_cache)
                    sparsity = sensitivity_sparsity(curves, allocator, target, overrides)
                    info["unit_sparsity"] = {u: round(sparsity[f"{layer}.{linears.split(',')[0]}"], 4)
                                             for u, layer, linears in curves.drop_duplicates("unit")[
                                                 ["unit", "layer", "linears"]].itertuples(index=False)}
                    log.info("%s allocation: %s", name, info["unit_sparsity"])
                else:
                    from prunekit.allocation.schedule import allocate

                    table = allocate(est, target, ScheduleParams(allocator=allocator, **overrides))
                    sparsity = dict(zip(table["key"], table["sparsity"]))
                params = PruneParams(method=method, sparsity=target, structure=structure, mode=mode)
                if mode == "sequential":
                    quant = QuantSpec(**{k: v for k, v in q.items() if k != "act_order"}) if joint else None
                    stats = prune_model(source, sparsity, params, quant=quant, runner=source.runner(calib))
                else:
                    stats = prune_model(source, sparsity, params, store=_DenseStore(hessians))
                n = sum(s["params"] for s in stats.values())
                info["sparsity"] = sum(s["sparsity"] * s["params"] for s in stats.values()) / n
            if bits and not joint:
                quantize_model(source, source.runner(calib), QuantizeParams(**q))
            info.update(q)
        info["compress_s"] = time.time() - t
        for dataset, windows in evals.items():
            info[dataset] = perplexity(source, windows, desc=dataset)["ppl"]
        info["total_s"] = time.time() - t
        results[args.save_as or name] = info
        log.info("%s", json.dumps(info))
        Path(args.out).write_text(json.dumps(results, indent=2))
    for name, info in results.items():
        valid = f"  valid {info['wikitext2-valid']:9.2f}" if "wikitext2-valid" in info else ""
        print(f"{name:12s} wikitext2 {info['wikitext2']:9.2f}  c4 {info['c4']:9.2f}{valid}  "
              f"sparsity {info.get('sparsity', 0):.4f}  {info['total_s']:.0f} s")


def table(args) -> None:
    """Markdown table of result files (later files win on equal names), ratios to uniform
    sequential SparseGPT at the same target (for quantized configs: to that model unquantized)."""
    results: dict = {}
    for path in args.results:
        results.update({k: v for k, v in json.loads(Path(path).read_text()).items() if isinstance(v, dict)})
    def sequential_sparsegpt(c):  # unstructured, sequential SparseGPT (quantized or not)
        return c[0] == "sparsegpt" and c[2] == "unstructured" and c[4] == "sequential"

    def plain(name):  # the same without quantization
        c = CONFIGS.get(name)
        return c is not None and sequential_sparsegpt(c) and not c[5]

    uniform = {CONFIGS[n][1]: r["wikitext2"] for n, r in results.items() if plain(n) and CONFIGS[n][3] == "uniform"}
    print("| config | target | wikitext2 test | valid | c4 | vs uniform (test) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in sorted(results.items(), key=lambda kv: (round(kv[1].get("sparsity", 0), 2), kv[0])):
        target = round(r.get("sparsity", 0), 2)
        valid = f"{r['wikitext2-valid']:.2f}" if "wikitext2-valid" in r else ""
        c = CONFIGS.get(name)  # renamed runs (--as) are searches; quantized ones compare with the pruned model
        comparable = c is None or sequential_sparsegpt(c)
        ratio = f"{r['wikitext2'] / uniform[target]:.2f}" if target in uniform and comparable else ""
        print(f"| {name} | {target:.2f} | {r['wikitext2']:.2f} | {valid} | {r['c4']:.2f} | {ratio} |")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--source", default="embedded:gemma3-270m")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="embedded:gemma3-270m")
    r.add_argument("--tokens", required=True)
    r.add_argument("--configs", default="dense,sgpt70")
    r.add_argument("--device", default="auto")
    r.add_argument("--nsamples", type=int, default=None, help="use only the first n calibration windows")
    r.add_argument("--max-windows", type=int, default=None, help="evaluate only the first n windows")
    r.add_argument("--sens-windows", type=int, default=16,
                   help="calibration windows on which ranked/measured configs measure sensitivity")
    r.add_argument("--continue-from", default=None, metavar="CONFIG",
                   help="search configs start from this config's searched schedule in --out (use another --seed)")
    r.add_argument("--seed", type=int, default=None, help="search seed (default: the config's)")
    r.add_argument("--generations", type=int, default=None, help="search generations (default: the config's)")
    r.add_argument("--as", dest="save_as", default=None, help="store the (single) config's result under this name")
    r.add_argument("--out", default="full_protocol.json")
    t = sub.add_parser("table", help="markdown table of result files")
    t.add_argument("results", nargs="+")
    args = parser.parse_args()
    {"prepare": prepare, "run": run, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
