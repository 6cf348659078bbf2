"""Fingerprints and atomic writes: how artifacts say what they were made from."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (dicts sorted by key), or of raw bytes/str."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            digest.update(part)
        elif isinstance(part, str):
            digest.update(part.encode("utf-8"))
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def folder_fingerprint(folder: str | Path, pattern: str = "*") -> str:
    """Hash of every file's name and content under a folder (sorted, recursive)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob(pattern) if p.is_file())
    return fingerprint(*[f"{p.relative_to(folder)}:{sha256_file(p)}" for p in files])


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file so that a reader never sees it half-written: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp: str | Path, out_dir: str | Path) -> None:
    """Move a finished folder `tmp` to `out_dir` so that `out_dir` is never partial.

    The old folder is renamed aside first (deleting it in place could be cut short by a kill and
    leave a partial folder that looks finished); in between `out_dir` is absent, never partial.
    """
    import shutil

    tmp, out_dir = Path(tmp), Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def state_fingerprint(module) -> str:
    """Hash of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]
