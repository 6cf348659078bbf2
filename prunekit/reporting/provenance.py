"""Provenance of a run: what produced the artifacts (code, parameters, packages, hardware) and a
sha256 of every artifact file, so that `prunekit audit` can tell later what changed.

Example::

    >>> import tempfile; from pathlib import Path
    >>> root = Path(tempfile.mkdtemp()); (root / "a.txt").write_text("x")
    1
    >>> record = build(root, {"a": root / "a.txt"}, params={})
    >>> audit(record, root)
    []
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "pandas", "scikit-learn",
            "zarr", "dvc", "prefect", "prefect-dask", "dask", "pydantic", "gguf")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_state(root: Path) -> dict:
    """Commit and dirty flag of the git work tree at root; nulls and a reason outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "stderr", None) or str(exc)
        return {"commit": None, "dirty": None, "error": reason.strip().splitlines()[0] if reason.strip() else "git failed"}


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    from prunekit.kernels import native

    info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    info["native_cpu_kernels"] = native.build()
    return info


class _Hasher:
    """sha256 of files, computed once per (device, inode, size, mtime): hard-linked copies of a
    file (the export's hf/ folder) are read once."""

    def __init__(self) -> None:
        self._seen: dict[tuple, str] = {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._seen:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
            self._seen[key] = digest.hexdigest()
        return self._seen[key]


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def hash_artifact(path: Path, root: Path, hasher: _Hasher | None = None) -> dict:
    """{'path': relative path, 'kind': 'file'|'dir', 'files': {relative file: sha256}, 'bytes', 'mtime'}."""
    hasher = hasher or _Hasher()
    files = _files(path)
    mtime = max((f.stat().st_mtime for f in files), default=None)
    return {
        "path": str(path.relative_to(root)),
        "kind": "file" if path.is_file() else "dir",
        "files": {str(f.relative_to(root)): hasher(f) for f in files},
        "bytes": sum(f.stat().st_size for f in files),
        "modified": datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds") if mtime else None,
    }


def build(root: Path, artifacts: dict[str, Path], params: dict, extra: dict | None = None) -> dict:
    """The provenance record of the artifacts (label -> path under root) that exist."""
    root = Path(root).resolve()
    hasher = _Hasher()
    hashed = {}
    present = {label: Path(p).resolve() for label, p in artifacts.items() if Path(p).exists()}
    for label, path in tqdm(present.items(), desc="provenance hashes", unit="artifact", leave=False):
        log.info("hashing %s (%s)", label, path.relative_to(root))
        hashed[label] = hash_artifact(path, root, hasher)
    return {
        "created": _now(),
        "git": git_state(root),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": params,
        "artifacts": hashed,
        "missing": sorted(set(artifacts) - set(present)),
        "versions": versions(),
        "hardware": hardware(),
        **(extra or {}),
    }


def audit(record: dict, root: Path) -> list[str]:
    """Re-hash the artifacts of a provenance record; one line per difference (empty: all match).

    A difference is a recorded file that is missing or whose sha256 changed, or a file that
    appeared inside a recorded folder.
    """
    root = Path(root)
    hasher = _Hasher()
    problems = []
    for label, art in record["artifacts"].items():
        for rel, digest in art["files"].items():
            f = root / rel
            if not f.is_file():
                problems.append(f"missing  {rel}  ({label})")
            elif hasher(f) != digest:
                problems.append(f"changed  {rel}  ({label})")
        folder = root / art["path"]
        if art["kind"] == "dir" and folder.is_dir():
            for f in _files(folder):
                if str(f.relative_to(root)) not in art["files"]:
                    problems.append(f"added    {f.relative_to(root)}  ({label})")
    return problems


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())
