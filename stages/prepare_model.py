"""prepare_model: model source (embedded GGUF, local folder, .gguf or hub id) -> data/models/<name>/
as safetensors + config + tokenizer, so later stages load in seconds.

With runtime.stream a local safetensors folder is copied one decoder layer at a time (never the
whole model in memory), cast and checked like the in-memory path, to the same fingerprint."""
from __future__ import annotations

from pathlib import Path

import torch

from prunekit.artifacts import state_fingerprint
from prunekit.config import ConfigError, Params
from prunekit.models import adapter_for, gguf_parse_once, load_model, load_tokenizer, resolve_source, save_model
from stages.common import Paths, log


def check(params: Params) -> None:
    resolve_source(params.model.source)


def needs(paths: Paths) -> list:
    return []


def finite_check(source: str):
    """check(name, tensor): ConfigError for a floating tensor with NaN or inf values."""
    def check(name: str, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point() and not tensor.isfinite().all():
            raise ConfigError(f"model {source} has NaN or inf weights in {name}; refusing to prepare it")
    return check


def why_not_streamed(source: str) -> str | None:
    """Why `source` must be loaded whole by transformers; None for a local safetensors folder."""
    from prunekit.storage.checkpoint import INDEX_FILE, SINGLE_FILE

    where, gguf = resolve_source(source)
    if gguf is not None:
        return "GGUF weights are dequantized by transformers"
    if not Path(where).is_dir():
        return "a hub id is loaded by transformers"
    if not any((Path(where) / name).is_file() for name in (SINGLE_FILE, INDEX_FILE)):
        return "the folder has no safetensors checkpoint"
    return None


def run(params: Params, step) -> None:
    with gguf_parse_once():  # a GGUF source: the tokenizer and the model share one metadata parse
        prepare(params)


def prepare(params: Params) -> None:
    source, out_dir = params.model.source, Paths.of(params).model
    tokenizer = load_tokenizer(source)
    if params.runtime.stream:
        why = why_not_streamed(source)
        if why is None:
            prepare_streamed(source, tokenizer, out_dir)
            return
        log.info("runtime.stream: loading %s whole: %s", source, why)
    log.info("loading %s", source)
    model = load_model(source)
    check_tensor = finite_check(source)
    for name, tensor in model.state_dict().items():
        check_tensor(name, tensor)
    meta = {"source": source, "fingerprint": state_fingerprint(model), "model_type": model.config.model_type,
            "n_layers": len(model.get_submodule(adapter_for(model).layers))}
    save_model(model, tokenizer, out_dir, extra=meta)


def prepare_streamed(source: str, tokenizer, out_dir: Path) -> None:
    """Copy the checkpoint layer by layer: each tensor read is cast to float32 (as load_model
    does) and checked; the tied head is stored once, as the embedding (as save_pretrained does)."""
    from prunekit.forward.sources import StreamedModel

    log.info("streaming %s one decoder layer at a time", source)
    stream = StreamedModel(source, torch.device("cpu"), out_dir=out_dir, check=finite_check(source))
    try:
        for i in range(len(stream.layers)):
            with stream.layer(i):  # read (and checked) here, written to the output on exit
                pass
        meta = {"source": source, "model_type": stream.model.config.model_type, "n_layers": len(stream.layers)}
        stream.save(tokenizer, extra=meta)  # copies the rest, adds the fingerprint, publishes
    finally:
        stream.discard()
