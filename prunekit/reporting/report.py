"""The run's report: reports/metrics.json, reports/report.md, reports/runs.csv (one row per
parameter set) and reports/provenance.json, from the per-model metrics, the schedule, the
pruned model's stats and the export summary."""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import yaml

from ..artifacts import fingerprint, write_atomic, write_json
from ..config import Params
from . import plots, provenance
from .audit import metric_values
from .intervals import ratio_interval

log = logging.getLogger(__name__)

COMPARISONS = {  # (model, baseline): what ppl(model) / ppl(baseline) on the same windows measures
    ("pruned", "uniform"): "the {allocator} schedule against uniform pruning",
    ("compressed", "pruned"): "what quantizing the pruned model costs",
    ("compressed", "quantized"): "what pruning costs on top of quantization",
}


def write_report(params: Params, per_model: dict[str, dict], pruned: dict, schedule: dict, exported: dict | None,
                 reports: Path, artifacts: dict[str, Path], store_attrs: dict | None) -> None:
    """Every output of the report stage under `reports` (see the module docstring).

    per_model: {variant: its metrics file} (a variant without "ppl" was skipped); artifacts:
    {label: path} of everything provenance.json hashes.
    """
    evaluated = {v: m for v, m in per_model.items() if "ppl" in m}
    metrics = {v: m["ppl"] for v, m in evaluated.items()}
    metrics["ci95"] = {v: {d: dict(zip(("lo", "hi"), ci)) for d, ci in m["ppl_ci95"].items()}
                       for v, m in evaluated.items() if "ppl_ci95" in m}
    ratios = {(a, b): {d: ratio_interval(evaluated[a]["details"][d]["window_nll"], evaluated[b]["details"][d]["window_nll"])
                       for d in evaluated[a]["ppl"]}
              for a, b in COMPARISONS if {a, b} <= evaluated.keys()}
    metrics["ratios"] = {f"{a}/{b}": {d: dict(zip(("ratio", "lo", "hi"), r)) for d, r in per_text.items()}
                         for (a, b), per_text in ratios.items()}
    metrics["sparsity"] = {"target": schedule["target"], "achieved": pruned["overall_sparsity"]}
    if exported:
        metrics["export"] = exported["ratios_vs_fp16"]
    hw = provenance.hardware()
    machine = provenance.machine_line(hw)
    metrics["machine"] = machine
    write_json(reports / "metrics.json", metrics)
    runs = _record_run(params, evaluated, pruned, exported, reports / "runs.csv", machine)
    same = runs[(runs["model"] == params.model.name) & (runs["protocol"] == _protocol_key(params))]
    plots.ppl_vs_sparsity(same, list(params.evaluate.datasets), reports / "plots" / "ppl_vs_sparsity.png")
    write_atomic(reports / "report.md", _markdown(params, evaluated, ratios, pruned, schedule, exported, same, machine,
                                                         (store_attrs or {}).get("made_on")))
    params_file = artifacts.get("params_file")
    record = provenance.build(reports.parent, artifacts, params.model_dump(mode="json"), {
        "hessian_store_attrs": store_attrs,
        # what the audit judges numbers by when the files differ (prunekit.reporting.audit)
        "metric_values": metric_values(reports.parent, reports / "metrics"),
        "params_yaml": yaml.safe_load(params_file.read_text()) if params_file and params_file.is_file() else None,
    }, machine=hw)
    write_json(reports / "provenance.json", record)
    log.info("reports/provenance.json: %d files hashed; check later with `prunekit audit`",
             sum(len(a["files"]) for a in record["artifacts"].values()))


def _protocol_key(params: Params) -> str:
    e = params.evaluate
    return f"seqlen={e.seqlen} max_windows={e.max_windows} datasets={'+'.join(e.datasets)}"


