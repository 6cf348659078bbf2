"""The embedded Gemma-3-270M, end to end on a small budget (slow: ~1-2 min on 2 CPU cores)."""
import pytest
import torch

from prunekit.data import bos_id, eval_windows, load_text, tokenize
from prunekit.forward.layerwise import LayerwiseRunner
from prunekit.forward.scoring import perplexity
from prunekit.forward.sources import InMemoryModel
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
    ppl = perplexity(InMemoryModel(model), windows)["ppl"]
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
        for row in windows:  # one window at a time, as the runner does: the same GEMM shapes
            model(input_ids=row.unsqueeze(0))
    hook.remove()
    expected = torch.cat([out[0] if isinstance(out, tuple) else out for out in captured])
    # fp32 over 18 layers whose hidden states reach ~1e3: tolerance relative to that scale
    torch.testing.assert_close(torch.cat(runner.inputs), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
