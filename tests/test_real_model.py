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


def test_gguf_export_of_the_embedded_model_reads_back_through_transformers(gemma, tmp_path):
    """The embedded model, 50% magnitude-pruned and rounded to 4-bit grids in groups of 128 (head
    included), exported as GGUF from the source file: transformers' GGUF loader reads it back with
    the perplexity of the model we wrote within 1%, the norms as the source has them."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from prunekit.compression.quantize import head_weight_name
    from prunekit.kernels import QuantSpec, magnitude, rtn
    from prunekit.models import layer_linears, resolve_source, save_model
    from prunekit.storage.gguf_form import write_gguf

    tokenizer = gemma[1]
    model = load_model("embedded:gemma3-270m")  # a copy: the module's fixture stays dense
    spec = QuantSpec(bits=4, groupsize=128)
    grids = {}
    adapter = adapter_for(model)
    for i, layer in enumerate(decoder_layers(model, adapter)):
        for name, linear in layer_linears(layer, adapter).items():
            res = rtn(magnitude(linear.weight.data, 0.5).weight, spec)
            linear.weight.data = res.weight
            grids[f"{adapter.layers}.{i}.{name}.weight"] = (res.scales, res.zeros)
    head = head_weight_name(InMemoryModel(model))
    res = rtn(model.get_output_embeddings().weight.data, spec)
    model.get_output_embeddings().weight.data = res.weight
    grids[head] = (res.scales, res.zeros)
    save_model(model, tokenizer, tmp_path / "model")
    where, gguf_file = resolve_source("embedded:gemma3-270m")
    linears = [n for n in grids if n != head]
    quant = {"bits": 4, "sym": False, "groupsize": 128, "head": {"bits": 4}}
    summary = write_gguf(tmp_path / "model", Path(where) / gguf_file, tmp_path / "out.gguf", grids, quant, linears)
    assert summary["written_types"] == {"Q4_1": len(linears) + 1}
    assert summary["bytes"] < 0.75 * (Path(where) / gguf_file).stat().st_size
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf", dtype=torch.float32).eval()
    windows = eval_windows(tokenize(load_text("wikitext2"), tokenizer), 256, bos_id(tokenizer), max_windows=2)
    expected = perplexity(InMemoryModel(model), windows)["ppl"]
    got = perplexity(InMemoryModel(reloaded), windows)["ppl"]
    assert abs(got / expected - 1) < 0.01, (got, expected)
    assert torch.equal(reloaded.model.norm.weight, model.model.norm.weight)