def _record_run(params: Params, evaluated: dict, pruned: dict, exported: dict | None, path,
                machine: str) -> pd.DataFrame:
    """Add (or replace) this parameter set's row for this machine in reports/runs.csv; return
    every row. The same parameters on another CPU are another row: the numbers differ in the
    last bits, and at 70% sparsity by more."""
    config = params.model_dump(mode="json")
    config.pop("runtime")
    row = {
        "params_fingerprint": fingerprint(config),
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "model": params.model.name, "protocol": _protocol_key(params),
        "method": params.prune.method, "allocator": params.schedule.allocator, "structure": params.prune.structure,
        "mode": params.prune.mode, "target_sparsity": params.prune.sparsity,
        "achieved_sparsity": pruned["overall_sparsity"],
        "bits": params.quantize.bits if params.quantize.enabled else None,
        "groupsize": params.quantize.groupsize if params.quantize.enabled else None,
        "packed_linears_vs_fp16": exported["ratios_vs_fp16"]["linears"] if exported else None,
    }
    for variant, m in evaluated.items():
        row.update({f"ppl_{variant}_{ds}": v for ds, v in m["ppl"].items()})
    runs = pd.read_csv(path, dtype={"params_fingerprint": str}) if path.is_file() else pd.DataFrame()
    if len(runs) and "machine" not in runs:  # rows of a record that did not name its machine
        log.warning("%s: dropping %d row(s) that do not name their machine", path, len(runs))
        runs = pd.DataFrame()
    if len(runs):
        runs = runs[(runs["params_fingerprint"] != row["params_fingerprint"]) | (runs["machine"] != machine)]
    runs = pd.concat([runs, pd.DataFrame([row])], ignore_index=True) if len(runs) else pd.DataFrame([row])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, runs.to_csv(index=False))
    log.info("reports/runs.csv: %d run(s) recorded", len(runs))
    return runs


def _with_interval(metrics: dict, dataset: str) -> str:
    lo, hi = metrics.get("ppl_ci95", {}).get(dataset, (None, None))
    ppl = metrics["ppl"][dataset]
    return f"{ppl:.2f}" if lo is None else f"{ppl:.2f} [{lo:.1f}, {hi:.1f}]"


def _ratio(bounds: tuple[float, float, float]) -> str:
    ratio, lo, hi = bounds
    return f"{ratio:.3f}× [{lo:.3f}, {hi:.3f}]"


