"""Measured sensitivity curves on tiny models, and the allocators built on them."""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import CONFIGS, full_forward_nll

from prunekit.allocation.sensitivity import allocate_measured, allocate_ranked, block_sensitivity
from prunekit.config import ConfigError
from prunekit.forward.layerwise import LayerwiseRunner
from prunekit.models import adapter_for, decoder_layers, load_model, prunable_parameters

CPU = torch.device("cpu")


def _windows(n=3, seqlen=40, seed=0):
    windows = torch.randint(3, 500, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    windows[:, 0] = 1
    return windows


def _dense_hessians(model, adapter, windows):
    runner = LayerwiseRunner(model, adapter, windows, CPU)
    return {i: {k: a.H for k, a in runner.hessians(i, advance=True).items()} for i in range(len(runner))}


@pytest.fixture(scope="module")
def trained_llama(tiny_models):
    """The tiny llama after memorising a few windows, so pruning has something to destroy."""
    torch.manual_seed(0)
    model = load_model(str(tiny_models["llama"]))
    windows = _windows(4, 48)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model(input_ids=windows, labels=windows).loss.backward()
        optimizer.step()
    model.eval()
    return model, windows


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_block_to_end_path_at_sparsity_zero_equals_full_model_nll(model_type, tiny_models):
    model = load_model(str(tiny_models[model_type]))
    if model_type == "gemma3_text":
        model.config.final_logit_softcapping = 3.0  # exercise the soft-capping branch
    adapter = adapter_for(model)
    windows = _windows()
    curves = block_sensitivity(model, adapter, windows, _dense_hessians(model, adapter, windows), (0.0,),
                               chunk_tokens=16)
    full = full_forward_nll(model, windows)
    assert abs(curves.attrs["dense_nll"] - full) < 1e-5
    assert len(curves) == len(decoder_layers(model, adapter))
    assert curves["delta_nll"].abs().max() < 1e-5


@pytest.mark.parametrize("unit", ["block", "half"])
def test_curves_are_finite_rise_with_sparsity_and_leave_weights_untouched(unit, trained_llama):
    model, windows = trained_llama
    adapter = adapter_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curves = block_sensitivity(model, adapter, windows, _dense_hessians(model, adapter, windows), (0.3, 0.6, 0.9),
                               unit=unit, chunk_tokens=32)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    n_units = 3 if unit == "block" else 6
    assert len(curves) == n_units * 3 and curves["unit"].nunique() == n_units
    assert np.isfinite(curves["delta_nll"]).all()
    mean = curves.groupby("sparsity")["delta_nll"].mean()
    assert mean.is_monotonic_increasing and mean[0.9] > 0.1
    assert (curves.loc[curves.sparsity == 0.9, "delta_nll"] > -1e-3).all()

    params = prunable_parameters(model, adapter)
    units = curves.drop_duplicates("unit")
    assert units["params"].sum() == sum(params.values())
    assert sorted(f"{layer}.{name}" for layer, names in zip(units["layer"], units["linears"])
                  for name in names.split(",")) == sorted(params)

    sparsity = allocate_measured(curves, 0.7, 0.4, 0.95)
    assert sparsity.keys() == params.keys()
    mean_sparsity = sum(sparsity[k] * n for k, n in params.items()) / sum(params.values())
    assert abs(mean_sparsity - 0.7) < 1e-9


def _synthetic(scales, params, grid=(0.5, 0.6, 0.7, 0.8, 0.9), power=3.0):
    """Convex curves Δ_u(s) = scale_u · s^power, one single-linear unit per layer."""
    return pd.DataFrame([{"unit": str(u), "layer": u, "linears": "fc", "params": n, "sparsity": s,
                          "delta_nll": scale * s ** power}
                         for u, (scale, n) in enumerate(zip(scales, params)) for s in grid])


def _mean(sparsity, params):
    return sum(sparsity[f"{u}.fc"] * n for u, n in enumerate(params)) / sum(params)


@pytest.mark.parametrize("target", [0.5, 0.7, 0.8])
def test_measured_allocation_hits_target_within_bounds_and_is_deterministic(target):
    rng = np.random.default_rng(0)
    scales, params = np.exp(rng.normal(0, 1, 12)), rng.integers(1, 5, 12) * 1000
    curves = _synthetic(scales, params)
    a, b = allocate_measured(curves, target, 0.4, 0.95), allocate_measured(curves, target, 0.4, 0.95)
    assert a == b
    assert abs(_mean(a, params) - target) < 1e-9
    assert all(0.4 <= s <= 0.95 for s in a.values())
    assert len({round(s, 12) for s in a.values()}) > 1


def test_measured_allocation_prunes_the_flatter_curve_more():
    sparsity = allocate_measured(_synthetic([0.1, 1.0], [1000, 1000]), 0.7, 0.4, 0.95)
    assert sparsity["0.fc"] > 0.7 > sparsity["1.fc"]


def test_measured_allocation_is_optimal_against_brute_force():
    """Convex curves: the greedy hull allocation matches a fine grid search of Σ Δ_u."""
    scales, params = [0.3, 1.0, 2.5], [1000, 2000, 1500]
    grid = (0.5, 0.6, 0.7, 0.8, 0.9)
    curves = _synthetic(scales, params, grid, power=4.0)
    lo, hi, target = 0.5, 0.9, 0.7

    def loss(s):
        return sum(np.interp(x, [0, *grid], [0, *(c * np.array(grid) ** 4)]) for x, c in zip(s, scales))

    got = allocate_measured(curves, target, lo, hi)
    best = np.inf
    for s0, s1 in itertools.product(np.linspace(lo, hi, 401), repeat=2):
        s2 = (target * sum(params) - params[0] * s0 - params[1] * s1) / params[2]
        if lo <= s2 <= hi:
            best = min(best, loss([s0, s1, s2]))
    assert loss([got[f"{u}.fc"] for u in range(3)]) <= best + 1e-9


def test_measured_allocation_extrapolates_and_handles_noisy_curves():
    curves = _synthetic([1.0, 1.0, 1.0], [1, 1, 1])
    curves.loc[(curves.unit == "1") & (curves.sparsity == 0.6), "delta_nll"] = -0.5  # non-convex, negative
    sparsity = allocate_measured(curves, 0.9, 0.4, 0.99)
    assert abs(_mean(sparsity, [1, 1, 1]) - 0.9) < 1e-9 and max(sparsity.values()) <= 0.99
    with pytest.raises(ConfigError, match="outside"):
        allocate_measured(curves, 0.97, 0.4, 0.95)
    curves.loc[0, "delta_nll"] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        allocate_measured(curves, 0.7, 0.4, 0.95)


def test_ranked_allocation_spreads_by_rank_and_hits_target():
    scales = [5.0, 0.1, 1.0, 0.5, 2.0]
    equal = allocate_ranked(_synthetic(scales, [1000] * 5), 0.7, 0.2, 0.8, 0.4, 0.95)
    expected = {1: 0.9, 3: 0.8, 2: 0.7, 4: 0.6, 0: 0.5}  # least sensitive first
    assert all(abs(equal[f"{u}.fc"] - s) < 1e-12 for u, s in expected.items())

    params = [1000, 3000, 2000, 1000, 500]
    weighted = allocate_ranked(_synthetic(scales, params), 0.8, 0.2, 0.8, 0.4, 0.95)
    assert weighted == allocate_ranked(_synthetic(scales, params), 0.8, 0.2, 0.8, 0.4, 0.95)
    assert abs(_mean(weighted, params) - 0.8) < 1e-9
    assert all(0.4 <= s <= 0.95 for s in weighted.values())
    order = sorted(range(5), key=lambda u: scales[u])
    assert [weighted[f"{u}.fc"] for u in order] == sorted(weighted.values(), reverse=True)


def test_a_non_finite_loss_stops_the_measurement_naming_the_layer(tiny_models):
    """Weights that overflow an activation (layer 1's MLP input norm scaled to 1e30, finite itself)
    give no curve: NonFiniteError names decoder layer 1 (here in the dense model's NLL, the first
    loss measured)."""
    from prunekit.config import NonFiniteError

    model = load_model(str(tiny_models["llama"]))
    adapter = adapter_for(model)
    windows = _windows()
    hessians = _dense_hessians(model, adapter, windows)
    norm = decoder_layers(model, adapter)[1].post_attention_layernorm.weight
    with torch.no_grad():
        norm.mul_(1e30)
    with pytest.raises(NonFiniteError, match=r"the dense model's calibration NLL is nan: decoder layer 1's output"):
        block_sensitivity(model, adapter, windows, hessians, (0.5,), chunk_tokens=16)
