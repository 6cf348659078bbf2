"""Stream a safetensors checkpoint through the layer loops one decoder layer at a time.

For models larger than memory. The model is built as a skeleton whose parameters live on the
meta device (no storage; buffers such as rotary frequencies are computed as usual). Only what
the current step needs is read from disk:

- the modules outside the decoder layers (embeddings, positions, final norm), while the
  calibration windows are run up to the first layer (`LayerStream.outside_layers`);
- decoder layer i, while the loop works on it (`LayerStream.layer`): its tensors are read
  from the (sharded) safetensors files, the Hessians are accumulated or the layer is pruned,
  the layer is written to an output shard when the stage produces a model, and its
  parameters go back to meta;
- the final norm(s) and the LM head (`LayerStream.head`), which only evaluation needs (the
  head is read as the embedding when the two are tied).

`LayerStream.save` copies the tensors no layer wrote (embeddings, final norm, head) tensor by
tensor into the output. Peak memory is therefore about one decoder layer (plus its Hessians
and the factorisation workspace), the largest outside tensor (the embedding, during capture
and when copied), and the calibration activations — not the model.

Results are bit-identical to the in-memory path (`models.load_model` + the same loops): the
same tensors are read, cast to the same dtype, and run through the same code. The saved
folder is what `save_model` writes (config, generation config, tokenizer, safetensors shards
plus index, prunekit.json with the same `state_fingerprint`), sharded one decoder layer per
file; a tied LM head is stored once, as the embedding, like `save_pretrained` does.
Checkpoint names must be the model's state-dict names, as `save_pretrained` writes them (the
prepare_model stage's output); a checkpoint whose names `from_pretrained` would have to
rewrite (legacy prefixes, weight conversions) is refused with a ConfigError naming them.

The pipeline turns it on with `runtime.stream: true` (prepare_model, hessians, estimate, prune,
quantize and evaluate stages; `prunekit.evaluate.streamed_nll` is the perplexity pass;
prepare_model copies a safetensors source folder layer by layer, checking every tensor read).
Example (what stages/prune.py does, sequential mode)::

    stream = LayerStream("data/models/opt-1.3b", torch.device("cpu"), out_dir="data/pruned/opt-1.3b")
    stats = prune_model(stream.model, stream.adapter, sparsity, params, runner=stream.runner(windows),
                        stream=stream)
    stream.save(tokenizer, extra={"linears": stats})
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .artifacts import replace_dir
from .config import ConfigError
from .layerwise import LayerwiseRunner
from .models import adapter_for, decoder_layers

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 64 << 20  # read size when hashing a saved tensor
REST_SHARD_BYTES = 256 << 20  # outside tensors are gathered into shards of about this size
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                 "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


class CheckpointReader:
    """Tensors of a safetensors checkpoint folder (one file, or shards plus index), read by name.

    Files are opened only for the duration of one `read` so their memory maps (which count in
    the process RSS once touched) do not accumulate.
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder, self._open = Path(folder), safe_open
        index = self.folder / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(self.folder / SINGLE_FILE, "pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise ConfigError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; streaming needs safetensors")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: tensor} on CPU, each file opened once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with self._open(self.folder / file, "pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def header(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        with self._open(self.folder / self.weight_map[name], "pt") as f:
            part = f.get_slice(name)
            return _TORCH_DTYPES[part.get_dtype()], tuple(part.get_shape())

    def chunks(self, name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """The tensor as consecutive row blocks of at most ~max_bytes (whole if 0-d or small)."""
        with self._open(self.folder / self.weight_map[name], "pt") as f:
            part = f.get_slice(name)
            shape = part.get_shape()
            row_bytes = max(1, int(torch.Size(shape[1:]).numel()) * _TORCH_DTYPES[part.get_dtype()].itemsize)
            if not shape or shape[0] * row_bytes <= max_bytes:
                yield f.get_tensor(name)
                return
            step = max(1, max_bytes // row_bytes)
            for start in range(0, shape[0], step):
                yield part[start:start + step]


class ShardWriter:
    """Writes safetensors shards one call at a time, then names them and writes the index.

    `close` renames the shards to HF's `model-0000k-of-0000N.safetensors` (or a single
    `model.safetensors` without index), so `from_pretrained` reads the folder as usual.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: list[tuple[Path, list[str]]] = []
        self.total_size = self.total_parameters = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, path, metadata={"format": "pt"})
        self.files.append((path, list(tensors)))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        self.total_parameters += sum(t.numel() for t in tensors.values())

    @property
    def written(self) -> set[str]:
        return {name for _, names in self.files for name in names}

    def close(self) -> None:
        n = len(self.files)
        if n == 1:
            self.files[0][0].rename(self.folder / SINGLE_FILE)
            return
        weight_map = {}
        for k, (path, names) in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class TensorFileWriter:
    """One safetensors file written a tensor at a time, for outputs too large to hold at once.

    Tensor bytes go to one temporary part file per dtype as they come; `close` writes the
    header (name -> dtype, shape, byte range) and then the parts, widest dtype first, so that
    every tensor starts aligned to its element size as in safetensors' own files. Readable by
    `safe_open` / `safetensors.torch.load_file`.
    """

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None):
        self.path, self.metadata = Path(path), metadata
        self._parts: dict[torch.dtype, tuple] = {}  # dtype -> (open part file, [(name, shape, bytes)])
        self._names: set[str] = set()

    def _part_path(self, dtype: torch.dtype) -> Path:
        return self.path.with_name(f"{self.path.name}.{_DTYPE_NAMES[dtype]}.part")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        t = tensor.detach().cpu().contiguous()
        if t.dtype not in self._parts:
            self._parts[t.dtype] = (open(self._part_path(t.dtype), "wb"), [])
        part, entries = self._parts[t.dtype]
        part.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        entries.append((name, list(t.shape), t.numel() * t.element_size()))

    def close(self) -> None:
        order = sorted(self._parts, key=lambda dtype: (-dtype.itemsize, _DTYPE_NAMES[dtype]))
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for dtype in order:
            part, entries = self._parts[dtype]
            part.close()
            for name, shape, size in entries:
                header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for dtype in order:
                with open(self._part_path(dtype), "rb") as part:
                    shutil.copyfileobj(part, out, CHUNK_BYTES)
                self._part_path(dtype).unlink()


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


class LayerStream:
    """A meta-device skeleton of the model in `model_dir` whose weights are read on demand.

    device: where loaded tensors go (the layer loops run there); dtype: floating tensors are
    cast to it on read, as `load_model` does. out_dir: when given, every layer leaving
    `layer(i)` is written there (into `<out_dir>.tmp` until `save` renames it).
    check(name, tensor): called with every tensor read, after the cast (e.g. to refuse NaNs).
    """

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


def folder_state_fingerprint(folder: str | Path, canonical: dict[str, str]) -> str:
    """`artifacts.state_fingerprint` of the model saved in `folder`, read in row chunks.

    canonical: every state-dict name -> the name it is stored under (tied entries share one).
    """
    reader = CheckpointReader(folder)
    digest = hashlib.sha256()
    for name in sorted(canonical):
        dtype, shape = reader.header(canonical[name])
        digest.update(f"{name}:{dtype}:{shape}".encode())
        for chunk in reader.chunks(canonical[name]):
            if chunk.numel():
                digest.update(chunk.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