def _markdown(params: Params, evaluated: dict, ratios: dict, pruned: dict, schedule: dict, exported: dict | None = None,
              runs: pd.DataFrame | None = None, machine: str = "", hessians_made_on: str | None = None) -> str:
    datasets = list(params.evaluate.datasets)
    protocol = next(iter(evaluated.values()))["protocol"]
    quant = params.quantize
    gptq = f"GPTQ {quant.bits}-bit" + (f" g{quant.groupsize}" if quant.groupsize else "")
    if quant.head.bits is not None:
        head_mse = quant.mse if quant.head.mse is None else quant.head.mse
        grid = "" if head_mse == quant.mse else ", mse grid" if head_mse else ", min-max grid"
        gptq += f" (head {quant.head.bits}-bit {quant.head.method}{grid})"
    sparsity = f"{params.prune.sparsity:.0%} ({params.prune.structure}, {params.prune.mode})"
    labels = {
        "dense": "dense",
        "quantized": f"{gptq} alone (baseline)",
        "uniform": f"{params.prune.method} uniform {sparsity} (baseline)",
        "pruned": f"{params.prune.method} {params.schedule.allocator} {sparsity}",
        "compressed": f"same + {gptq}",
    }
    lines = [
        f"# Compression report: {params.model.name}",
        "",
        f"Model source `{params.model.source}`; calibration {params.calibration.nsamples} x "
        f"{params.calibration.seqlen} tokens from `{params.calibration.source}` (seed {params.calibration.seed}); "
        f"made on {machine} with torch {torch.__version__}; numbers on another CPU differ (sequential",
        "pruning at high sparsity amplifies last-bit differences): compare within one machine."
        + (f" The dense Hessians were made on {hessians_made_on}." if hessians_made_on and hessians_made_on != machine
           else ""),
        "",
        f"Protocol: {protocol}.",
        "",
        "Perplexity with its 95% interval (bootstrap over the evaluation windows; with few windows the",
        "interval is wide and itself rough). The baselines are made from the same dense model, calibration",
        "and settings. Ratios compare two models on the same windows (paired bootstrap of the NLL",
        "difference): below 1 the first model is better; an interval that excludes 1 is a difference",
        "these windows show.",
        "",
        "| model | " + " | ".join(datasets) + " |",
        "|---|" + "---:|" * len(datasets),
    ]
    for v, m in evaluated.items():
        lines.append(f"| {labels[v]} | " + " | ".join(_with_interval(m, d) for d in datasets) + " |")
    lines += ["", "| ratio | measures | " + " | ".join(datasets) + " |", "|---|---|" + "---:|" * len(datasets)]
    for (a, b), per_text in ratios.items():
        what = COMPARISONS[a, b].format(allocator=params.schedule.allocator)
        lines.append(f"| {a} / {b} | {what} | " + " | ".join(_ratio(per_text[d]) for d in datasets) + " |")
    if ("pruned", "uniform") in ratios:
        shown = [d for d in datasets if ratios["pruned", "uniform"][d][2] < 1]
        pruned_ppl = evaluated["pruned"]
        widths = [(hi - lo) / 2 / pruned_ppl["ppl"][d] for d, (lo, hi) in pruned_ppl.get("ppl_ci95", {}).items()]
        lines += ["", (f"On these windows the schedule's gain over uniform pruning is shown on {', '.join(shown)}."
                       if shown else "On these windows the schedule's gain over uniform pruning is not shown (every "
                       "paired interval reaches 1).")
                  + (f" The pruned model's own interval is ±{max(widths):.0%} wide." if widths else "")]
        if params.evaluate.max_windows is not None:
            lines[-1] += (f" This is a reduced protocol ({params.evaluate.max_windows} windows per text, "
                          f"{params.calibration.nsamples} × {params.calibration.seqlen} calibration tokens): the "
                          "full protocol (every window, 128 × 2048 calibration tokens) is in reports/RESULTS.md "
                          "of the project.")
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
    if exported:
        lines += export_section(exported)
        if exported.get("manifest"):
            lines += size_quality_section(exported, evaluated, quant, labels, datasets)
    if runs is not None and len(runs):
        datasets = list(params.evaluate.datasets)
        lines += [
            "## Runs under this protocol", "",
            f"{len(runs)} run(s) recorded in reports/runs.csv (one row per parameter fingerprint and machine).", "",
            "| params | machine | method | allocator | structure | sparsity | bits | " + " | ".join(datasets) + " |",
            "|---|---|---|---|---|---:|---:|" + "---:|" * len(datasets),
        ]
        for _, r in runs.sort_values("achieved_sparsity").iterrows():
            ppl = [r.get(f"ppl_compressed_{d}") if pd.notna(r.get(f"ppl_compressed_{d}")) else r.get(f"ppl_pruned_{d}")
                   for d in datasets]
            bits = "" if pd.isna(r["bits"]) else f"{int(r['bits'])}"
            lines.append(f"| `{r['params_fingerprint']}` | {r['machine']} | {r['method']} | {r['allocator']} | "
                         f"{r['structure']} | "
                         f"{r['achieved_sparsity']:.3f} | {bits} | " + " | ".join(f"{v:.2f}" for v in ppl) + " |")
        lines += ["", "(perplexity of the final model: quantized when bits is set, else pruned.)", "",
                  "![perplexity against sparsity](plots/ppl_vs_sparsity.png)", ""]
    lines += [
        "## Configuration", "",
        "```yaml", yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False).rstrip(), "```", "",
        "Provenance (git commit, parameters, package versions, hardware, sha256 of every artifact) is in "
        "`reports/provenance.json`; `prunekit audit` re-hashes the artifacts and lists what changed.", "",
    ]
    return "\n".join(lines)


def export_section(exported: dict) -> list[str]:
    """The export's forms with their sizes, against fp16 tensors and the file the run started from."""
    b, src = exported["bytes"], exported.get("source_bytes")
    rows = [(f"`{form.get('file', name.replace('_', '-') + '/')}` ({form['dtype']})", form["bytes"])
            for name, form in exported["forms"].items()]
    fmt = exported["format"]
    packed = f"`packed/` (linears {fmt['values']}; head {fmt['head']})"
    rows += [(f"{packed}: weights file", b["packed_file"])]
    if "packed_folder" in b:
        rows += [(f"{packed}: whole folder", b["packed_folder"])]
    rows += [("the pipeline's folder (fp32)", b["stored_files"])]
    lines = ["## Export", "",
             f"`{exported['packed_dir'].rsplit('/', 1)[0]}/`: every form holds config and tokenizer; its README.md says"
             " how each loads (`hf/` with transformers, `compressed-tensors/` with transformers + compressed-tensors,"
             " the `.gguf` with llama.cpp or transformers + gguf, `packed/` with prunekit)."
             + "".join(f" No {form}: {why}." for form, why in exported.get("skipped_forms", {}).items()), "",
             "| form | bytes on disk | vs fp16 tensors | vs source file |", "|---|---:|---:|---:|"]
    for label, size in rows:
        vs_src = f"{size / src:.3f}" if src else "–"
        lines.append(f"| {label} | {size:,} | {size / b['fp16_tensors']:.3f} | {vs_src} |")
    lines += ["", (f"Source file: {src:,} bytes. " if src else "Source file: not on disk (a hub id). ") +
              "The folders' bytes include their tokenizer and config (the source GGUF holds its tokenizer too).", ""]
    return lines


