"""The embedded Gemma-3-270M, end to end on a small budget (slow: ~1-2 min on 2 CPU cores)."""
import pytest
import torch

from prunekit.data import bos_id, eval_windows, load_text, tokenize
from prunekit.evaluate import perplexity
from prunekit.layerwise import LayerwiseRunner
from prunekit.models import adapter_for, decoder_layers, load_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    source = "embedded:gemma3-270m"
    return load_model(source), load_tokenizer(source)


def test_embedded_gemma_loads_and_is_pretrained(gemma):
    model, tokenizer = gemma
    assert model.config.model_type == "gemma3_text"
    assert len(decoder_layers(model, adapter_for(model))) == 18
    assert bos_id(tokenizer) == tokenizer.bos_token_id == 2
    windows = eval_windows(tokenize(load_text("wikitext2"), tokenizer), 256, bos_id(tokenizer), max_windows=4)
    ppl = perplexity(model, windows)["ppl"]
    # A random model of this vocabulary scores ~262k; the pretrained one about 20-40 here.
    assert 5 < ppl < 60, ppl


def test_layerwise_capture_matches_full_forward_on_gemma(gemma):
    model, tokenizer = gemma
    adapter = adapter_for(model)
    windows = eval_windows(tokenize(load_text("c4"), tokenizer), 96, bos_id(tokenizer), max_windows=2)
    runner = LayerwiseRunner(model, adapter, windows, torch.device("cpu"))
    for i in range(len(runner)):
        runner.hessians(i, advance=True)
    captured = []
    hook = decoder_layers(model, adapter)[-1].register_forward_hook(lambda _m, _a, out: captured.append(out))
    with torch.no_grad():
        model(input_ids=windows)
    hook.remove()
    torch.testing.assert_close(torch.cat(runner.inputs), captured[0], rtol=1e-4, atol=1e-3)
