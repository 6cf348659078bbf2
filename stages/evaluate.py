"""evaluate@<model>: perplexity of the dense, pruned or compressed model -> reports/metrics/<model>.json.

    prunekit stage evaluate pruned
"""
from __future__ import annotations

import math
from pathlib import Path

from prunekit.artifacts import read_json, state_fingerprint, write_json
from prunekit.config import ConfigError, Params
from prunekit.data import WIKITEXT, read_token_streams
from prunekit.forward.scoring import evaluate_model, protocol
from prunekit.forward.sources import InMemoryModel
from prunekit.models import max_positions, pick_device
from prunekit.reporting.intervals import ppl_interval
from stages import common
from stages.common import Paths, log, open_model

VARIANTS = common.VARIANTS  # the stage runs once per model (dvc.yaml's foreach)


def check(params: Params) -> None:
    for name in params.evaluate.datasets:
        if name not in (*WIKITEXT, "c4") and not Path(name).is_file():
            raise ConfigError(f"unknown evaluation dataset {name!r}: use {', '.join(WIKITEXT)}, c4 or a text file path")


MADE_BY = dict(zip(VARIANTS, ("prepare_model", "baseline@quantized", "baseline@uniform", "prune", "quantize")))


def require_recorded_weights(source, recorded: str, variant: str, model_dir: Path) -> None:
    """The weights loaded are the ones the folder's prunekit.json records (their fingerprint),
    so the metrics describe what the stage made. Checked where the whole model is in memory
    anyway (hashing it costs about 2 s a GB); a streamed model is never whole, so not there."""
    if not isinstance(source, InMemoryModel):
        return
    actual = state_fingerprint(source.model)
    if actual != recorded:
        raise ConfigError(non_finite_weight(variant, model_dir) or (
            f"the {variant} model {model_dir} holds other weights (fingerprint {actual}) than its prunekit.json "
            f"records ({recorded}): it changed after {MADE_BY[variant]} wrote it; restore it (dvc checkout "
            f"{model_dir}) or rerun {MADE_BY[variant]}"))


def non_finite_weight(variant: str, model_dir: Path) -> str | None:
    """The first weight with NaN or inf values (read tensor by tensor from the folder), in one line."""
    from prunekit.storage.checkpoint import CheckpointReader

    reader = CheckpointReader(model_dir)
    for name in sorted(reader.weight_map):
        tensor = reader.read([name])[name]
        if tensor.is_floating_point() and not tensor.isfinite().all():
            return (f"the {variant} model {model_dir} has NaN or inf weights in {name}; no perplexity recorded "
                    f"(rerun the stage that made it)")
    return None


def non_finite_reason(variant: str, model_dir: Path, text: str) -> str:
    """Why the perplexity on `text` is not a number: a weight with NaN or inf values, else the loss itself."""
    return non_finite_weight(variant, model_dir) or (
        f"the {variant} model {model_dir} gives a NaN or inf loss on {text}; no perplexity recorded")


def needs(paths: Paths, variant: str = "dense") -> list:
    return [paths.model_dir(variant), paths.eval_tokens]


def run(params: Params, step, variant: str = "dense") -> None:
    paths, e = Paths.of(params), params.evaluate
    model_dir = paths.model_dir(variant)  # refuses an unknown variant
    out = paths.reports / "metrics" / f"{variant}.json"
    meta = read_json(model_dir / "prunekit.json")
    if meta.get("enabled") is False:
        write_json(out, {"model": variant, "skipped": "quantize.enabled is false"})
        return
    limit = max_positions(str(model_dir))
    if limit is not None and e.seqlen > limit:
        raise ConfigError(f"evaluate.seqlen {e.seqlen} exceeds the model's limit of {limit} positions")
    streams, tokens = read_token_streams(paths.eval_tokens)  # tokenized by the calibrate stage
    if missing := [name for name in e.datasets if name not in streams]:
        raise ConfigError(f"{paths.eval_tokens} lacks evaluate.datasets {missing}; rerun the calibrate stage")
    # streamed: the windows go through one decoder layer at a time, read from model_dir's files
    source = open_model(params, model_dir, pick_device(params.runtime.device))
    require_recorded_weights(source, meta["fingerprint"], variant, model_dir)
    log.info("evaluating the %s model (%s) on %s: %d-token windows, %s", variant, model_dir, ", ".join(e.datasets),
             e.seqlen, "all windows" if e.max_windows is None else f"at most {e.max_windows} windows")
    results = evaluate_model(source, {name: streams[name] for name in e.datasets}, tokens["bos"], e.seqlen,
                             e.max_windows)
    for name, r in results.items():
        if not math.isfinite(r["ppl"]):
            raise ConfigError(non_finite_reason(variant, model_dir, name))
        log.info("%s %s ppl %.3f over %d tokens", variant, name, r["ppl"], r["tokens"])
    write_json(out, {
        "model": variant,
        "fingerprint": meta["fingerprint"],
        "protocol": protocol(e.seqlen, e.max_windows, tokens["bos"] is not None),
        "ppl": {name: r["ppl"] for name, r in results.items()},
        # 95% bootstrap over windows (prunekit.reporting.intervals): what the windows say about the text
        "ppl_ci95": {name: list(ppl_interval(r["window_nll"])) for name, r in results.items()},
        "details": results,
    })
