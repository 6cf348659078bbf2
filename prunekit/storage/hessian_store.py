"""Hessian cache in a zarr v3 store: one group per decoder layer, one array per distinct input.

Layout::

    <store>.zarr/                       attrs: schema_version, model_fingerprint,
      layer_000/                               calib_fingerprint, dtype, n_layers
        self_attn.q_proj  (d_in, d_in)  one shard; the input of q/k/v
        ...                             group attrs: n_tokens, linears per array,
      layer_001/ ...                    sha256 per array, complete

A layer counts as stored only once its `complete` attribute is written, after all its arrays:
a run killed mid-layer leaves that layer to be recomputed and keeps every finished one.
The fingerprints are the cache key: a store made from another model or calibration set is
refused by readers and wiped by the writer, never silently reused. Every array's sha256 is
checked on read, and by the writer before it keeps a finished layer on resume, so a corrupted
or truncated shard is recomputed by a rerun instead of trusted.

The location is a local path or an fsspec URL (`s3://bucket/h.zarr`, `gs://…`, `memory://…`;
the matching fsspec package, e.g. s3fs or gcsfs, must be installed), so Dask workers on other
machines can read the same store.
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
import zarr

from ..config import ConfigError

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
RECOMPUTE = "`dvc repro -f hessians` (or `python -m stages.hessians`)"


class StoreError(RuntimeError):
    """The store is missing, incomplete, corrupted or belongs to another model/calibration."""


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _not_a_hessian(H: np.ndarray) -> str | None:
    """Why H = (2/N) XᵀX cannot be this array (cheap O(d²) checks), or None."""
    if not np.isfinite(H).all():
        return "holds NaN or inf (activations overflowed, or the store was written wrongly)"
    diag = np.diagonal(H)
    if (diag < 0).any():
        return f"is not positive semi-definite (negative diagonal at input {int(np.argmin(diag))})"
    if np.abs(H - H.T).max() > 1e-3 * max(float(diag.max()), 1e-30):
        return "is not symmetric"
    return None


def _location(path: str | Path) -> str:
    """A local path (also from a file:// URL) or a remote fsspec URL, as a string."""
    path = str(path)
    return path.removeprefix("file://") if path.startswith("file://") else path


def _is_url(location: str) -> bool:
    return "://" in location


def _exists(location: str) -> bool:
    if not _is_url(location):
        return Path(location).exists()
    import fsspec

    fs, root = fsspec.url_to_fs(location)
    return fs.exists(root)


def _remove(location: str) -> None:
    if not _is_url(location):
        import shutil

        shutil.rmtree(location)
        return
    import fsspec

    fs, root = fsspec.url_to_fs(location)
    fs.rm(root, recursive=True)


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


class HessianStore:
    """Open with `open_for_writing` (the hessians stage) or `open_for_reading` (its readers).

    Example::

        >>> store = HessianStore.open_for_writing("memory://doc/h.zarr", "m", "c", n_layers=1, dtype="float32")
        >>> store.write_layer(0, {"q": (torch.eye(4), 16)}, {"q": ["q", "k", "v"]})
        >>> H, n = HessianStore.open_for_reading("memory://doc/h.zarr", "m", "c").read_layer(0)["q"]
        >>> n, torch.equal(H, torch.eye(4))
        (16, True)
    """

    def __init__(self, path: str | Path, root: zarr.Group, verify_finished: bool = False):
        self.location = _location(path)
        self.path = self.location if _is_url(self.location) else Path(self.location)
        self.root, self.verify_finished = root, verify_finished

    def __reduce__(self):
        # Workers reopen the store by its location instead of pickling zarr internals.
        return _reopen, (self.location,)

    @classmethod
    def open_for_writing(cls, path: str | Path, model_fp: str, calib_fp: str, n_layers: int, dtype: str,
                         made_on: str | None = None) -> "HessianStore":
        """Open (or create) a store for these fingerprints, wiping one made from other inputs.

        made_on names the machine that computes it (kept in the attributes; a store from
        another machine with the same inputs is reused as it is, e.g. one pulled from a
        teammate's DVC remote)."""
        location = _location(path)
        key = {"model_fingerprint": model_fp, "calib_fingerprint": calib_fp, "dtype": dtype}
        if _exists(location):
            try:
                attrs = dict(zarr.open_group(location, mode="r").attrs)
            except Exception:  # unreadable: treat like a foreign store
                attrs = {}
            if attrs.get("schema_version") == SCHEMA_VERSION and all(attrs.get(k) == v for k, v in key.items()):
                return cls(location, zarr.open_group(location, mode="r+"), verify_finished=True)
            log.warning("hessian store %s was made from other inputs; recomputing it", location)
            _remove(location)
        root = zarr.open_group(location, mode="w", zarr_format=3)
        root.attrs.update({"schema_version": SCHEMA_VERSION, "n_layers": n_layers, **key,
                           **({"made_on": made_on} if made_on else {})})
        return cls(location, root)

    @classmethod
    def open_for_reading(cls, path: str | Path, model_fp: str, calib_fp: str | None = None) -> "HessianStore":
        """Open a finished store, checking it was made from this model (and calibration)."""
        location = _location(path)
        if not _exists(location):
            raise ConfigError(f"hessian store not found: {location} (run the hessians stage first)")
        try:
            root = zarr.open_group(location, mode="r")
            attrs = dict(root.attrs)
        except Exception as exc:
            raise StoreError(f"{location} is not a readable hessian store ({type(exc).__name__}); "
                             f"delete it and run {RECOMPUTE}") from None
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{location}: schema version {attrs.get('schema_version')} != {SCHEMA_VERSION}; "
                             f"run {RECOMPUTE}")
        if attrs.get("model_fingerprint") != model_fp:
            raise StoreError(f"{location} was computed for another model; run {RECOMPUTE}")
        if calib_fp is not None and attrs.get("calib_fingerprint") != calib_fp:
            raise StoreError(f"{location} was computed from other calibration data; run {RECOMPUTE}")
        store = cls(location, root)
        missing = [i for i in range(attrs["n_layers"]) if not store.has_layer(i)]
        if missing:
            raise StoreError(f"{location} is incomplete: layers {missing} missing; run {RECOMPUTE}")
        return store

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @staticmethod
    def _group_name(layer: int) -> str:
        return f"layer_{layer:03d}"

    def _complete(self, layer: int) -> bool:
        name = self._group_name(layer)
        try:
            return name in self.root and bool(self.root[name].attrs.get("complete", False))
        except Exception:  # a group whose metadata cannot be read is not finished
            return False

    def has_layer(self, layer: int) -> bool:
        """Whether the layer is finished; a writer resuming a run also checks its checksums."""
        done = self._complete(layer)
        if done and self.verify_finished:
            try:
                self.read_layer(layer)
            except StoreError as exc:
                log.warning("recomputing layer %d: %s", layer, exc)
                return False
        return done

    def write_layer(self, layer: int, hessians: dict[str, tuple[torch.Tensor, int]], linears: dict[str, list[str]]) -> None:
        """Store one layer's Hessians {input key: (H, n_tokens)}; `complete` is written last."""
        group = self.root.require_group(self._group_name(layer))
        group.attrs["complete"] = False
        digests, tokens = {}, {}
        for key, (H, n_tokens) in hessians.items():
            data = H.detach().cpu().numpy()
            d = data.shape[0]
            array = group.create_array(
                name=key, shape=data.shape, dtype=data.dtype, chunks=(math.gcd(d, 256), d), shards=data.shape, overwrite=True
            )
            array[...] = data
            digests[key], tokens[key] = _digest(data), n_tokens
        group.attrs.update({"sha256": digests, "n_tokens": tokens, "linears": linears, "complete": True})

    def read_layer(self, layer: int, device: str | torch.device = "cpu") -> dict[str, tuple[torch.Tensor, int]]:
        """{input key: (H, n_tokens)} of one layer, each array checked against its checksum."""
        name = self._group_name(layer)
        if not self._complete(layer):
            raise StoreError(f"{self.location}: layer {layer} is missing or incomplete; run {RECOMPUTE}")
        group = self.root[name]
        fix = f"run {RECOMPUTE} to recompute it (or delete {_join(self.location, name)})"
        out = {}
        for key, expected in group.attrs["sha256"].items():
            try:
                data = group[key][...]
            except Exception as exc:
                raise StoreError(f"{self.location}: layer {layer} array {key} is unreadable "
                                 f"({type(exc).__name__}); {fix}") from None
            if _digest(data) != expected:
                raise StoreError(f"{self.location}: layer {layer} array {key} fails its checksum "
                                 f"(corrupted or truncated); {fix}")
            problem = _not_a_hessian(data)
            if problem:
                raise StoreError(f"{self.location}: layer {layer} array {key} {problem}; {fix}")
            out[key] = (torch.from_numpy(data).to(device), int(group.attrs["n_tokens"][key]))
        return out

    def hessians(self, layer: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """{input key: H} of one layer (`read_layer` without the token counts)."""
        return {key: H for key, (H, _) in self.read_layer(layer, device).items()}


def _reopen(location: str) -> HessianStore:
    return HessianStore(location, zarr.open_group(location, mode="r"))
