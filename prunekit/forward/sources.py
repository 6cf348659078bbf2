"""Layer sources: one interface to a model's decoder layers, whether the model is held in
memory or streamed from its safetensors files one decoder layer at a time.

Every layer loop (Hessians, pruning, quantization, scoring) is written once against this
interface and opens the model once:

    source = open_source("data/models/gemma3-270m", device, stream=False, out_dir="data/pruned/gemma3-270m")
    runner = source.runner(windows)          # layer 0's inputs of the windows
    for i in range(len(source.layers)):
        with source.layer(i) as layer:       # streamed: read here, written to out_dir on exit
            ...                              # accumulate Hessians, prune `layer`, runner.advance(i)
    source.save(tokenizer, extra={...})      # the folder, published atomically with prunekit.json

- `InMemoryModel`: `models.load_model`'s model; `layer(i)` is layer i itself, `save` is
  `models.save_model`.
- `StreamedModel` (for models larger than memory): the model is built as a skeleton whose
  parameters live on the meta device (buffers such as rotary frequencies are computed as
  usual). Only what the current step needs is read from disk: the modules outside the
  decoder layers while the windows are run up to the first layer (`runner`); decoder layer i
  inside `layer(i)`, written to an output shard on exit when the source has an `out_dir`,
  then back to meta; the final norm(s) and the LM head inside `head()` (read as the embedding
  when tied). `save` copies the tensors no layer wrote tensor by tensor. Peak memory is about
  one decoder layer (plus its Hessians and the factorisation workspace), the largest outside
  tensor, and the activations of the windows — not the model.

Both give bit-identical results: the same tensors are read, cast to the same dtype and run
through the same code. A streamed output folder is what `save_model` writes (config,
generation config, tokenizer, safetensors shards plus index, prunekit.json with the same
`state_fingerprint`), sharded one decoder layer per file; a tied LM head is stored once.
Streaming needs the model's state-dict names in the checkpoint, as `save_pretrained` writes
them (the prepare_model stage's output); other checkpoints are refused with a ConfigError.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from torch import nn

from ..artifacts import replace_dir, state_fingerprint
from ..config import ConfigError
from ..models import adapter_for, decoder_layers, load_model, save_model
from ..storage.checkpoint import REST_SHARD_BYTES, CheckpointReader, ShardWriter, folder_state_fingerprint
from .layerwise import LayerwiseRunner

log = logging.getLogger(__name__)


class LayerSource:
    """A causal LM's decoder layers as the layer loops see them (see the module docstring).

    Attributes: `model` (the CausalLM; a meta-device skeleton when streamed), `adapter`,
    `layers` (its decoder layers), `device`, `streamed`.
    """

    model: nn.Module
    streamed: bool = False

    def runner(self, windows: torch.Tensor) -> LayerwiseRunner:
        """Layer 0's inputs of the windows (n, seqlen), ready to be run layer by layer."""
        raise NotImplementedError

    def layer(self, index: int) -> AbstractContextManager[nn.Module]:
        """Decoder layer `index`, ready for the body of the `with` block."""
        raise NotImplementedError

    def head(self) -> AbstractContextManager[nn.Module]:
        """The model with its final norm(s) and LM head ready (for `forward.head.OutputHead`)."""
        raise NotImplementedError

    def saved_name(self, name: str) -> str:
        """The name the state entry `name` is saved under: a tied entry's first name."""
        raise NotImplementedError

    def update(self, name: str, value: torch.Tensor) -> None:
        """Replace the state entry `name` (its saved name; a tied alias follows) in the model
        that `save` publishes, once the layer loop is past every use of it (e.g. the LM head)."""
        raise NotImplementedError

    def save(self, tokenizer=None, extra: dict | None = None, more_files: Callable[[Path], None] | None = None) -> None:
        """Publish the (modified) model in `out_dir` with prunekit.json = extra + "fingerprint";
        `more_files(folder)` adds files first, so they appear with the model or not at all."""
        raise NotImplementedError

    def discard(self) -> None:
        """Remove an unfinished output (after a failure)."""


