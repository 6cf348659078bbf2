"""calibrate: calibration text -> data/calib/<model>__<calib>.parquet (token windows + fingerprint),
and the evaluation texts (evaluate.datasets) tokenized once -> data/calib/<model>__eval.parquet,
which every evaluate stage reads (no tokenizer or text to load there)."""
from __future__ import annotations

from pathlib import Path

from prunekit.artifacts import fingerprint, folder_fingerprint
from prunekit.config import ConfigError, Params
from prunekit.data import (
    C4_EVAL_DOCS,
    WIKITEXT,
    bos_id,
    calibration_windows,
    load_text,
    tokenize,
    write_calibration,
    write_token_streams,
)
from prunekit.models import load_tokenizer, max_positions
from stages.common import Paths, log


def check(params: Params) -> None:
    c = params.calibration
    if c.source == "wikitext2":
        raise ConfigError("calibration.source 'wikitext2' is the evaluation text; calibrate on c4 or wikitext2-valid")
    if c.source == "c4":
        lo, hi = C4_EVAL_DOCS
        if "c4" in params.evaluate.datasets and c.c4_docs[0] < hi and lo < c.c4_docs[1]:
            raise ConfigError(f"calibration.c4_docs {list(c.c4_docs)} overlap the C4 evaluation documents [{lo}, {hi})")
    elif c.source not in WIKITEXT and not Path(c.source).is_file():
        raise ConfigError(f"calibration text file not found: {c.source}")


def needs(paths: Paths) -> list:
    return [paths.model]


def run(params: Params, step) -> None:
    c, paths = params.calibration, Paths.of(params)
    limit = max_positions(str(paths.model))
    if limit is not None and c.seqlen > limit:
        raise ConfigError(f"calibration.seqlen {c.seqlen} exceeds the model's limit of {limit} positions")
    tokenizer = load_tokenizer(str(paths.model))
    text = load_text(c.source, c.c4_docs)
    ids = tokenize(text, tokenizer)
    log.info("calibration text: %d characters, %d tokens", len(text), len(ids))
    bos = bos_id(tokenizer)
    windows = calibration_windows(ids, c.nsamples, c.seqlen, c.seed, bos)
    tokenizer_fingerprint = folder_fingerprint(paths.model, "tokenizer*")
    meta = {
        "fingerprint": fingerprint(text, tokenizer_fingerprint, c.model_dump()),
        "params": c.model_dump(mode="json"),
        "bos": bos,
        "text_tokens": len(ids),
    }
    write_calibration(paths.calib, windows, meta)
    streams = {name: tokenize(load_text(name), tokenizer) for name in params.evaluate.datasets}
    log.info("evaluation texts: %s", ", ".join(f"{name} {len(ids)} tokens" for name, ids in streams.items()))
    # only what the tokens depend on: calibration params leave this file (and the evaluations) as they are
    write_token_streams(paths.eval_tokens, streams, {"bos": bos, "tokenizer": tokenizer_fingerprint})
