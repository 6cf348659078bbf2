"""The real DVC pipeline on a tiny model in a temporary copy of the repo: full run, partial
rerun after a late-stage parameter change (never the Hessians), no-op, experiments, bad
values through `dvc repro` and `dvc exp run -S` (refused before any out is touched), and a
push/pull round trip of the Hessian cache through a local remote."""
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_params


def _sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(os.sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _commit(repo: Path, message: str) -> None:
    """Commit the workspace (`dvc exp run` bases an experiment on HEAD)."""
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", message], repo)


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_models, prefect_api) -> Path:
    """A copy of the project's tracked and unignored files, as its own git + DVC repo."""
    repo = tmp_path_factory.mktemp("repo")
    files = _sh(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file() and not rel.startswith(("reports/", "data/models", "data/hessians")):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_models["llama"])))
    _sh(["git", "init", "-q"], repo)
    _sh(["dvc", "remote", "modify", "shared", "url", str(repo.parent / "remote")], repo)
    return repo


def test_full_then_partial_rerun_then_noop(repo):
    first = _sh(["dvc", "repro"], repo)
    ran = _ran(first.stdout)
    assert {"prepare_model", "calibrate", "hessians", "estimate", "sensitivity", "schedule", "prune", "quantize", "export",
            "evaluate@dense", "evaluate@pruned", "evaluate@compressed", "report"} <= ran
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.7, abs=0.01)
    assert metrics["pruned"]["wikitext2"] > metrics["dense"]["wikitext2"] > 1
    assert (repo / "reports" / "report.md").read_text().startswith("# Compression report: tiny")
    schedule = json.loads((repo / "data" / "schedule" / "tiny.json").read_text())
    assert schedule["schedule"]["allocator"] == "search"  # the default allocator, through DVC
    assert schedule["search"]["searched"] <= schedule["search"]["uniform"]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prune"]["sparsity"] = 0.6
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    second = _ran(_sh(["dvc", "repro"], repo).stdout)
    assert second == {"check", "schedule", "prune", "quantize", "export", "baseline@uniform", "evaluate@uniform", "evaluate@pruned",
                      "evaluate@compressed", "report"}
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.6, abs=0.01)

    noop = _sh(["dvc", "repro"], repo)
    assert _ran(noop.stdout) == set()
    shown = _sh(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "wikitext2" in shown


def test_presets_run_as_named_experiments_that_inherit_nothing_from_each_other(repo):
    """`prunekit exp run` on two presets: each is a named DVC experiment (`dvc exp run -S ...`)
    with its own values, the second ("committed": no changes of its own) not inheriting the
    first's quantize.enabled from the workspace, its stages restored from DVC's cache, and
    `prunekit exp show` gives one row each with only the table's columns."""
    (repo / "presets.yaml").write_text(yaml.safe_dump({
        "presets": {"plain": {"quantize": {"enabled": False}}, "committed": {}},
    }))
    _commit(repo, "presets")
    committed = yaml.safe_load((repo / "params.yaml").read_text())
    out = _sh(["prunekit", "exp", "run", "plain", "committed"], repo)
    assert out.stdout.count("Running stage 'hessians'") <= 1  # the second reuses the first's store
    table = _sh(["prunekit", "exp", "show", "--csv"], repo).stdout.splitlines()
    header = table[0].split(",")
    rows = {r.split(",")[header.index("Experiment")]: dict(zip(header, r.split(","))) for r in table[1:]}
    assert {"plain", "committed"} <= set(rows), table
    assert "runtime.device" not in header and "pruned.wikitext2" in header, header
    plain, again = rows["plain"], rows["committed"]
    assert (plain["quantize.enabled"], plain["compressed.wikitext2"]) == ("False", "")
    assert again["quantize.enabled"] == str(committed["quantize"]["enabled"]) == "True"
    assert float(again["compressed.wikitext2"]) > float(again["pruned.wikitext2"]) * 0.9
    assert plain["pruned.wikitext2"] == again["pruned.wikitext2"]  # the same pruned model, from the cache


def test_hessian_cache_round_trips_through_the_remote(repo):
    store = next((repo / "data" / "hessians").glob("*.zarr"))
    _sh(["dvc", "push"], repo)
    shutil.rmtree(store)
    shutil.rmtree(repo / ".dvc" / "cache")
    _sh(["dvc", "pull"], repo)
    assert store.is_dir()
    out = _sh(["dvc", "repro"], repo)
    assert "hessians" not in _ran(out.stdout)


def _workspace(repo: Path) -> dict[str, str]:
    """Every file of the pipeline's outputs and records: its content's hash by path. (Contents, not
    times: `dvc exp run` stashes and restores git-tracked files, same bytes, new times.)"""
    files = [p for top in ("data", "reports") for p in (repo / top).rglob("*") if p.is_file()] + [repo / "dvc.lock"]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("command, key, value, message", [
    (["dvc", "exp", "run", "-S"], "prune.sparsity", "1.0", "invalid parameter prune.sparsity"),
    (["dvc", "exp", "run", "-S"], "schedule.k", "0", "invalid parameter schedule.k"),
    (["dvc", "repro"], "evaluate.datasets", ["wikitxet2"], "unknown evaluation dataset 'wikitxet2'"),
    (["dvc", "repro"], "prune.structure", {"prune.structure": "2:4", "prune.sparsity": 0.5},
     "needs schedule.allocator 'uniform'"),
])
def test_bad_value_under_dvc_touches_nothing(repo, command, key, value, message):
    """The check stage refuses the value before DVC deletes any out: every output, plot, metric
    and dvc.lock stay as they were (a refused `dvc exp run -S` leaves only its value in
    params.yaml, where DVC wrote it)."""
    _sh(["dvc", "repro"], repo)  # up to date, whatever ran before
    params_before = (repo / "params.yaml").read_text()
    before = _workspace(repo)
    if command[:3] == ["dvc", "exp", "run"]:
        _commit(repo, "before a bad value")
        proc = _sh([*command, f"{key}={value}"], repo, check=False)
    else:
        params = yaml.safe_load(params_before)
        for dotted, v in (value if isinstance(value, dict) else {key: value}).items():
            section, name = dotted.split(".")
            params[section][name] = v
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        proc = _sh(command, repo, check=False)
    (repo / "params.yaml").write_text(params_before)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], output[-2000:]
    assert "Traceback" not in output
    assert _ran(proc.stdout) == {"check"}
    assert _workspace(repo) == before