class InMemoryModel(LayerSource):
    """The whole model in memory on `device`."""

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, *,
                 out_dir: str | Path | None = None):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.adapter = adapter_for(model)
        self.layers = decoder_layers(model, self.adapter)
        self.out_dir = None if out_dir is None else Path(out_dir)

    @classmethod
    def load(cls, model_dir: str | Path, device: torch.device | str = "cpu", **kwargs) -> "InMemoryModel":
        return cls(load_model(str(model_dir), device=device), device, **kwargs)

    def runner(self, windows: torch.Tensor) -> LayerwiseRunner:
        return LayerwiseRunner(self.model, self.adapter, windows, self.device)

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        yield self.layers[index]

    @contextmanager
    def head(self) -> Iterator[nn.Module]:
        yield self.model

    def saved_name(self, name: str) -> str:
        state = self.model.state_dict(keep_vars=True)
        return next(n for n, t in state.items() if t is state[name])

    def update(self, name: str, value: torch.Tensor) -> None:
        self.model.state_dict(keep_vars=True)[name].data = value.to(self.device)

    def save(self, tokenizer=None, extra: dict | None = None, more_files: Callable[[Path], None] | None = None) -> None:
        if self.out_dir is None:
            raise RuntimeError("this source has no out_dir")
        save_model(self.model.cpu(), tokenizer, self.out_dir,
                   extra={"fingerprint": state_fingerprint(self.model), **(extra or {})}, more_files=more_files)


