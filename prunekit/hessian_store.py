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
refused by readers and wiped by the writer, never silently reused.
"""
from __future__ import annotations

import hashlib
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import zarr

from .config import ConfigError

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


class StoreError(RuntimeError):
    """The store is missing, incomplete, corrupted or belongs to another model/calibration."""


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class HessianStore:
    def __init__(self, path: str | Path, root: zarr.Group):
        self.path, self.root = Path(path), root

    @classmethod
    def open_for_writing(cls, path: str | Path, model_fp: str, calib_fp: str, n_layers: int, dtype: str) -> "HessianStore":
        """Open (or create) a store for these fingerprints, wiping one made from other inputs."""
        path = Path(path)
        key = {"model_fingerprint": model_fp, "calib_fingerprint": calib_fp, "dtype": dtype}
        if path.exists():
            try:
                attrs = dict(zarr.open_group(path, mode="r").attrs)
            except Exception:  # unreadable: treat like a foreign store
                attrs = {}
            if attrs.get("schema_version") == SCHEMA_VERSION and all(attrs.get(k) == v for k, v in key.items()):
                return cls(path, zarr.open_group(path, mode="r+"))
            log.warning("hessian store %s was made from other inputs; recomputing it", path)
            shutil.rmtree(path)
        root = zarr.open_group(path, mode="w", zarr_format=3)
        root.attrs.update({"schema_version": SCHEMA_VERSION, "n_layers": n_layers, **key})
        return cls(path, root)

    @classmethod
    def open_for_reading(cls, path: str | Path, model_fp: str, calib_fp: str | None = None) -> "HessianStore":
        """Open a finished store, checking it was made from this model (and calibration)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"hessian store not found: {path} (run the hessians stage first)")
        root = zarr.open_group(path, mode="r")
        attrs = dict(root.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{path}: schema version {attrs.get('schema_version')} != {SCHEMA_VERSION}")
        if attrs.get("model_fingerprint") != model_fp:
            raise StoreError(f"{path} was computed for another model; rerun the hessians stage")
        if calib_fp is not None and attrs.get("calib_fingerprint") != calib_fp:
            raise StoreError(f"{path} was computed from other calibration data; rerun the hessians stage")
        store = cls(path, root)
        missing = [i for i in range(attrs["n_layers"]) if not store.has_layer(i)]
        if missing:
            raise StoreError(f"{path} is incomplete: layers {missing} missing; rerun the hessians stage")
        return store

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @staticmethod
    def _group_name(layer: int) -> str:
        return f"layer_{layer:03d}"

    def has_layer(self, layer: int) -> bool:
        name = self._group_name(layer)
        return name in self.root and bool(self.root[name].attrs.get("complete", False))

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
        if not self.has_layer(layer):
            raise StoreError(f"{self.path}: layer {layer} is missing or incomplete; rerun the hessians stage")
        group = self.root[name]
        out = {}
        for key, expected in group.attrs["sha256"].items():
            try:
                data = group[key][...]
            except Exception as exc:
                raise StoreError(
                    f"{self.path}: layer {layer} array {key} is unreadable ({exc}); "
                    f"delete {self.path / name} and rerun the hessians stage"
                ) from None
            if _digest(data) != expected:
                raise StoreError(
                    f"{self.path}: layer {layer} array {key} fails its checksum; "
                    f"delete {self.path / name} and rerun the hessians stage"
                )
            out[key] = (torch.from_numpy(data).to(device), int(group.attrs["n_tokens"][key]))
        return out
