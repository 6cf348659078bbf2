"""The zarr Hessian store: round trip, resume, cache keys, corruption."""
import pytest
import torch
import zarr

from prunekit.config import ConfigError
from prunekit.storage.hessian_store import HessianStore, StoreError


def _layer(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(8, 8, generator=g), torch.randn(12, 12, generator=g)
    return {"q": (a @ a.T, 100), "down": (b @ b.T, 100)}


def test_round_trip_and_attrs(tmp_path):
    path = tmp_path / "h.zarr"
    store = HessianStore.open_for_writing(path, "m1", "c1", n_layers=2, dtype="float32")
    for i in range(2):
        store.write_layer(i, _layer(i), {"q": ["q", "k"], "down": ["down"]})
    assert zarr.open_group(path).metadata.zarr_format == 3
    read = HessianStore.open_for_reading(path, "m1", "c1")
    for i in range(2):
        for key, (h, n) in _layer(i).items():
            got, got_n = read.read_layer(i)[key]
            assert torch.equal(got, h) and got_n == n
    assert read.attrs["model_fingerprint"] == "m1"


def test_incomplete_store_resumes_and_is_refused_by_readers(tmp_path):
    path = tmp_path / "h.zarr"
    HessianStore.open_for_writing(path, "m1", "c1", 2, "float32").write_layer(0, _layer(0), {})
    with pytest.raises(StoreError, match=r"incomplete: layers \[1\]"):
        HessianStore.open_for_reading(path, "m1", "c1")
    again = HessianStore.open_for_writing(path, "m1", "c1", 2, "float32")
    assert again.has_layer(0) and not again.has_layer(1)


def test_fingerprints_are_the_cache_key(tmp_path):
    path = tmp_path / "h.zarr"
    HessianStore.open_for_writing(path, "m1", "c1", 1, "float32").write_layer(0, _layer(0), {})
    with pytest.raises(StoreError, match="another model"):
        HessianStore.open_for_reading(path, "m2", "c1")
    with pytest.raises(StoreError, match="other calibration"):
        HessianStore.open_for_reading(path, "m1", "c2")
    fresh = HessianStore.open_for_writing(path, "m2", "c1", 1, "float32")  # wiped, not reused
    assert not fresh.has_layer(0)
    with pytest.raises(ConfigError, match="not found"):
        HessianStore.open_for_reading(tmp_path / "none.zarr", "m1")


def test_corrupted_array_names_the_layer(tmp_path):
    path = tmp_path / "h.zarr"
    store = HessianStore.open_for_writing(path, "m1", "c1", 1, "float32")
    store.write_layer(0, _layer(0), {})
    zarr.open_group(path, mode="r+")["layer_000"]["q"][0, 0] = 123.0
    with pytest.raises(StoreError, match="layer 0 array q fails its checksum"):
        HessianStore.open_for_reading(path, "m1", "c1").read_layer(0)


def test_truncated_shard_names_the_layer_and_the_fix(tmp_path):
    path = tmp_path / "h.zarr"
    store = HessianStore.open_for_writing(path, "m1", "c1", 2, "float32")
    for i in range(2):
        store.write_layer(i, _layer(i), {})
    shard = path / "layer_001" / "down" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:7])
    reader = HessianStore.open_for_reading(path, "m1", "c1")
    reader.read_layer(0)
    with pytest.raises(StoreError, match=r"layer 1 array down .*run `dvc repro -f hessians`.*layer_001"):
        reader.read_layer(1)
    # The writer, resuming, does not trust the damaged layer: it is recomputed, the good one kept.
    again = HessianStore.open_for_writing(path, "m1", "c1", 2, "float32")
    assert again.has_layer(0) and not again.has_layer(1)


@pytest.mark.parametrize("change, message", [(lambda H: H.fill_diagonal_(float("nan")), "holds NaN or inf"),
                                             (lambda H: -H, "not positive semi-definite"),
                                             (lambda H: H + torch.triu(H, 1), "not symmetric")])
def test_values_that_are_no_hessian_are_refused(tmp_path, change, message):
    path = tmp_path / "h.zarr"
    layer = _layer(0)
    layer["q"] = (change(layer["q"][0].clone()), 100)
    HessianStore.open_for_writing(path, "m1", "c1", 1, "float32").write_layer(0, layer, {})
    with pytest.raises(StoreError, match=f"layer 0 array q .*{message}"):
        HessianStore.open_for_reading(path, "m1", "c1").read_layer(0)


def test_dtype_is_part_of_the_key(tmp_path):
    path = tmp_path / "h.zarr"
    HessianStore.open_for_writing(path, "m1", "c1", 1, "float32").write_layer(0, _layer(0), {})
    assert not HessianStore.open_for_writing(path, "m1", "c1", 1, "float64").has_layer(0)


def test_fsspec_url_and_pickling():
    """A remote store (here fsspec's in-memory filesystem) works like a local one, and a pickled
    store (what a Dask worker receives) reopens itself by its location."""
    import pickle

    url = "memory://prunekit-test/h.zarr"
    store = HessianStore.open_for_writing(url, "m1", "c1", 1, "float32")
    store.write_layer(0, _layer(0), {"q": ["q"]})
    reader = pickle.loads(pickle.dumps(HessianStore.open_for_reading(url, "m1", "c1")))
    assert torch.equal(reader.read_layer(0)["q"][0], _layer(0)["q"][0])
    with pytest.raises(StoreError, match="another model"):
        HessianStore.open_for_reading(url, "m2")
    assert not HessianStore.open_for_writing(url, "m2", "c1", 1, "float32").has_layer(0)  # wiped remotely too


@pytest.mark.parametrize("noise,verdict", [(0.0, "identical"), (1e-7, "within tolerance"), (1e-2, "different")])
def test_audit_compares_stores_by_their_arrays(tmp_path, noise, verdict):
    """Two stores of the same inputs whose Hessians differ by `noise` (relative): the audit of
    one against the other's record and files judges the arrays, not the chunk bytes."""
    from prunekit.reporting.audit import audit
    from prunekit.reporting.provenance import build

    for name, scale in (("a", 0.0), ("b", noise)):
        store = HessianStore.open_for_writing(tmp_path / name / "h.zarr", "m1", "c1", 2, "float32", made_on="here")
        for i in range(2):
            layer = {k: (h * (1 + scale * torch.randn(h.shape, generator=torch.Generator().manual_seed(i))), n)
                     for k, (h, n) in _layer(i).items()}
            store.write_layer(i, layer, {"q": ["q"], "down": ["down"]})
    record = build(tmp_path / "a", {"hessians": tmp_path / "a" / "h.zarr"}, params={})
    [result] = audit(record, tmp_path / "b", against=tmp_path / "a")
    assert result.status == verdict, result.line()
    assert HessianStore.open_for_reading(tmp_path / "b" / "h.zarr", "m1", "c1").attrs["made_on"] == "here"