def open_source(model_dir: str | Path, device: torch.device | str, *, stream: bool = False,
                out_dir: str | Path | None = None, **kwargs) -> LayerSource:
    """The model in `model_dir` as a layer source: streamed one decoder layer at a time
    (`stream`), else loaded whole. With `out_dir`, `save` publishes the modified model there."""
    if stream:
        return StreamedModel(model_dir, device, out_dir=out_dir, **kwargs)
    return InMemoryModel.load(model_dir, device, out_dir=out_dir)


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def _generation_config(folder: Path):
    """The generation config `from_pretrained` gives the model in `folder`: its own file, else config.json's."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True)


class StreamedModel(LayerSource):
    """A meta-device skeleton of the model in `model_dir` whose weights are read on demand.

    device: where loaded tensors go (the layer loops run there); dtype: floating tensors are
    cast to it on read, as `load_model` does. out_dir: when given, every layer leaving
    `layer(i)` is written there (into `<out_dir>.tmp` until `save` renames it).
    check(name, tensor): called with every tensor read, after the cast (e.g. to refuse NaNs).
    """

    streamed = True

    def __init__(self, model_dir: str | Path, device: torch.device, *, dtype: torch.dtype = torch.float32,
                 out_dir: str | Path | None = None, check: Callable[[str, torch.Tensor], None] | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir, self.device = Path(model_dir), torch.device(device)
        self.reader = CheckpointReader(self.model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        with init_empty_weights():  # parameters on meta; buffers (rotary tables...) computed for real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # under init_empty_weights the tie is not made; save_pretrained relies on it
        model.config.use_cache = False
        if model.can_generate():
            model.generation_config = _generation_config(self.model_dir)
        self.model = model.eval()
        self.adapter = adapter_for(model)
        self.layers = decoder_layers(model, self.adapter)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(self.device)
        # Canonical name of every state-dict entry: a tied entry maps to the first name of its tensor.
        self._targets = model.state_dict(keep_vars=True)
        first: dict[int, str] = {}
        self.canonical = {name: first.setdefault(id(t), name) for name, t in self._targets.items()}
        self._aliases: dict[str, list[str]] = {}
        for name, canonical in self.canonical.items():
            self._aliases.setdefault(canonical, []).append(name)
        missing = [n for n in self._own_names("") if isinstance(self._targets[n], nn.Parameter)
                   and n not in self.reader]
        if missing:
            raise ConfigError(f"{self.model_dir}: checkpoint lacks {missing[:3]} (streaming needs the model's "
                              "state-dict names, as save_pretrained writes them; runtime.stream: false converts it)")
        # Before any load: loading replaces the parameter objects that _outside_names tells apart by id.
        self._outside = self._outside_names()
        self.check = check
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.writer = None
        if self.out_dir is not None:
            shutil.rmtree(self._tmp_dir(), ignore_errors=True)  # left by a killed run
            self.writer = ShardWriter(self._tmp_dir())

    def _tmp_dir(self) -> Path:
        return self.out_dir.with_name(self.out_dir.name + ".tmp")

    def _read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Checkpoint tensors cast like load_model; a buffer the checkpoint lacks keeps its init."""
        found = self.reader.read([n for n in names if n in self.reader])
        out = {}
        for name in names:
            target = self._targets[name]
            value = found[name].to(dtype=target.dtype) if name in found else target.detach()
            if self.check is not None:
                self.check(name, value)
            out[name] = value.to(device)
        return out

    def _own_names(self, prefix: str) -> list[str]:
        return [n for n in self._targets if n.startswith(prefix) and self.canonical[n] == n]

    def _load(self, names: list[str]) -> None:
        """Read canonical `names` onto the device; a tied entry (the head) gets the same tensor."""
        for name, value in self._read(names, self.device).items():
            for alias in self._aliases[name]:
                _set_tensor(self.model, alias, value)

    def _unload(self, names: list[str]) -> None:
        for name in names:
            if isinstance(self._targets[name], nn.Parameter):
                for alias in self._aliases[name]:
                    _set_tensor(self.model, alias, self._targets[name].detach().to("meta"))

    def _outside_names(self) -> list[str]:
        """Entries of the base model that are not in a decoder layer (embeddings, final norm)."""
        base = {id(t) for t in self.model.base_model.state_dict(keep_vars=True).values()}
        layers = self.adapter.layers + "."
        return [n for n in self._own_names("") if id(self._targets[n]) in base and not n.startswith(layers)]

    @contextmanager
    def outside_layers(self) -> Iterator[nn.Module]:
        """Load everything of the base model but the decoder layers (to capture layer 0's inputs)."""
        names = self._outside
        self._load(names)
        try:
            yield self.model
        finally:
            self._unload(names)

    def _head_names(self) -> list[str]:
        """Canonical entries of the final modules (`Adapter.final`) and the LM head."""
        head = self.model.get_output_embeddings()
        head_path = next(name for name, module in self.model.named_modules() if module is head)
        prefixes = tuple(f"{path}." for path in (*self.adapter.final, head_path))
        return list(dict.fromkeys(self.canonical[n] for n in self._targets if n.startswith(prefixes)))

    @contextmanager
    def head(self) -> Iterator[nn.Module]:
        """Load the final norm(s) and the LM head (for the scores of the last hidden states);
        a head tied to the embedding is read once, as the embedding."""
        names = self._head_names()
        self._load(names)
        try:
            yield self.model
        finally:
            self._unload(names)

    def runner(self, windows: torch.Tensor) -> LayerwiseRunner:
        """A LayerwiseRunner over this skeleton: layer 0's inputs captured with the outside
        modules loaded, which are freed again before the layer loop starts."""
        with self.outside_layers():
            return LayerwiseRunner(self.model, self.adapter, windows, self.device)

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` loaded; written to the output (if any) on a clean exit, then freed."""
        prefix = f"{self.adapter.layers}.{index}."
        names = self._own_names(prefix)
        self._load(names)
        try:
            yield self.layers[index]
            if self.writer is not None:
                state = self.layers[index].state_dict(prefix=prefix)
                self.writer.write({n: state[n] for n in names})
        finally:
            self._unload(names)

    def saved_name(self, name: str) -> str:
        return self.canonical[name]

    def update(self, name: str, value: torch.Tensor) -> None:
        """Written to the output at once (the skeleton keeps reading the input's tensor)."""
        if self.writer is None:
            raise RuntimeError("this stream has no out_dir")
        if self.canonical.get(name) != name:
            raise KeyError(f"{name} is not a canonical state-dict name of this model")
        self.writer.write({name: value.to(self._targets[name].dtype)})

    def save(self, tokenizer=None, extra: dict | None = None, more_files=None) -> None:
        """Finish the output folder like `models.save_model`: the tensors no layer wrote (embeddings,
        final norm, untied head) copied one at a time, config, tokenizer, and prunekit.json with
        `extra` plus "fingerprint" = state_fingerprint of the whole model, computed from the files;
        `more_files(folder)` may add files before the folder is published."""
        if self.writer is None:
            raise RuntimeError("this stream has no out_dir")
        tmp, done = self._tmp_dir(), self.writer.written
        shard: dict[str, torch.Tensor] = {}
        for name in self._own_names(""):
            if name not in done:
                shard.update(self._read([name], torch.device("cpu")))
                if sum(t.numel() * t.element_size() for t in shard.values()) >= REST_SHARD_BYTES:
                    self.writer.write(shard)
                    shard = {}
        self.writer.write(shard)
        self.writer.close()
        self.model.config.save_pretrained(tmp)
        if self.model.can_generate() and self.model.generation_config is not None:
            self.model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {**(extra or {}), "fingerprint": folder_state_fingerprint(tmp, self.canonical)}
        (tmp / "prunekit.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if more_files is not None:
            more_files(tmp)
        replace_dir(tmp, self.out_dir)  # never a partial folder, even if killed here
        log.info("saved streamed model to %s", self.out_dir)

    def discard(self) -> None:
        """Remove the unfinished output (after a failure; `save` publishes it otherwise)."""
        if self.out_dir is not None:
            shutil.rmtree(self._tmp_dir(), ignore_errors=True)
