"""The Python API (its docstring example, run on a tiny model), the `prunekit` command, and the
params types' defaults against params.yaml."""
import doctest
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from tiny import full_forward_nll

import prunekit
from prunekit import api
from prunekit.config import Params, load_params


def test_params_defaults_are_params_yaml():
    assert Params().model_dump(mode="json") == load_params(ROOT / "params.yaml").model_dump(mode="json")


def test_api_docstring_example_runs(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "compressed"
    globs = {"source": str(tiny_models["llama"]), "out_dir": out}
    example = doctest.DocTestParser().get_doctest(api.__doc__, globs, "prunekit.api", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(example, clear_globs=False)
    assert runner.summarize(verbose=False).failed == 0 and len(example.examples) >= 7
    globs = example.globs
    model = globs["model"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert prunekit.sparsity_of(reloaded) >= 0.7
    windows = globs["windows"]
    assert full_forward_nll(reloaded, windows) == pytest.approx(full_forward_nll(model, windows), rel=1e-6)
    for key, (scales, zeros) in globs["grids"].items():  # 4-bit codes in groups of 32
        assert scales.shape[1] == zeros.shape[1] and int(zeros.max()) <= 15, key


def test_schedules_of_the_api_keep_the_budget(tiny_models):
    model, tokenizer = prunekit.load(str(tiny_models["llama"]))
    windows = prunekit.calibration(tokenizer, "wikitext2-valid", nsamples=4, seqlen=32)
    sizes = {f"{i}.{n}": lin.weight.numel() for i, layer in enumerate(model.model.layers)
             for n, lin in ((n, layer.get_submodule(n)) for n in api.adapter_for(model).linears)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for allocator in ("uniform", "kmeans", "owl", "search"):
        sparsity = prunekit.schedule(model, windows, 0.6, allocator=allocator,
                                     search=prunekit.SearchParams(generations=1, fit_windows=2))
        assert set(sparsity) == set(sizes)
        mean = sum(sparsity[k] * n for k, n in sizes.items()) / sum(sizes.values())
        assert mean == pytest.approx(0.6, abs=1e-9), allocator
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is left unchanged
    with pytest.raises(ValueError, match="allocator"):
        prunekit.schedule(model, windows, 0.6, allocator="bogus")


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "flows", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_help_lists_what_users_run():
    proc = _cli("--help")
    assert proc.returncode == 0
    for command in ("run", "flow", "stage", "exp", "audit", "evaluate", "unpack"):
        assert f"    {command} " in proc.stdout, command
    stage = _cli("stage", "--help")
    assert stage.returncode == 0 and "prepare_model" in stage.stdout and "report" in stage.stdout


def test_cli_evaluates_a_model_folder_on_a_text_file(tiny_models, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "data/wikitext-2-raw-v1/wiki.valid.raw").read_text()[:20000])
    proc = _cli("evaluate", str(tiny_models["llama"]), "--text", str(text), "--seqlen", "32", "--max-windows", "3",
                "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ppl = float(proc.stdout.split("ppl ")[1].split()[0])
    model, tokenizer = prunekit.load(str(tiny_models["llama"]))
    assert ppl == pytest.approx(prunekit.perplexity(model, tokenizer, str(text), seqlen=32, max_windows=3)["ppl"])
    missing = _cli("evaluate", str(tiny_models["llama"]), "--text", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [f"error: text file not found: "
                                                                               f"{tmp_path / 'nope.txt'}"]


def test_cli_refuses_a_variant_for_a_stage_without_one(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = _cli("stage", "prune", "extra", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: stage prune takes no variant, got 'extra'")


def _dry_run(*names, cwd=ROOT):
    proc = _cli("exp", "run", *names, "--dry-run", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def _assignments(command: list[str]) -> dict[str, str]:
    return dict(command[i + 1].split("=", 1) for i, a in enumerate(command) if a == "-S")


def test_every_shipped_preset_is_one_dvc_experiment_setting_the_same_keys():
    """presets.yaml as shipped: each preset validates on top of params.yaml and becomes one
    `dvc exp run --name <preset>` that sets every key any preset sets (so none inherits another's)."""
    names = _cli("exp", "list").stdout.split()
    assert {"uniform-70", "kmeans-70", "owl-70", "ranked-70", "search-70", "2of4", "search-70-q4"} <= set(names)
    commands = _dry_run(*names)
    assert [c[:5] for c in commands] == [["dvc", "exp", "run", "--name", n] for n in names]
    sets = [_assignments(c) for c in commands]
    assert all(s.keys() == sets[0].keys() for s in sets)
    by_name = dict(zip(names, sets))
    assert (by_name["search-70"]["schedule.allocator"], by_name["search-70"]["quantize.enabled"]) == ('"search"', "false")
    assert by_name["search-70-q4"]["quantize.enabled"] == "true"
    assert by_name["2of4"]["prune.structure"] == '"2:4"' and by_name["uniform-80"]["prune.sparsity"] == "0.8"
    assert all(s["calibration.nsamples"] == "128" and s["evaluate.max_windows"] == "null" for s in sets)
    seeded = _dry_run("search-70", "-S", "schedule.search.seed=1", "--name", "search-70-s1")
    assert seeded[0][4] == "search-70-s1" and seeded[0][-2:] == ["-S", "schedule.search.seed=1"]


@pytest.mark.parametrize("presets, args, message", [
    ({"presets": {"a": {"prune": {"sparsty": 0.5}}}}, ["a"], "presets.yaml: a sets prune.sparsty, which params.yaml does not have"),
    ({"presets": {"a": {"prune": {"sparsity": 1.5}}}}, ["a"], "presets.yaml: preset a: invalid parameter prune.sparsity"),
    ({"presets": {"a": {"prune": {"sparsity": 0.5}}}}, ["b"], "unknown preset 'b'; presets: a"),
    ({"presets": {"a": {}, "b": {}}}, ["a", "b", "--name", "x"], "--name needs exactly one preset"),
    ({"protocol": {"quantize": {"bits": 1}}, "presets": {"a": {}}}, ["a"], "presets.yaml: preset a: invalid parameter quantize.bits"),
    ({"protocol": {}}, ["a"], "presets.yaml: needs `presets:`"),
])
def test_a_bad_preset_is_refused_in_one_line_before_dvc_runs(tmp_path, presets, args, message):
    import yaml

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "presets.yaml").write_text(yaml.safe_dump(presets))
    proc = _cli("exp", "run", *args, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr
    assert not (tmp_path / ".dvc").exists() and (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
