"""prepare_model: model source (embedded GGUF, local folder, .gguf or hub id) -> data/models/<name>/
as safetensors + config + tokenizer, so later stages load in seconds."""
from __future__ import annotations

from prunekit.artifacts import state_fingerprint
from prunekit.config import ConfigError, Params
from prunekit.models import adapter_for, load_model, load_tokenizer, resolve_source, save_model
from stages.common import Paths, log, main


def check(params: Params) -> None:
    resolve_source(params.model.source)


def needs(paths: Paths) -> list:
    return []


def run(params: Params, step) -> None:
    source = params.model.source
    log.info("loading %s", source)
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    adapter = adapter_for(model)
    bad = next((name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()), None)
    if bad is not None:
        raise ConfigError(f"model {source} has NaN or inf weights in {bad}; refusing to prepare it")
    meta = {"source": source, "fingerprint": state_fingerprint(model), "model_type": model.config.model_type,
            "n_layers": len(model.get_submodule(adapter.layers))}
    save_model(model, tokenizer, Paths.of(params).model, extra=meta)


if __name__ == "__main__":
    main("prepare_model")
