"""Evolutionary schedule search on tiny models: budget, determinism, monotone fitness."""
import numpy as np
import pytest
import torch

from prunekit.allocation.search import LevelDatabase, evolve, levels_around, snap_schedule
from prunekit.config import ConfigError, SearchParams
from prunekit.forward.layerwise import LayerwiseRunner
from prunekit.forward.scoring import perplexity
from prunekit.forward.sources import InMemoryModel
from prunekit.models import adapter_for, load_model, prunable_parameters

CPU = torch.device("cpu")


def _windows(n=4, seqlen=32, seed=0):
    windows = torch.randint(3, 500, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    windows[:, 0] = 1
    return windows


@pytest.fixture(scope="module")
def setup(tiny_models):
    model = load_model(str(tiny_models["llama"]))
    adapter = adapter_for(model)
    windows = _windows()
    runner = LayerwiseRunner(model, adapter, windows, CPU)
    hessians = {i: {k: a.H for k, a in runner.hessians(i, advance=True).items()} for i in range(len(runner))}
    levels = levels_around(0.6, 0.1, 0.3, 0.9)
    db = LevelDatabase.build(model, adapter, hessians.__getitem__, levels)
    return model, adapter, windows, db


def test_levels_are_centred_on_the_target_and_bounded():
    assert levels_around(0.7, 0.05, 0.4, 0.95).tolist() == pytest.approx(
        [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    assert levels_around(0.6, 0.25, 0.3, 0.9).tolist() == pytest.approx([0.35, 0.6, 0.85])
    with pytest.raises(ConfigError):
        levels_around(0.99, 0.05, 0.4, 0.95)


def test_database_levels_have_their_sparsity(setup):
    model, adapter, _, db = setup
    for k, s in enumerate(db.levels):
        w = db.weights[0]["mlp.down_proj"][k]
        assert float((w == 0).float().mean()) == pytest.approx(s, abs=1 / w.shape[1])


@pytest.mark.parametrize("unit", ["block", "linear"])
def test_search_keeps_budget_improves_fitness_and_restores_weights(setup, unit):
    model, adapter, windows, db = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evolve(model, adapter, db, windows, 0.6, SearchParams(generations=6, offspring=6, survivors=2, unit=unit))
    params = prunable_parameters(model, adapter)
    achieved = sum(result.sparsity[k] * n for k, n in params.items()) / sum(params.values())
    assert achieved == pytest.approx(0.6, abs=1e-9)
    assert set(result.sparsity.values()) <= set(db.levels.tolist())
    assert result.fitness < result.uniform_fitness  # six generations find a better schedule than uniform
    assert result.history["accepted"].any()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_search_is_deterministic(setup):
    model, adapter, windows, db = setup
    spec = SearchParams(generations=4, offspring=5, survivors=2, seed=3, unit="block")
    a, b = (evolve(model, adapter, db, windows, 0.6, spec) for _ in range(2))
    assert a.sparsity == b.sparsity and a.fitness == b.fitness


def _full_model_log_probs(model, windows):
    """Next-token log-probabilities of positions 0..seqlen-2 from the model's own forward."""
    with torch.no_grad():
        return torch.log_softmax(model(windows).logits[:, :-1].float(), -1)


@pytest.mark.parametrize("fitness", ["nll", "kl"])
def test_fitness_is_that_of_the_schedule_applied(setup, fitness):
    """The reported fitness equals the NLL (or the KL from the dense model) of the whole model
    with the found levels' weights, computed by the model's own forward, not the search's loop."""
    model, adapter, windows, db = setup
    dense = _full_model_log_probs(model, windows)
    result = evolve(model, adapter, db, windows, 0.6, SearchParams(generations=3, offspring=4, survivors=2,
                                                                  fitness=fitness, unit="block"))
    layers = model.get_submodule(adapter.layers)
    originals = {}
    for key, s in result.sparsity.items():
        layer, name = key.split(".", 1)
        linear = layers[int(layer)].get_submodule(name)
        originals[key] = linear.weight.data
        linear.weight.data = db.weights[int(layer)][name][int(np.flatnonzero(np.isclose(db.levels, s))[0])]
    pruned = _full_model_log_probs(model, windows)
    nll = perplexity(InMemoryModel(model), windows)["nll"]  # the evaluator's NLL
    for key, weight in originals.items():
        layer, name = key.split(".", 1)
        layers[int(layer)].get_submodule(name).weight.data = weight
    expected = nll if fitness == "nll" else float((dense.exp() * (dense - pruned)).sum(-1).mean())
    assert expected == pytest.approx(result.fitness, rel=1e-5)


def test_target_off_the_grid_is_refused(setup):
    model, adapter, windows, db = setup
    with pytest.raises(ConfigError, match="not a level"):
        evolve(model, adapter, db, windows, 0.65, SearchParams(generations=1, unit="block"))


def test_sequential_database_follows_the_pruned_prefix(setup, tiny_models):
    """Layer 0 sees dense inputs either way; later layers are fitted to the uniformly pruned prefix,
    which is what sequential pruning at the target computes."""
    from prunekit.compression.prune import prune_model
    from prunekit.config import PruneParams

    model, adapter, windows, dense_db = setup
    along = LevelDatabase.build_along(LayerwiseRunner(model, adapter, windows, CPU), dense_db.levels, 0.6)
    k = int(np.flatnonzero(np.isclose(along.levels, 0.6))[0])
    assert all(torch.equal(a, b) for a, b in zip(along.weights[0]["mlp.up_proj"], dense_db.weights[0]["mlp.up_proj"]))
    assert not torch.equal(along.weights[1]["mlp.up_proj"][k], dense_db.weights[1]["mlp.up_proj"][k])
    pruned = load_model(str(tiny_models["llama"]))
    keys = list(prunable_parameters(pruned, adapter))
    prune_model(InMemoryModel(pruned), dict.fromkeys(keys, 0.6), PruneParams(sparsity=0.6),
                runner=LayerwiseRunner(pruned, adapter, windows, CPU))
    layers = pruned.get_submodule(adapter.layers)
    for i, per_linear in along.weights.items():
        for name, per_level in per_linear.items():
            assert torch.allclose(per_level[k], layers[i].get_submodule(name).weight, atol=1e-6)


def test_a_given_schedule_snaps_to_levels_within_budget(setup):
    from prunekit.allocation.search import _snap, _Units

    model, adapter, _, db = setup
    layers = model.get_submodule(adapter.layers)
    units = _Units(adapter, layers, "block")
    centre = int(np.flatnonzero(np.isclose(db.levels, 0.6))[0])
    n = len(layers)
    init = {f"{i}.{name}": 0.6 + (0.13 if i == 0 else -0.13 / (n - 1)) for i in range(n) for name in adapter.linears}
    k = _snap(init, units, db.levels, centre)
    assert db.levels[k[0]] == pytest.approx(0.7)  # 0.73 snaps to the 0.7 level
    assert k.sum() == centre * n  # equal-size blocks: the budget is exact


def _nll_with(model, adapter, db, windows, sparsity):
    """Calibration NLL of the model with each linear swapped for its level's database weights."""
    layers = model.get_submodule(adapter.layers)
    originals = {}
    for key, s in sparsity.items():
        i, name = key.split(".", 1)
        linear = layers[int(i)].get_submodule(name)
        originals[linear] = linear.weight.data
        linear.weight.data = db.weights[int(i)][name][int(np.flatnonzero(np.isclose(db.levels, s))[0])]
    try:
        return perplexity(InMemoryModel(model), windows)["nll"]
    finally:
        for linear, weight in originals.items():
            linear.weight.data = weight


def test_search_starts_from_the_better_of_uniform_and_the_given_schedule(setup):
    model, adapter, windows, db = setup
    params = prunable_parameters(model, adapter)
    layers = sorted({int(k.split(".")[0]) for k in params})
    spec = SearchParams(generations=0, unit="block")
    for first in (0.9, 0.3):  # the first block pruned far more / far less than the rest
        init = {k: first if int(k.split(".")[0]) == layers[0] else 0.6 - (first - 0.6) / (len(layers) - 1)
                for k in params}
        given = _nll_with(model, adapter, db, windows, snap_schedule(init, model, adapter, db.levels, 0.6, "block"))
        result = evolve(model, adapter, db, windows, 0.6, spec, init=init)
        assert result.fitness == pytest.approx(min(result.uniform_fitness, given), rel=1e-6)
        achieved = sum(result.sparsity[k] * n for k, n in params.items()) / sum(params.values())
        assert achieved == pytest.approx(0.6, abs=1e-9)


def test_database_along_a_schedule_is_what_sequential_pruning_gives(setup, tiny_models):
    """Built along a non-uniform schedule (snapped to the grid, budget kept), the database holds at
    each linear's own level exactly the weights that sequential pruning with that schedule gives,
    so the schedule scores as the model it would produce."""
    from prunekit.compression.prune import prune_model
    from prunekit.config import PruneParams

    model, adapter, windows, dense_db = setup
    params = prunable_parameters(model, adapter)
    n = len(model.get_submodule(adapter.layers))
    init = {k: 0.6 + (0.25 if int(k.split(".")[0]) == n - 1 else -0.25 / (n - 1)) for k in params}
    schedule = snap_schedule(init, model, adapter, dense_db.levels, 0.6)
    assert len(set(schedule.values())) > 1
    assert sum(schedule[k] * p for k, p in params.items()) / sum(params.values()) == pytest.approx(0.6, abs=1e-9)
    along = LevelDatabase.build_along(LayerwiseRunner(model, adapter, windows, CPU), dense_db.levels, schedule)
    pruned = load_model(str(tiny_models["llama"]))
    prune_model(InMemoryModel(pruned), schedule, PruneParams(sparsity=0.6), runner=LayerwiseRunner(pruned, adapter, windows, CPU))
    layers = pruned.get_submodule(adapter.layers)
    for key, s in schedule.items():
        i, name = key.split(".", 1)
        k = int(np.flatnonzero(np.isclose(along.levels, s))[0])
        assert torch.allclose(along.weights[int(i)][name][k], layers[int(i)].get_submodule(name).weight, atol=1e-6)
    with pytest.raises(ConfigError, match="not a level"):
        LevelDatabase.build_along(LayerwiseRunner(model, adapter, windows, CPU), dense_db.levels,
                                  {**schedule, next(iter(schedule)): 0.65})


def test_search_rounds_rescore_the_found_schedule_exactly(setup, tiny_models):
    """Each round rebuilds the database along the schedule found so far: the round starts from that
    schedule's exact score, the calibration NLL of the model that sequential pruning with it gives."""
    from prunekit.allocation.search import search_schedule
    from prunekit.compression.prune import prune_model
    from prunekit.config import PruneParams

    model, adapter, windows, db = setup
    spec = SearchParams(generations=3, offspring=4, survivors=2, unit="block", step=0.1, span=0.3, fit_windows=3)
    result = search_schedule(model, adapter, windows, 0.6, spec.model_copy(update={"rounds": (2, 2)}), lo=0.3, hi=0.9)
    assert result.levels == pytest.approx(db.levels.tolist())
    assert [r["generations"] for r in result.rounds] == [3, 2, 2]
    assert result.fitness == result.rounds[-1]["fitness"] <= result.rounds[-1]["start"]
    assert list(result.history["round"].unique()) == [0, 1, 2]
    # the last round's start is the schedule that round 2 found, scored on its own database
    previous = result.history[result.history["round"] == 1]["fitness"].iloc[-1]
    again = search_schedule(model, adapter, windows, 0.6, spec.model_copy(update={"rounds": (2,)}), lo=0.3, hi=0.9)
    assert again.rounds[1]["fitness"] == pytest.approx(previous)
    pruned = load_model(str(tiny_models["llama"]))
    prune_model(InMemoryModel(pruned), again.sparsity, PruneParams(sparsity=0.6),
                runner=LayerwiseRunner(pruned, adapter, windows, CPU))
    assert perplexity(InMemoryModel(pruned), windows[:3])["nll"] == pytest.approx(result.rounds[2]["start"], rel=1e-5)
    params = prunable_parameters(model, adapter)
    achieved = sum(result.sparsity[k] * n for k, n in params.items()) / sum(params.values())
    assert achieved == pytest.approx(0.6, abs=1e-9)


def test_search_rounds_need_the_sequential_database(setup):
    from prunekit.allocation.search import search_schedule

    model, adapter, windows, db = setup
    with pytest.raises(ConfigError, match="sequential"):
        search_schedule(model, adapter, windows, 0.6, SearchParams.model_construct(database="dense", rounds=(1,)),
                        hessian_of=lambda i: {})
    with pytest.raises(ValueError, match="sequential"):
        SearchParams(database="dense", rounds=(5,))
    with pytest.raises(ValueError, match=">= 0"):
        SearchParams(rounds=(-1,))


def test_a_non_finite_fitness_stops_the_search_naming_the_layer(setup):
    """A level whose weights overflow (here: inf in layer 1's down projection at the target) is
    not scored as a result: one NonFiniteError names the first decoder layer with a non-finite
    output, and the model's weights are restored."""
    from prunekit.config import NonFiniteError

    model, adapter, windows, db = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    k = int(np.flatnonzero(np.isclose(db.levels, 0.6))[0])
    weights = {i: {n: list(ws) for n, ws in layer.items()} for i, layer in db.weights.items()}
    weights[1]["mlp.down_proj"][k] = torch.full_like(weights[1]["mlp.down_proj"][k], float("inf"))
    broken = LevelDatabase(db.levels, weights)
    with pytest.raises(NonFiniteError, match=r"the search's nll of a schedule is nan: decoder layer 1's output"):
        evolve(model, adapter, broken, windows, 0.6, SearchParams(generations=1, offspring=2, survivors=1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
