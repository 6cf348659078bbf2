"""Protocol text, token windows and parameter validation."""
import pytest
import torch

from prunekit.config import ConfigError, Params, load_params
from prunekit.data import WIKITEXT, c4_text, calibration_windows, eval_windows, load_text, plain_text


def test_wikitext_rows_follow_the_hf_protocol():
    text = load_text("wikitext2")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    raw_lines = WIKITEXT["wikitext2"].read_text("utf-8").splitlines(True)
    assert len(raw_lines) == 4358
    assert text.count("\n\n") >= 4357


def test_c4_document_ranges_are_disjoint_texts():
    eval_text, calib_text = c4_text((0, 1000)), c4_text((1000, 2000))
    assert eval_text[:200] not in calib_text
    with pytest.raises(ConfigError, match="the file has 2000"):
        c4_text((1500, 2500))


def test_plain_text_joins_lines_with_spaces(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("One sentence.\n\nTwo sentence.\n")
    assert plain_text(f) == "One sentence. Two sentence."
    with pytest.raises(ConfigError, match="text file not found"):
        load_text(str(tmp_path / "missing.txt"))


def test_calibration_windows_are_seeded_and_start_with_bos():
    ids = torch.arange(10, 1010)
    a = calibration_windows(ids, 8, 33, seed=3, bos=1)
    b = calibration_windows(ids, 8, 33, seed=3, bos=1)
    c = calibration_windows(ids, 8, 33, seed=4, bos=1)
    assert a.shape == (8, 33) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 1).all()
    assert ((a[:, 2:] - a[:, 1:-1]) == 1).all()  # contiguous slices of the stream
    with pytest.raises(ConfigError, match="too short"):
        calibration_windows(ids, 100, 33, seed=0, bos=1)


def test_eval_windows_are_non_overlapping_and_capped():
    ids = torch.arange(100, 200)
    w = eval_windows(ids, 11, bos=7)
    assert w.shape == (10, 11) and (w[:, 0] == 7).all()
    assert torch.equal(w[:, 1:].flatten(), ids)
    assert eval_windows(ids, 11, bos=None, max_windows=3).shape == (3, 11)
    with pytest.raises(ConfigError, match="fewer than one"):
        eval_windows(ids[:5], 11, bos=None)


@pytest.mark.parametrize("override, message", [
    ({"prune": {"sparsity": 1.0}}, "prune.sparsity"),
    ({"prune": {"sparsity": -0.1}}, "prune.sparsity"),
    ({"calibration": {"nsamples": 0}}, "calibration.nsamples"),
    ({"calibration": {"seqlen": 1}}, "calibration.seqlen"),
    ({"prune": {"structure": "4:2"}}, "prune.structure"),
    ({"prune": {"structure": "2:4", "sparsity": 0.7}}, "2:4 means prune.sparsity 0.5"),
    ({"quantize": {"bits": 9}}, "quantize.bits"),
    ({"schedule": {"k": 0}}, "schedule.k"),
    ({"model": {"name": "../x"}}, "model.name"),
    ({"prune": {"sparsityy": 0.5}}, "prune.sparsityy"),
    ({"calibration": {"c4_docs": [10, 5]}}, "calibration.c4_docs"),
])
def test_invalid_params_name_the_key(tmp_path, override, message):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(override))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_params(path)


def test_defaults_are_valid_and_repo_params_load():
    from conftest import ROOT

    assert Params().prune.sparsity == 0.7
    params = load_params(ROOT / "params.yaml")
    assert params.prune.n_m == (0, 0)
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_params(ROOT / "nope.yaml")
