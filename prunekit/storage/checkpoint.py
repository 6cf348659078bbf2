"""Safetensors checkpoints read and written a tensor (or a layer) at a time.

`CheckpointReader` reads tensors of a (sharded) checkpoint folder by name or in row chunks,
`ShardWriter` writes shards one call at a time and names them as `save_pretrained` does,
`TensorFileWriter` writes one safetensors file a tensor at a time (for outputs larger than
memory), and `folder_state_fingerprint` hashes a saved model without loading it whole.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import ConfigError, reading

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
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            with reading(str(index)):
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_FILE).is_file():
            with self._open(SINGLE_FILE) as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise ConfigError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; streaming needs safetensors")

    def _open(self, file: str):
        """safe_open of one file of the folder; a damaged or truncated file -> ConfigError."""
        from safetensors import safe_open

        with reading(f"{self.folder / file} (damaged or truncated? rerun the stage that wrote it)"):
            return safe_open(self.folder / file, "pt")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: tensor} on CPU, each file opened once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with self._open(file) as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def header(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        with self._open(self.weight_map[name]) as f:
            part = f.get_slice(name)
            return _TORCH_DTYPES[part.get_dtype()], tuple(part.get_shape())

    def chunks(self, name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """The tensor as consecutive row blocks of at most ~max_bytes (whole if 0-d or small)."""
        with self._open(self.weight_map[name]) as f:
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
