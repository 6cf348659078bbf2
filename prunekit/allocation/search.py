"""Evolutionary search of per-unit sparsity levels, scored by calibration loss.

Layer-local loss estimates do not say what the model's output feels, and one-block-at-a-time
sensitivity ignores how errors of many pruned blocks interact. So we score whole schedules:

1. Level database: every decoder linear pruned with SparseGPT on its *dense* Hessian at every
   level of a sparsity grid centred on the target (target ± k·step, within [lo, hi]). One
   factorisation per shared input serves all levels.
2. Fitness of a schedule (a level per unit): the model's mean next-token NLL on calibration
   windows with each unit's linears swapped for the database weights of its level (pointer
   swaps, no copies); or (fitness "kl", as EvoPress) the mean KL divergence of its next-token
   distributions from the dense model's, which scores every vocabulary entry, not only the
   token that happened to follow. On CUDA the scoring uses TF32 matmuls.
3. Search (after EvoPress, Sieberling et al. 2024): from the uniform schedule, each generation
   makes `offspring` children by moving one unit up a level and another of the same size down
   one (1..`max_mutations` such moves), so the parameter-weighted sparsity stays exactly the
   target; children are ranked on the first `screen_windows` windows, the best `survivors`
   are scored on all fitness windows, and the best replaces the parent if it is better.

Only calibration windows are ever scored: the evaluation texts play no part. The result is a
per-linear schedule; the prune stage then prunes with it as usual (sequentially by default).

Example::

    >>> db = LevelDatabase.build(model, adapter, hessian_of, levels_around(0.7, 0.05, 0.4, 0.95))
    >>> result = evolve(model, adapter, db, calib[:8], 0.7, SearchParams(generations=100))
    >>> result.sparsity   # {'0.self_attn.q_proj': 0.65, ...}
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import kernels
from ..config import ConfigError, SearchParams
from ..forward.head import OutputHead
from ..forward.layerwise import LayerwiseRunner
from ..forward.scoring import require_finite, window_scores
from ..models import Adapter, decoder_layers
from ..steps import Step, call

log = logging.getLogger(__name__)


def levels_around(target: float, step: float, lo: float, hi: float) -> np.ndarray:
    """The sparsity grid target + k·step (k integer) inside [lo, hi], target included."""
    if step <= 0:
        raise ConfigError(f"level step must be positive, got {step}")
    if not lo <= target <= hi:
        raise ConfigError(f"target sparsity {target} lies outside [{lo}, {hi}]")
    below = np.arange(-int(np.floor((target - lo) / step + 1e-9)), 0)
    above = np.arange(0, int(np.floor((hi - target) / step + 1e-9)) + 1)
    return np.round(target + step * np.concatenate([below, above]), 10)


@dataclass
class LevelDatabase:
    """weights[layer][linear][k]: that linear pruned (SparseGPT, dense Hessian) to levels[k]."""

    levels: np.ndarray
    weights: dict[int, dict[str, list[torch.Tensor]]]

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, adapter: Adapter, hessian_of: Callable[[int], dict[str, torch.Tensor]],
              levels: np.ndarray, *, percdamp: float = 0.01, blocksize: int = 128,
              store_dtype: torch.dtype | None = None) -> "LevelDatabase":
        """Prune every linear of `model` (left unchanged) at every level, on dense Hessians.

        hessian_of(i) gives layer i's dense Hessians {group key: H}; store_dtype (default: the
        weights' own) may be lower to halve the database's memory.
        """
        weights = {i: _prune_levels(layer, adapter, hessian_of(i), levels, percdamp, blocksize, store_dtype)
                   for i, layer in enumerate(tqdm(decoder_layers(model, adapter), desc="level database", unit="layer"))}
        return cls(np.asarray(levels, dtype=float), weights)

    @classmethod
    @torch.no_grad()
    def build_along(cls, runner: LayerwiseRunner, levels: np.ndarray, along: float | dict[str, float], *,
                    percdamp: float = 0.01, blocksize: int = 128,
                    store_dtype: torch.dtype | None = None) -> "LevelDatabase":
        """Like `build`, but layer i's Hessians come from the inputs that layers < i produce when
        pruned along a schedule (the sequential trajectory): `along` is a level of the grid (every
        linear pruned to it) or a per-linear schedule on the grid ('<layer>.<linear>': sparsity).
        Every level of a layer is then fitted to a pruned prefix, as it will be when a schedule
        near `along` is pruned sequentially; the schedule `along` itself scores exactly as the
        model that sequential pruning gives. The runner's model is restored afterwards; its
        activations are consumed.
        """
        def level_of(i: int, name: str) -> int:
            s = along if isinstance(along, float | int) else along[f"{i}.{name}"]
            match = np.flatnonzero(np.isclose(levels, s, atol=1e-9))
            if not len(match):
                raise ConfigError(f"sparsity {s} of {i}.{name} is not a level of {np.asarray(levels).tolist()}")
            return int(match[0])

        weights = {}
        for i in tqdm(range(len(runner)), desc="level database (sequential)", unit="layer"):
            layer = runner.layers[i]
            hessians = {k: a.H for k, a in runner.hessians(i).items()}
            weights[i] = _prune_levels(layer, runner.adapter, hessians, levels, percdamp, blocksize, store_dtype)
            dense = {name: layer.get_submodule(name).weight.data for name in weights[i]}
            for name in dense:
                layer.get_submodule(name).weight.data = weights[i][name][level_of(i, name)]
            try:
                runner.advance(i)
            finally:
                for name, w in dense.items():
                    layer.get_submodule(name).weight.data = w
        return cls(np.asarray(levels, dtype=float), weights)


def database_for(kind: str, model: nn.Module, adapter: Adapter, windows: torch.Tensor, levels: np.ndarray,
                 target: float, hessian_of: Callable[[int], dict[str, torch.Tensor]] | None = None, *,
                 device: torch.device | None = None, along: dict[str, float] | None = None,
                 **kwargs) -> LevelDatabase:
    """The level database of `kind` ('sequential': along the prefix pruned by the schedule `along`,
    uniform at `target` by default, from the calibration `windows`; 'dense': from `hessian_of`,
    the dense Hessians); kwargs go to the builder."""
    if kind == "sequential":
        device = torch.device(device) if device is not None else next(model.parameters()).device
        return LevelDatabase.build_along(LayerwiseRunner(model, adapter, windows, device), levels,
                                         float(target) if along is None else along, **kwargs)
    if kind == "dense" and hessian_of is not None:
        return LevelDatabase.build(model, adapter, hessian_of, levels, **kwargs)
    raise ConfigError(f"search database must be 'sequential' or 'dense' (with Hessians), got {kind!r}")


def _prune_levels(layer: nn.Module, adapter: Adapter, hessians: dict[str, torch.Tensor], levels: np.ndarray,
                  percdamp: float, blocksize: int, store_dtype: torch.dtype | None) -> dict[str, list[torch.Tensor]]:
    """{linear: [weight pruned to each level]} for one layer; one factorisation per shared input."""
    out = {}
    for group in adapter.groups:
        dense = [layer.get_submodule(name).weight.data for name in group]
        factor = kernels.factorize(hessians[adapter.group_key(group)].to(dense[0].device), percdamp)
        per_level = [kernels.sparsegpt_many(dense, factor, [float(s)] * len(dense), blocksize=blocksize)
                     for s in levels]
        for j, name in enumerate(group):
            out[name] = [r[j].weight.to(store_dtype or dense[j].dtype) for r in per_level]
    return out


@dataclass
class SearchResult:
    sparsity: dict[str, float]            # per linear '<layer>.<linear>'
    unit_sparsity: dict[str, float]       # per unit
    history: pd.DataFrame                 # generation, fitness (best so far), accepted, seconds
    uniform_fitness: float
    fitness: float
    evaluations: int = 0
    seconds: float = 0.0
    spec: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)  # search_schedule: per round its start, end, seconds
    levels: list[float] = field(default_factory=list)


class _Units:
    """Search units (a block, or one linear) with their linears, sizes and swap classes."""

    def __init__(self, adapter: Adapter, layers: nn.ModuleList, unit: str):
        if unit not in ("block", "linear"):
            raise ConfigError(f"search unit must be 'block' or 'linear', got {unit!r}")
        names = adapter.linears
        if unit == "block":
            self.members = [[(i, n) for n in names] for i in range(len(layers))]
            self.names = [str(i) for i in range(len(layers))]
        else:
            self.members = [[(i, n)] for i in range(len(layers)) for n in names]
            self.names = [f"{i}.{n}" for i in range(len(layers)) for n in names]
        self.params = np.array([sum(layers[i].get_submodule(n).weight.numel() for i, n in m) for m in self.members])
        # Moves swap one level between units of equal size, so the budget never drifts.
        _, self.size_class = np.unique(self.params, return_inverse=True)

    def __len__(self) -> int:
        return len(self.members)


def _mutate(levels: np.ndarray, units: _Units, n_levels: int, moves: int, rng: np.random.Generator) -> np.ndarray:
    child = levels.copy()
    for _ in range(moves):
        up = np.flatnonzero(child < n_levels - 1)
        if not len(up):
            break
        a = int(rng.choice(up))
        down = np.flatnonzero((child > 0) & (units.size_class == units.size_class[a]) & (np.arange(len(child)) != a))
        if not len(down):
            continue
        b = int(rng.choice(down))
        child[a] += 1
        child[b] -= 1
    return child


def _snap(init: dict[str, float], units: _Units, levels: np.ndarray, centre: int) -> np.ndarray:
    """Level indices nearest to a per-linear schedule (unit mean), moved one level at a time
    (largest rounding residue first, within each size class) until every size class averages
    the centre level again, so the budget is exact."""
    want = np.array([np.mean([init[f"{i}.{n}"] for i, n in m]) for m in units.members])
    exact = np.interp(want, levels, np.arange(len(levels)))
    k = np.clip(np.rint(exact), 0, len(levels) - 1).astype(int)
    for c in np.unique(units.size_class):
        members = np.flatnonzero(units.size_class == c)
        while (excess := int(k[members].sum() - centre * len(members))) != 0:
            residue = (k - exact)[members] * np.sign(excess)
            movable = (k[members] > 0) if excess > 0 else (k[members] < len(levels) - 1)
            u = members[np.argmax(np.where(movable, residue, -np.inf))]
            k[u] -= int(np.sign(excess))
    return k


def snap_schedule(init: dict[str, float], model: nn.Module, adapter: Adapter, levels: np.ndarray, target: float,
                  unit: str = "linear") -> dict[str, float]:
    """A per-linear schedule moved onto the level grid with the parameter-weighted budget kept
    exactly at `target` (as `evolve` does with its `init`), e.g. to build a database along it."""
    levels = np.asarray(levels, dtype=float)
    match = np.flatnonzero(np.isclose(levels, target, atol=1e-9))
    if not len(match):
        raise ConfigError(f"target sparsity {target} is not a level of {levels.tolist()}")
    units = _Units(adapter, decoder_layers(model, adapter), unit)
    k = _snap(init, units, levels, int(match[0]))
    return {f"{i}.{n}": float(levels[k[u]]) for u, m in enumerate(units.members) for i, n in m}


@contextmanager
def _matmul_tf32(enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@torch.no_grad()
def evolve(model: nn.Module, adapter: Adapter, database: LevelDatabase, windows: torch.Tensor, target: float,
           spec: SearchParams = SearchParams(), *, device: torch.device | None = None, chunk_tokens: int = 1024,
           init: dict[str, float] | None = None) -> SearchResult:
    """Search the level of every unit minimising the fitness (spec.fitness: calibration NLL, or
    KL divergence from the dense model's next-token distributions) at parameter-weighted `target`.

    `windows` (n, seqlen) are calibration token ids; the first `spec.screen_windows` screen the
    children. The search starts from the uniform schedule, or from `init` (per-linear sparsity,
    e.g. another allocator's, rounded to the levels with the budget repaired) when that scores
    better, so the result never scores worse than uniform. A child only re-runs the layers from
    its first changed one on; earlier layers' outputs are its parent's. The model's weights are
    restored (the same tensors) afterwards.
    """
    start_time = time.time()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    match = np.flatnonzero(np.isclose(database.levels, target, atol=1e-9))
    if not len(match):
        raise ConfigError(f"target sparsity {target} is not a level of the database {database.levels.tolist()}")
    runner = LayerwiseRunner(model, adapter, windows, device)
    tokens = windows.to(device)
    head = OutputHead(model, chunk_tokens)
    units = _Units(adapter, runner.layers, spec.unit)
    linears = {(i, n): runner.layers[i].get_submodule(n) for m in units.members for i, n in m}
    originals = {key: lin.weight.data for key, lin in linears.items()}
    rng = np.random.default_rng(spec.seed)
    n_screen = max(1, min(spec.screen_windows, len(windows)))
    evaluations = 0

    first_layer = np.array([min(i for i, _ in m) for m in units.members])

    def fitness(levels: np.ndarray, n: int, parent: tuple | None = None, record: bool = False):
        """(mean fitness per token of the first n windows with `levels` applied, per-layer inputs if `record`).

        With parent = (its levels, its recorded inputs), layers before the first one whose
        weights differ are not run again: their inputs are the parent's.
        """
        nonlocal evaluations
        evaluations += 1
        for u, k in enumerate(levels):
            for i, name in units.members[u]:
                linears[i, name].weight.data = database.weights[i][name][int(k)]
        start = 0
        if parent is not None:
            changed = np.flatnonzero(levels != parent[0])
            start = int(first_layer[changed].min()) if len(changed) else len(runner)
        inputs = parent[1][start][:n] if parent is not None else runner.inputs[:n]
        acts = None
        if record:
            acts = [list(layer[:n]) for layer in parent[1][:start]] if parent is not None else []
            acts += [[] for _ in range(len(runner) + 1 - len(acts))]
        total = window_scores(runner, tokens[:n], head, start=start, inputs=inputs,
                              reference=None if reference is None else reference[:n], record=acts).sum()
        value = require_finite(float(total) / (n * (tokens.shape[1] - 1)), f"the search's {spec.fitness} of a schedule",
                               runner, inputs, start)
        return value, acts

    n_all = len(windows)
    with _matmul_tf32(spec.tf32 and device.type == "cuda"):
        reference = None
        if spec.fitness == "kl":  # the dense model's last hidden states, the KL's reference
            reference = [runner.run(x) for x in runner.inputs]
        try:
            levels = np.full(len(units), int(match[0]))
            uniform, acts = fitness(levels, n_all, record=True)
            best, parent = uniform, (levels, acts)
            if init is not None:  # start from the given schedule only if it scores better than uniform
                snapped = _snap(init, units, database.levels, int(match[0]))
                f, acts = fitness(snapped, n_all, parent, record=True)
                log.info("search start: uniform %s %.4f, given schedule %.4f", spec.fitness, uniform, f)
                if f < best:
                    best, parent = f, (snapped, acts)
            rows = [{"generation": 0, "fitness": best, "accepted": False, "seconds": time.time() - start_time}]
            for g in tqdm(range(1, spec.generations + 1), desc="search", unit="gen"):
                children = {tuple(_mutate(parent[0], units, len(database.levels),
                                          int(rng.integers(1, spec.max_mutations + 1)), rng)) for _ in range(spec.offspring)}
                children.discard(tuple(parent[0]))
                ordered = sorted(children)  # set order is not deterministic across processes
                screened = sorted(ordered, key=lambda c: fitness(np.array(c), n_screen, parent)[0])
                accepted = False
                candidates = [(np.array(c), *fitness(np.array(c), n_all, parent, record=True)) for c in screened[: spec.survivors]]
                for child, f, acts in candidates:
                    if f < best:
                        best, parent, accepted = f, (child, acts), True
                rows.append({"generation": g, "fitness": best, "accepted": accepted, "seconds": time.time() - start_time})
        finally:
            for key, weight in originals.items():
                linears[key].weight.data = weight
    parent = parent[0]
    unit_sparsity = {name: float(database.levels[k]) for name, k in zip(units.names, parent)}
    sparsity = {f"{i}.{n}": unit_sparsity[name] for name, m in zip(units.names, units.members) for i, n in m}
    achieved = float(units.params @ database.levels[parent] / units.params.sum())
    if abs(achieved - target) > 1e-9:
        raise AssertionError(f"search drifted from the budget: {achieved} vs {target}")
    log.info("search: calibration %s %.4f (uniform) -> %.4f (searched) in %d evaluations, %.1f s",
             spec.fitness, uniform, best, evaluations, time.time() - start_time)
    return SearchResult(sparsity, unit_sparsity, pd.DataFrame(rows), uniform, best, evaluations,
                        time.time() - start_time, spec.model_dump(mode="json"), levels=database.levels.tolist())


def search_schedule(model: nn.Module, adapter: Adapter, windows: torch.Tensor, target: float,
                    spec: SearchParams = SearchParams(), *, lo: float = 0.0, hi: float = 0.95,
                    init: dict[str, float] | None = None, along_init: bool = True,
                    hessian_of: Callable[[int], dict[str, torch.Tensor]] | None = None,
                    device: torch.device | None = None, step: Step = call, **build) -> SearchResult:
    """The whole search: level database, `evolve` on the first `spec.fit_windows` windows, then rounds.

    Levels: target ± k·spec.step within target ± spec.span and [lo, hi]. The sequential
    database follows the prefix pruned by the start schedule `init` (snapped to the levels;
    with along_init) or else uniformly, so the start is scored as the model that sequential
    pruning would give. The search moves away from that trajectory, and the database's levels
    drift from what the found schedule's own prefix gives (on Gemma-3-270M at 70%: 0.02-0.03
    nats of calibration NLL per round). Each entry of `spec.rounds` (generations) therefore
    rebuilds the database along the schedule found so far, which is scored exactly again, and
    searches on from it (seed + round). `build` goes to the database builder (percdamp,
    blocksize, store_dtype); `step` wraps each database build and search (the Prefect task of
    the schedule stage).
    """
    if spec.rounds and spec.database != "sequential":
        raise ConfigError("search rounds rebuild the sequential database; the dense one does not change")
    levels = levels_around(target, spec.step, max(lo, target - spec.span), min(hi, target + spec.span))
    log.info("search: %d levels %s, %s database, %d further round(s)", len(levels), levels.tolist(),
             spec.database, len(spec.rounds))
    along = (snap_schedule(init, model, adapter, levels, target, spec.unit)
             if init is not None and along_init and spec.database == "sequential" else None)
    fit = windows[:spec.fit_windows]
    results: list[SearchResult] = []
    rounds_log: list[dict] = []
    for r, generations in enumerate([spec.generations, *spec.rounds]):
        t = time.time()
        db = step(database_for, spec.database, model, adapter, windows, levels, target, hessian_of, device=device,
                  along=along, **build)
        db_s = time.time() - t
        round_spec = spec.model_copy(update={"generations": int(generations), "seed": spec.seed + r})
        result = step(evolve, model, adapter, db, fit, target, round_spec, device=device,
                      init=results[-1].sparsity if results else init)
        rounds_log.append({"generations": int(generations), "start": float(result.history["fitness"].iloc[0]),
                           "fitness": result.fitness, "database_s": db_s, "search_s": result.seconds})
        if r:
            log.info("search round %d, database along the schedule found: %.4f -> %.4f", r + 1,
                     rounds_log[-1]["start"], result.fitness)
        results.append(result)
        along = result.sparsity
    first, last = results[0], results[-1]
    return SearchResult(last.sparsity, last.unit_sparsity,
                        pd.concat([x.history.assign(round=r) for r, x in enumerate(results)], ignore_index=True),
                        first.uniform_fitness, last.fitness, sum(x.evaluations for x in results),
                        sum(x["search_s"] + x["database_s"] for x in rounds_log), spec.model_dump(mode="json"),
                        rounds_log, levels.tolist())