SIZED = ("dense", "quantized", "pruned", "compressed")  # the models the size table compares


def packed_sizes(manifest: dict, quant, value_bytes: int) -> dict[str, int]:
    """Tensor bytes of the packed form of each model in `SIZED`, from the exported model's packed
    manifest (every tensor's shape; the decoder linears' nonzeros): dense and 4-bit-only linears
    keep every weight, pruned ones the exported model's nonzeros; values in `value_bytes` (the
    export dtype), codes on the `quant` grid (the head on its own, `quantize.head`)."""
    from ..storage.packing import packed_nbytes

    sizes = dict.fromkeys(SIZED, 0)
    for entry in manifest["tensors"].values():
        shape, kind = entry["shape"], entry["kind"]
        if kind == "dense":
            n = math.prod(shape) * (value_bytes if "float" in entry["dtype"] else getattr(torch, entry["dtype"]).itemsize)
            for model in SIZED:
                sizes[model] += n
            continue
        numel = math.prod(shape)
        if kind == "int":  # the quantized head: codes in the quantized models, values in the others
            for model in SIZED:
                coded = model in ("quantized", "compressed")
                sizes[model] += packed_nbytes(shape, numel, bits=entry["bits"] if coded else None,
                                              groupsize=entry["groupsize"], sparse=False) if coded else numel * value_bytes
            continue
        for model in SIZED:  # a decoder linear
            nnz = entry["nnz"] if model in ("pruned", "compressed") else numel
            bits = quant.bits if model in ("quantized", "compressed") and quant.enabled else None
            sizes[model] += packed_nbytes(shape, nnz, bits=bits, groupsize=quant.groupsize)
    return sizes


def size_quality_section(exported: dict, evaluated: dict, quant, labels: dict, datasets: list[str]) -> list[str]:
    """Every model of the run in every export form: bytes (against the bf16 folder and the file
    the run started from) beside its perplexity."""
    forms, src = exported["forms"], exported.get("source_bytes")
    value_bytes = torch.finfo(getattr(torch, forms["hf"]["dtype"])).bits // 8
    packed = packed_sizes(exported["manifest"], quant, value_bytes)
    final = "compressed" if exported["quantized"] else "pruned"
    extra = exported["bytes"]["packed_folder"] - packed[final]  # config, tokenizer, manifest, file header
    bf16 = forms["hf"]["bytes"]

    def cell(size: int | None, note: str = "") -> str:
        if size is None:
            return "–"
        return f"{size / 1e6:.1f} MB ({size / bf16:.2f} / {size / src:.2f})" + note if src else \
            f"{size / 1e6:.1f} MB ({size / bf16:.2f})" + note

    quantized_models = {"quantized", "compressed"} if exported["quantized"] else set()
    lines = ["## Size against quality", "",
             "Each model of this run in each form: megabytes (× the bf16 `hf/` folder / × the source file), "
             "beside its perplexity (the forms read back the model's weights: bf16 rounding, or exactly on the "
             "grid; tests/test_export.py checks their perplexity against the pipeline's). `hf/`, "
             "compressed-tensors and GGUF store every weight, so sparsity buys no bytes there; the packed form "
             "stores the nonzeros only. Bytes of the exported model are measured; those of the others are "
             "computed from the same shapes and nonzero counts (`packing.packed_nbytes`, tested against what "
             "packing writes) plus the exported folder's other files.", "",
             "| model | " + " | ".join(datasets) + " | `hf/` | compressed-tensors | GGUF | `packed/` |",
             "|---|" + "---:|" * (len(datasets) + 4)]
    for model in SIZED:
        if model not in evaluated:
            continue
        ct = forms.get("compressed_tensors", {}).get("bytes") if model in quantized_models else None
        gguf = forms["gguf"]["bytes"] if "gguf" in forms and model in quantized_models else None
        gguf_cell = cell(src, " the source") if model == "dense" and "gguf" in forms else cell(gguf)
        ppl = " | ".join(f"{evaluated[model]['ppl'][d]:.2f}" for d in datasets)
        lines.append(f"| {labels[model]} | {ppl} | {cell(bf16)} | {cell(ct)} | {gguf_cell} | "
                     f"{cell(packed[model] + extra)} |")
    lines += ["", "Not in this job: a quantization-only model at the packed size of the pruned + quantized one "
              "(about 3-bit GPTQ).", ""]
    return lines
