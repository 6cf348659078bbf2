"""Named DVC experiments: presets.yaml's presets as `dvc exp run` calls, and a compact `dvc exp show`.

A preset is params.yaml (as committed) with presets.yaml's `protocol` and the preset's own keys
set. Each experiment gets an `-S key=value` for every key that the protocol or any preset sets,
so it never inherits another experiment's values from the workspace (`dvc exp run` leaves its
parameters in params.yaml).

    >>> presets = load_presets("presets.yaml", base=read_yaml("params.yaml"))
    >>> [a for a in presets["2of4"] if a.startswith("prune.")]
    ['prune.sparsity=0.5', 'prune.structure="2:4"']
"""
from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import yaml

from prunekit.config import ConfigError, read_yaml, validate_params

# `prunekit exp show`: the columns of the comparison table (dvc exp show --keep regexes; the
# metric names are reports/metrics.json's, docs/experiments.md explains them).
SHOW_COLUMNS = (
    "Experiment", "prune.sparsity", "prune.structure", "schedule.allocator", "quantize.enabled", "quantize.bits",
    "schedule.search.seed", "calibration.nsamples", "evaluate.max_windows",
    r"(pruned|uniform|compressed|dense)\.(wikitext2|c4|wikitext2-valid)",
    r"ratios\.pruned/uniform\.(wikitext2|c4)\.ratio", r"sparsity\.achieved",
)


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'a.b': value} for every non-mapping value of a nested mapping."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{name}."))
        else:
            out[name] = value
    return out


def _set(tree: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def load_presets(path: str | Path, base: dict) -> dict[str, list[str]]:
    """Every preset of `path` as its `dvc exp run -S` assignments (values as JSON, which DVC
    reads as YAML), each checked as a whole parameter set on top of `base` (params.yaml's
    mapping). ConfigError, one line, for a preset that names a key params.yaml lacks or that
    makes an invalid parameter set."""
    raw = read_yaml(path)
    protocol, presets = raw.get("protocol") or {}, raw.get("presets") or {}
    if not isinstance(presets, dict) or not presets or not isinstance(protocol, dict):
        raise ConfigError(f"{path}: needs `presets:`, a mapping of names to parameter changes (and optionally `protocol:`)")
    known = _leaves(base)
    changed = {"protocol": _leaves(protocol), **{name: _leaves(p or {}) for name, p in presets.items()}}
    for name, keys in changed.items():
        for key in keys:
            if key not in known and not any(k.startswith(f"{key}.") for k in known):
                raise ConfigError(f"{path}: {name} sets {key}, which params.yaml does not have")
    touched = sorted({key for keys in changed.values() for key in keys})
    out = {}
    for name in presets:
        params = copy.deepcopy(base)
        for key, value in {**changed["protocol"], **changed[name]}.items():
            _set(params, key, value)
        try:
            validate_params(params, f"{path}:{name}")
        except ConfigError as exc:
            raise ConfigError(f"{path}: preset {name}: {exc}") from None
        values = {**known, **changed["protocol"], **changed[name]}
        out[name] = [f"{key}={json.dumps(values[key])}" for key in touched]
    return out


def committed_params(root: Path) -> dict:
    """params.yaml as of HEAD (what `dvc exp run` bases an experiment on), else the workspace's."""
    try:
        proc = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True)
    except OSError:  # no git: DVC's experiments need it anyway, and will say so
        proc = None
    if proc is None or proc.returncode != 0:
        return read_yaml(root / "params.yaml")
    return yaml.safe_load(proc.stdout) or {}


def run_commands(names: list[str], presets: dict[str, list[str]], extra: list[str],
                 exp_name: str | None) -> list[list[str]]:
    """The `dvc exp run` command of each named preset, with `extra` assignments after its own."""
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise ConfigError(f"unknown preset {unknown[0]!r}; presets: {', '.join(presets)}")
    if exp_name is not None and len(names) != 1:
        raise ConfigError("--name needs exactly one preset")
    commands = []
    for name in names:
        sets = [arg for assignment in [*presets[name], *extra] for arg in ("-S", assignment)]
        commands.append(["dvc", "exp", "run", "--name", exp_name or name, *sets])
    return commands


def show_command(extra: list[str]) -> list[str]:
    """`dvc exp show` keeping only SHOW_COLUMNS (every other column dropped)."""
    return ["dvc", "exp", "show", "--drop", ".*", *[a for c in SHOW_COLUMNS for a in ("--keep", c)], *extra]
