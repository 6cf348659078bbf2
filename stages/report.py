"""report: per-model metrics + schedule + pruning stats -> reports/metrics.json and reports/report.md."""
from __future__ import annotations

import platform
from collections import defaultdict

import torch

from prunekit.artifacts import read_json, write_atomic, write_json
from prunekit.config import Params
from stages.common import Paths, main
from stages import evaluate


def check(params: Params) -> None:
    pass


def needs(paths: Paths) -> list:
    return [paths.reports / "metrics" / f"{v}.json" for v in evaluate.VARIANTS] + [paths.schedule, paths.pruned]


def run(params: Params, step) -> None:
    paths = Paths.of(params)
    per_model = {v: read_json(paths.reports / "metrics" / f"{v}.json") for v in evaluate.VARIANTS}
    evaluated = {v: m for v, m in per_model.items() if "ppl" in m}
    pruned = read_json(paths.pruned / "prunekit.json")
    schedule = read_json(paths.schedule)
    metrics = {v: m["ppl"] for v, m in evaluated.items()}
    metrics["sparsity"] = {"target": schedule["target"], "achieved": pruned["overall_sparsity"]}
    write_json(paths.reports / "metrics.json", metrics)
    write_atomic(paths.reports / "report.md", _markdown(params, evaluated, pruned, schedule))


def _markdown(params: Params, evaluated: dict, pruned: dict, schedule: dict) -> str:
    datasets = list(params.evaluate.datasets)
    protocol = next(iter(evaluated.values()))["protocol"]
    quant = params.quantize
    labels = {
        "dense": "dense",
        "pruned": f"{params.prune.method} {params.schedule.allocator} {params.prune.sparsity:.0%}"
                  f" ({params.prune.structure}, {params.prune.mode})",
        "compressed": f"same + GPTQ {quant.bits}-bit" + (f" g{quant.groupsize}" if quant.groupsize else ""),
    }
    lines = [
        f"# Compression report: {params.model.name}",
        "",
        f"Model source `{params.model.source}`; calibration {params.calibration.nsamples} x "
        f"{params.calibration.seqlen} tokens from `{params.calibration.source}` (seed {params.calibration.seed}); "
        f"torch {torch.__version__} on {platform.machine()}.",
        "",
        f"Protocol: {protocol}.",
        "",
        "| model | " + " | ".join(datasets) + " |",
        "|---|" + "---:|" * len(datasets),
    ]
    for v, m in evaluated.items():
        lines.append(f"| {labels[v]} | " + " | ".join(f"{m['ppl'][d]:.2f}" for d in datasets) + " |")
    lines += [
        "",
        f"Overall sparsity of the decoder linears: {pruned['overall_sparsity']:.4f} "
        f"(target {schedule['target']}, schedule mean {schedule['achieved']:.6f}).",
        "",
        "## Sparsity per block",
        "",
        "| block | sparsity | cluster | OBS loss |",
        "|---:|---:|---:|---:|",
    ]
    blocks: dict[int, list] = defaultdict(list)
    for key, s in pruned["linears"].items():
        blocks[int(key.split(".")[0])].append((key, s))
    for b in sorted(blocks):
        entries = blocks[b]
        mean = sum(s["sparsity"] * s["params"] for _, s in entries) / sum(s["params"] for _, s in entries)
        lines.append(f"| {b} | {mean:.3f} | {schedule['cluster'][entries[0][0]]} | "
                     f"{sum(s['loss'] for _, s in entries):.4g} |")
    lines += ["", "(block sparsity is parameter-weighted over its linears; reports/schedule.csv has every linear.)", "",
              "![sparsity per block](plots/schedule.png)", "", "![estimated loss](plots/estimated_loss.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main("report")
