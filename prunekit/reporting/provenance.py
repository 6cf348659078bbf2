"""Provenance of a run: what produced the artifacts (code, parameters, packages, hardware) and a
sha256 of every artifact file, so that `prunekit audit` can tell later what changed.

Example::

    >>> import tempfile; from pathlib import Path
    >>> root = Path(tempfile.mkdtemp()); (root / "a.txt").write_text("x")
    1
    >>> record = build(root, {"a": root / "a.txt"}, params={})
    >>> record["artifacts"]["a"]["files"]
    {'a.txt': '2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881'}

`prunekit.reporting.audit` judges a run against such a record.
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


FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "amx_tile", "amx_bf16", "asimd", "sve")  # the ones BLAS and the compiled kernels choose paths by


def _cpuinfo() -> dict:
    """CPU model, vendor and the floating-point-relevant flags from /proc/cpuinfo (Linux)."""
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and "cpu" not in info:
            info["cpu"] = value
        elif key == "vendor_id" and "vendor" not in info:
            info["vendor"] = value
        elif key in ("flags", "Features") and "cpu_flags" not in info:
            have = set(value.split())
            info["cpu_flags"] = [f for f in FLAGS if f in have]
    return info


def _torch_build(torch) -> dict:
    """BLAS / LAPACK / oneDNN and the CPU capability torch dispatches to, and its threads."""
    config = torch.__config__.show()
    out: dict = {}
    for line in config.splitlines():
        line = line.strip().lstrip("- ")
        if line.startswith("Build settings:"):
            settings = dict(part.strip().partition("=")[::2] for part in line.split(":", 1)[1].split(", ") if "=" in part)
            out.update({k.lower(): settings[k] for k in ("BLAS_INFO", "LAPACK_INFO") if k in settings})
        elif line.startswith("CPU capability usage:"):
            out["cpu_capability"] = line.split(":", 1)[1].strip()
        elif "Math Kernel Library Version" in line:
            out["mkl"] = line.split("Version", 1)[1].split("-")[0].strip()
        elif line.startswith("Intel(R) MKL-DNN"):
            out["onednn"] = line.split()[2]
    return {**out, "intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads()}


def hardware() -> dict:
    """What changes floating-point results between machines: CPU model and flags, BLAS and
    threads, GPUs, and the build of the compiled CPU kernels (or none)."""
    import torch

    from prunekit.kernels import native

    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), **_cpuinfo(), "torch": _torch_build(torch)}
    info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    info["native_cpu_kernels"] = native.build()
    return info


def machine_line(hw: dict) -> str:
    """One line naming the machine, for reports and runs.csv."""
    gpus = f", {len(hw['cuda'])}x {hw['cuda'][0]}" if hw.get("cuda") else ""
    native = "compiled kernels" if hw.get("native_cpu_kernels") else "PyTorch kernels"
    return f"{hw.get('cpu', hw.get('processor'))} ({hw.get('cpu_count')} CPUs, {native}){gpus}"


class Hasher:
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


def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def hash_artifact(path: Path, root: Path, hasher: Hasher | None = None) -> dict:
    """{'path': relative path, 'kind': 'file'|'dir', 'files': {relative file: sha256}, 'bytes', 'mtime'}."""
    hasher = hasher or Hasher()
    files = files_of(path)
    mtime = max((f.stat().st_mtime for f in files), default=None)
    return {
        "path": str(path.relative_to(root)),
        "kind": "file" if path.is_file() else "dir",
        "files": {str(f.relative_to(root)): hasher(f) for f in files},
        "bytes": sum(f.stat().st_size for f in files),
        "modified": datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds") if mtime else None,
    }


def build(root: Path, artifacts: dict[str, Path], params: dict, extra: dict | None = None,
          machine: dict | None = None) -> dict:
    """The provenance record of the artifacts (label -> path under root) that exist; machine:
    `hardware()` when the caller has it already."""
    root = Path(root).resolve()
    hasher = Hasher()
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
        "hardware": machine or hardware(),
        **(extra or {}),
    }


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())
