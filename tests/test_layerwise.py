"""Adapters and the layer-by-layer runner on tiny models of every architecture."""
import pytest
import torch
from tiny import CONFIGS

from prunekit.config import ConfigError
from prunekit.forward.layerwise import LayerwiseRunner
from prunekit.models import ADAPTERS, adapter_for, decoder_layers, layer_linears, load_model, resolve_source


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_layerwise_outputs_equal_full_forward(model_type, tiny_models):
    model = load_model(str(tiny_models[model_type]))
    adapter = adapter_for(model)
    windows = torch.randint(3, 500, (3, 40))
    windows[:, 0] = 1
    runner = LayerwiseRunner(model, adapter, windows, torch.device("cpu"))
    for i in range(len(runner)):
        runner.hessians(i, advance=True)
    captured = []
    hook = decoder_layers(model, adapter)[-1].register_forward_hook(
        lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=windows)
    hook.remove()
    torch.testing.assert_close(torch.cat(runner.inputs), captured[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_adapter_groups_cover_every_linear_of_a_layer(model_type, tiny_models):
    model = load_model(str(tiny_models[model_type]))
    adapter = adapter_for(model)
    layer = decoder_layers(model, adapter)[0]
    all_linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(layer_linears(layer, adapter)) == all_linears
    for group in adapter.groups:  # linears of a group must read the same input
        assert len({layer.get_submodule(n).in_features for n in group}) == 1


def test_hessians_match_brute_force(tiny_models):
    model = load_model(str(tiny_models["llama"]))
    adapter = adapter_for(model)
    windows = torch.randint(3, 500, (4, 32))
    runner = LayerwiseRunner(model, adapter, windows, torch.device("cpu"))
    inputs = []
    layer = decoder_layers(model, adapter)[0]
    hook = layer.get_submodule("mlp.down_proj").register_forward_hook(lambda _m, a, _o: inputs.append(a[0]))
    acc = runner.hessians(0, torch.float64)
    hook.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double()
    torch.testing.assert_close(acc["mlp.down_proj"].H, 2 * X.T @ X / X.shape[0])
    assert acc["mlp.down_proj"].n_tokens == 4 * 32


def test_unknown_architecture_and_paths_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="model path not found"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="unknown embedded model"):
        resolve_source("embedded:gpt-17")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))

    class Fake:
        class config:
            model_type = "gpt_neox"

    with pytest.raises(ConfigError, match="unsupported architecture 'gpt_neox'"):
        adapter_for(Fake())
    assert {"opt", "bloom", "llama", "qwen2", "mistral", "gemma3_text"} <= set(ADAPTERS)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_the_scoring_path_is_the_full_forward(model_type, tiny_models):
    """Evaluation's per-window NLL (layer by layer, chunked head) equals the HF forward's."""
    from tiny import full_forward_nll

    from prunekit.forward.scoring import perplexity
    from prunekit.forward.sources import InMemoryModel

    model = load_model(str(tiny_models[model_type]))
    if model_type == "gemma3_text":
        model.config.final_logit_softcapping = 3.0
    windows = torch.randint(4, 500, (3, 40), generator=torch.Generator().manual_seed(2))
    result = perplexity(InMemoryModel(model), windows)
    assert result["nll"] == pytest.approx(full_forward_nll(model, windows), rel=1e-5)
    per_window = [full_forward_nll(model, windows[w : w + 1]) for w in range(3)]
    assert result["window_nll"] == pytest.approx(per_window, rel=1e-5)
