"""Packed export: exact round trips of pruned / GPTQ-quantized weights, loud failure when a
weight is off its grid, the size it saves, and the export stage on tiny models (OPT, LLaMA):
the packed export reads back to the pipeline model's weights and logits."""
import json
import shutil

import pytest
import torch
import yaml
from conftest import tiny_params

from prunekit.kernels import QuantSpec, gptq, magnitude
from prunekit.storage import packing


def _sparse_quantized(d_out=48, d_in=96, sparsity=0.7, groupsize=None, act_order=False, prunen=0, prunem=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, W = torch.randn(256, d_in, generator=g), torch.randn(d_out, d_in, generator=g)
    W = magnitude(W, sparsity, prunen=prunen, prunem=prunem).weight
    res = gptq(W, 2 / 256 * X.T @ X, QuantSpec(bits=4, groupsize=groupsize, act_order=act_order))
    return W, res


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("groupsize,act_order,nm", [(None, False, (0, 0)), (32, False, (0, 0)), (32, True, (0, 0)),
                                                     (40, False, (0, 0)), (None, False, (2, 4))])
def test_quantized_linear_round_trips_bit_identical(groupsize, act_order, nm):
    _, res = _sparse_quantized(groupsize=groupsize, act_order=act_order, sparsity=0.5 if nm[0] else 0.7,
                               prunen=nm[0], prunem=nm[1])
    parts, entry = packing.pack_linear(res.weight, (res.scales, res.zeros), bits=4, groupsize=groupsize)
    assert entry["kind"] == "sparse_int" and entry["nnz"] == int((res.weight != 0).sum())
    assert parts["codes"].numel() == (entry["nnz"] + 1) // 2
    restored = packing.unpack_linear(parts, entry)
    assert torch.equal(_bits(restored), _bits(res.weight))


@pytest.mark.parametrize("bits", [3, 8])
def test_other_widths_round_trip(bits):
    g = torch.Generator().manual_seed(1)
    X, W = torch.randn(256, 64, generator=g), magnitude(torch.randn(32, 64, generator=g), 0.7).weight
    res = gptq(W, 2 / 256 * X.T @ X, QuantSpec(bits=bits, groupsize=16))
    parts, entry = packing.pack_linear(res.weight, (res.scales, res.zeros), bits=bits, groupsize=16)
    assert parts["codes"].numel() == ((entry["nnz"] + 1) // 2 if bits <= 4 else entry["nnz"])
    assert torch.equal(_bits(packing.unpack_linear(parts, entry)), _bits(res.weight))


def test_off_grid_weight_is_refused():
    _, res = _sparse_quantized(groupsize=32)
    with pytest.raises(packing.PackingError, match="read back exactly"):
        packing.pack_linear(res.weight, (res.scales * 1.001, res.zeros), groupsize=32)
    nudged = res.weight.clone()
    i, j = torch.nonzero(nudged)[0]
    nudged[i, j] = torch.nextafter(nudged[i, j], torch.tensor(float("inf")))
    with pytest.raises(packing.PackingError):
        packing.pack_linear(nudged, (res.scales, res.zeros), groupsize=32)
    with pytest.raises(packing.PackingError, match="groupsize"):
        packing.pack_linear(res.weight, (res.scales, res.zeros), groupsize=16)


def test_pruned_linear_round_trips_in_fp16_or_exactly():
    W, _ = _sparse_quantized()
    parts, entry = packing.pack_linear(W)
    assert parts["values"].dtype == torch.float16
    assert torch.equal(packing.unpack_linear(parts, entry), W.half().float())
    parts, entry = packing.pack_linear(W, float_dtype=None)
    assert torch.equal(packing.unpack_linear(parts, entry), W)


def test_seventy_percent_four_bit_is_under_a_quarter_of_fp16():
    _, res = _sparse_quantized(d_out=256, d_in=512, groupsize=128)
    emb = torch.randn(100, 64)
    packed, manifest = packing.pack_state({"lin": res.weight, "emb": emb}, ["lin"], {"lin": (res.scales, res.zeros)},
                                          groupsize=128)
    sizes = packing.sizes(packed, manifest)
    assert sizes["linears"]["ratio_vs_fp16"] < 0.2
    assert sizes["tensors"]["fp16_bytes"] == 2 * (256 * 512 + 100 * 64)
    state = packing.unpack_state(packed, manifest)
    assert torch.equal(state["lin"], res.weight) and torch.equal(state["emb"], emb.half().float())


@pytest.mark.parametrize("bits,groupsize", [(4, 32), (8, 32), (4, None), (3, 24)])
def test_a_quantized_unpruned_tensor_packs_every_code_without_a_mask(bits, groupsize):
    """The LM head / tied embedding: rounded to its grids (kernels.rtn), packed as codes with no
    mask (kind "int"), read back bit-identical; 4-bit codes in groups of 32 take 0.32× fp16 (fp32 scales)."""
    from prunekit.kernels import rtn

    W = torch.randn(200, 96, generator=torch.Generator().manual_seed(3))
    res = rtn(W, QuantSpec(bits=bits, groupsize=groupsize, mse=True))
    parts, entry = packing.pack_linear(res.weight, (res.scales, res.zeros), bits=bits, groupsize=groupsize,
                                       sparse=False)
    assert entry["kind"] == "int" and "mask" not in parts and entry["nnz"] == W.numel()
    assert torch.equal(_bits(packing.unpack_linear(parts, entry)), _bits(res.weight))
    packed, manifest = packing.pack_state({"head": res.weight, "norm": torch.ones(96)}, [],
                                          {"head": (res.scales, res.zeros)}, bits=2, groupsize=groupsize,
                                          tensor_bits={"head": bits})
    assert manifest["tensors"]["head"]["bits"] == bits and manifest["tensors"]["norm"]["kind"] == "dense"
    assert torch.equal(packing.unpack_state(packed, manifest)["head"], res.weight)
    if (bits, groupsize) == (4, 32):
        nbytes = sum(t.numel() * t.element_size() for k, t in packed.items() if k.startswith("head."))
        assert nbytes == W.numel() // 2 + 200 * 3 * 4 + 200 * 3 // 2  # codes, fp32 scales, 4-bit zero points
    with pytest.raises(packing.PackingError, match="read back exactly"):
        packing.pack_linear(res.weight + 1e-3, (res.scales, res.zeros), bits=bits, groupsize=groupsize, sparse=False)


@pytest.mark.parametrize("bits,groupsize,sparse,density", [
    (None, None, True, 0.3), (None, None, True, 1.0), (4, 32, True, 0.3), (4, 32, True, 1.0), (3, 24, True, 0.51),
    (8, None, True, 0.3), (4, 32, False, 1.0), (3, None, False, 1.0)])
def test_packed_nbytes_is_what_pack_linear_writes(bits, groupsize, sparse, density):
    """The report sizes every model of a run in the packed form from shapes and nonzero counts:
    the count must be the bytes `pack_linear` writes (odd counts, narrow last group, every kind)."""
    from prunekit.kernels import rtn

    W = torch.randn(37, 100, generator=torch.Generator().manual_seed(5))
    W = W * (torch.rand(W.shape, generator=torch.Generator().manual_seed(6)) < density)
    grid = None
    if bits is not None:
        res = rtn(W, QuantSpec(bits=bits, groupsize=groupsize, mse=False))
        W, grid = res.weight, (res.scales, res.zeros)
    parts, entry = packing.pack_linear(W, grid, bits=bits or 4, groupsize=groupsize, float_dtype=torch.bfloat16,
                                       sparse=sparse)
    written = sum(t.numel() * t.element_size() for t in parts.values())
    assert packing.packed_nbytes(tuple(W.shape), entry["nnz"], bits=bits, groupsize=groupsize, sparse=sparse) == written


def run_stages(tmp_path, model_dir, monkeypatch, structure="unstructured", **overrides):
    """prepare_model -> calibrate -> prune (uniform schedule, sequential) -> quantize -> export,
    in process and without Prefect; returns the run's Paths."""
    from prunekit.config import Params
    from prunekit.models import adapter_for, load_model, prunable_parameters
    from prunekit.steps import call
    from stages import calibrate, export, prepare_model, prune, quantize
    from stages.common import Paths

    monkeypatch.chdir(tmp_path)
    sparsity = 0.5 if structure != "unstructured" else 0.7
    raw = tiny_params(model_dir, prune={"structure": structure, "sparsity": sparsity},
                      schedule={"allocator": "uniform"}, **overrides)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = Params.model_validate(raw)
    paths = Paths.of(params, tmp_path)
    for stage in (prepare_model, calibrate):
        stage.run(params, call)
    model = load_model(str(paths.model))
    keys = prunable_parameters(model, adapter_for(model))
    paths.schedule.parent.mkdir(parents=True, exist_ok=True)
    paths.schedule.write_text(json.dumps({"sparsity": {k: sparsity for k in keys}, "target": sparsity,
                                          "achieved": sparsity, "cluster": {k: 0 for k in keys}}))
    for stage in (prune, quantize, export):
        stage.run(params, call)
    return paths


def _logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type,quantize,structure", [
    ("opt", {"groupsize": 32}, "unstructured"),
    ("opt", {"enabled": False}, "unstructured"),
    ("llama", {"groupsize": None}, "unstructured"),
    ("llama", {"groupsize": 32}, "2:4"),
])
def test_export_stage(model_type, quantize, structure, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "COMPRESS_OVER", 10_000)  # the tiny tokenizer.json is stored xz-compressed too
    paths = run_stages(tmp_path, tiny_models[model_type], monkeypatch, structure=structure, quantize=quantize)
    quantized = quantize.get("enabled", True)
    final = paths.compressed if quantized else paths.pruned
    out = paths.export
    summary = json.loads((out / "export.json").read_text())
    metrics = json.loads((paths.reports / "metrics" / "export.json").read_text())
    assert summary["quantized"] == quantized
    assert metrics["linears_vs_fp16"] == summary["ratios_vs_fp16"]["linears"]
    if quantized and structure == "unstructured":
        assert summary["ratios_vs_fp16"]["linears"] < 0.25
    assert summary["bytes"]["packed_file"] == (out / "packed" / packing.WEIGHTS).stat().st_size

    ids = torch.randint(4, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = _logits(final, ids)
    assert set(summary["source_sha256"]) == {"model.safetensors"}

    # The HF form: bf16, the pipeline's weights rounded to bf16, every zero kept, its tokenizer along.
    stored, hf = _stored(final), _stored(out / "hf")
    assert set(hf) == set(stored) and json.loads((out / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, t in stored.items():
        assert hf[name].dtype == torch.bfloat16 and torch.equal(hf[name], t.to(torch.bfloat16)), name
        assert torch.equal(hf[name] == 0, t == 0), name
    assert summary["forms"]["hf"]["bytes"] < 0.55 * summary["bytes"]["stored_files"]
    torch.testing.assert_close(_logits(out / "hf", ids), reference, rtol=0, atol=0.1)
    assert (out / "hf" / "tokenizer.json").is_file()
    assert ("compressed_tensors" in summary["forms"]) == quantized

    # The packed form: quantized linears and the quantized head come back bit-identical, pruned
    # linears and the rest in bf16 (the export dtype). It holds its tokenizer and unpacks to a bf16 folder.
    restored = packing.load_packed(out / "packed")
    assert set(restored) == set(stored)
    entries = json.loads((out / "packed" / packing.MANIFEST).read_text())["tensors"]
    coded = [n for n, e in entries.items() if e["kind"] != "dense"]
    head = json.loads((final / "prunekit.json").read_text()).get("head")
    assert [n for n in coded if entries[n]["kind"] == "int"] == ([head["weight"]] if quantized else [])
    for name in coded:
        expected = stored[name] if quantized else stored[name].to(torch.bfloat16).float()
        assert torch.equal(_bits(restored[name]), _bits(expected)), name
    for name in set(stored) - set(coded):
        assert torch.equal(restored[name], stored[name].to(torch.bfloat16).to(stored[name].dtype)), name
    assert (out / "packed" / "tokenizer.json.xz").is_file() and not (out / "packed" / "tokenizer.json").exists()
    unpacked = packing.unpack_to_folder(out / "packed", tmp_path / "unpacked")
    assert json.loads((unpacked / "config.json").read_text())["dtype"] == "bfloat16"
    assert _stored(unpacked)[coded[0]].dtype == torch.bfloat16
    assert (unpacked / "tokenizer.json").read_bytes() == (final / "tokenizer.json").read_bytes()
    torch.testing.assert_close(_logits(unpacked, ids), reference, rtol=0, atol=0.1)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(unpacked)) == len(AutoTokenizer.from_pretrained(final))


def _stored(folder):
    """Every tensor of a saved model folder (shards merged)."""
    from prunekit.storage.checkpoint import CheckpointReader

    reader = CheckpointReader(folder)
    return reader.read(list(reader.weight_map))


def test_exact_packing_of_a_pipeline_model_gives_equal_logits(tiny_models, tmp_path, monkeypatch):
    """With every non-code tensor kept as stored, the unpacked model is the pipeline's model."""
    paths = run_stages(tmp_path, tiny_models["llama"], monkeypatch)
    from prunekit.storage.export import decoder_linears

    stored = _stored(paths.compressed)
    linears = decoder_linears(stored, "llama")
    grids = packing.load_grids(paths.compressed / "qparams.safetensors")
    packed, manifest = packing.pack_state(stored, linears, grids, groupsize=32, float_dtype=None)
    packing.save_packed(tmp_path / "exact", packed, manifest, extra_files=[paths.compressed / "config.json"])
    packing.unpack_to_folder(tmp_path / "exact", tmp_path / "exact_hf")
    ids = torch.randint(4, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(tmp_path / "exact_hf", ids), _logits(paths.compressed, ids))


def test_a_model_folder_appears_with_its_extra_files_or_not_at_all(tmp_path, tiny_models):
    """The quantize stage adds its GPTQ grids to the model folder before it is published: a
    failure while writing them leaves the previous folder as it was."""
    from prunekit.models import load_model, load_tokenizer, save_model

    model, tokenizer = load_model(str(tiny_models["llama"])), load_tokenizer(str(tiny_models["llama"]))
    out = tmp_path / "compressed"
    save_model(model, tokenizer, out, extra={"run": 1})

    def killed(folder):
        (folder / "qparams.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_model(model, tokenizer, out, extra={"run": 2}, more_files=killed)
    assert json.loads((out / "prunekit.json").read_text()) == {"run": 1}
    assert not (out / "qparams.safetensors").exists()
    save_model(model, tokenizer, out, extra={"run": 3}, more_files=lambda folder: (folder / "grids").write_text("g"))
    assert (out / "grids").read_text() == "g" and json.loads((out / "prunekit.json").read_text()) == {"run": 3}


LOAD_WITHOUT_PRUNEKIT = """
import json, math, sys
sys.modules["prunekit"] = None  # what a user without prunekit has: importing it fails
import torch
from transformers import AutoModelForCausalLM
folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(folder).eval()  # transformers' default path
with torch.no_grad():
    nll = model(input_ids=ids, labels=ids).loss.item()
from safetensors import safe_open
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
name = "model.layers.0.self_attn.q_proj"
weight = model.get_submodule(name).weight
with safe_open(f"{folder}/model.safetensors", "pt") as f:  # the grid as stored
    scale = f.get_tensor(name + ".weight_scale").float()
    zero = torch.zeros_like(scale)
    if name + ".weight_zero_point" in f.keys():
        zero = unpack_from_int32(f.get_tensor(name + ".weight_zero_point"), 4, scale.shape, packed_dim=0).float()
scale, zero = (t.repeat_interleave(weight.shape[1] // t.shape[1], dim=1) for t in (scale, zero))
codes = (weight.float() / scale + zero).round()  # on the grid: (code - zero) * scale, rounded to bf16
print(json.dumps({"ppl": math.exp(nll), "dtype": str(weight.dtype), "zeros": int((weight == 0).sum()),
                  "on_grid": torch.equal(weight, ((codes - zero) * scale).to(weight.dtype)),
                  "codes": [codes.min().item(), codes.max().item()]}))
"""


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_form_loads_without_prunekit(sym, tiny_models, tmp_path, monkeypatch):
    """The W4A16 folder loads in a fresh process with transformers + compressed-tensors and no
    prunekit on transformers' default path (`from_pretrained(folder)`, no quantization_config
    passed; an asymmetric grid too), its perplexity is the pipeline's within 0.5%, its first linear is on
    the grid with the pipeline's zeros."""
    import math
    import subprocess
    import sys

    paths = run_stages(tmp_path, tiny_models["llama"], monkeypatch, quantize={"groupsize": 32, "sym": sym})
    ids = torch.randint(4, 500, (2, 48), generator=torch.Generator().manual_seed(2))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths.compressed, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    zeros = int((model.model.layers[0].self_attn.q_proj.weight == 0).sum())
    folder = paths.export / "compressed-tensors"
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PRUNEKIT, str(folder), json.dumps(ids.tolist())],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.bfloat16"
    assert abs(got["ppl"] / expected - 1) < 0.005, (got, expected)
    assert got["zeros"] == zeros > 0
    assert got["on_grid"] and -8 <= got["codes"][0] and got["codes"][1] <= (7 if sym else 15)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["symmetric"] == sym
    assert config.get("dequantize", False) == (not sym)  # transformers' compressed path loads symmetric grids only
    from compressed_tensors.quantization import QuantizationConfig

    assert QuantizationConfig.model_validate(config).config_groups["group_0"].weights.symmetric == sym


def test_a_grid_compressed_tensors_cannot_hold_or_an_unwritable_output_ends_in_one_line(tiny_models, tmp_path,
                                                                                         monkeypatch):
    """Groups of 48 on 128-wide inputs (prunekit's grid allows a narrower last group,
    compressed-tensors does not), then an output folder that cannot be created: each refusal
    is one ConfigError line and leaves no export behind, half-written or not."""
    from prunekit.config import ConfigError, Params
    from prunekit.steps import call
    from stages import export, quantize

    with pytest.raises(ConfigError, match="groupsize 48 does not divide the input width 128 of model.layers.0.mlp.down_proj"):
        run_stages(tmp_path, tiny_models["llama"], monkeypatch, quantize={"groupsize": 48})
    exports = tmp_path / "data" / "export"
    assert not exports.exists() or not any(exports.iterdir())

    params = Params.model_validate(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    params = params.model_copy(update={"quantize": params.quantize.model_copy(update={"groupsize": 32})})
    quantize.run(params, call)
    shutil.rmtree(exports, ignore_errors=True)
    exports.write_text("not a folder")  # data/export is a file: nothing can be written under it
    with pytest.raises(ConfigError, match="export to .* failed") as refused:
        export.run(params, call)
    assert "\n" not in str(refused.value)
    assert exports.read_text() == "not a folder"


@pytest.mark.parametrize("bits,sym,groupsize", [(4, False, 64), (4, True, 32), (8, True, None), (4, False, None)])
def test_gguf_blocks_hold_the_grid_up_to_fp16_scales(bits, sym, groupsize):
    """Our codes written as GGUF blocks (Q4_1, Q4_0, Q8_0) and read back by the gguf package's own
    dequantizer give the pipeline's weights up to the fp16 rounding of each block's scale (and
    offset); the symmetric types keep the pruned zeros exact."""
    from gguf.quants import dequantize

    from prunekit.kernels import rtn
    from prunekit.storage.gguf_form import _blocks, block_type

    W = magnitude(torch.randn(48, 128, generator=torch.Generator().manual_seed(5)), 0.7).weight
    res = rtn(W, QuantSpec(bits=bits, sym=sym, groupsize=groupsize))
    data, qtype = _blocks(res.weight, (res.scales, res.zeros), bits, sym, groupsize)
    assert qtype == block_type(bits, sym) and qtype.name == {(4, False): "Q4_1", (4, True): "Q4_0", (8, True): "Q8_0"}[(bits, sym)]
    back = torch.from_numpy(dequantize(data, qtype).astype("float32")).reshape(W.shape)
    step = res.scales.repeat_interleave(groupsize or 128, dim=1)  # each weight's grid step
    assert float(((back - res.weight).abs() / step).max()) < (16 if bits == 4 else 256) * 2**-10
    if sym:
        assert torch.equal(back == 0, res.weight == 0)
    else:
        assert float((back[res.weight == 0].abs() / step[res.weight == 0]).max()) < 16 * 2**-10


def test_grids_gguf_cannot_hold_are_named():
    from prunekit.storage.gguf_form import gguf_form

    base = {"bits": 4, "sym": False, "groupsize": 128, "head": {"bits": 4}}
    assert gguf_form(base, [640, 2048]) is None and gguf_form(None, [33]) is None
    assert "3-bit grid has no GGUF block type" in gguf_form({**base, "bits": 3}, [640])
    assert "the LM head' asymmetric 8-bit" in gguf_form({**base, "head": {"bits": 8}}, [640])
    assert "groups of 48 columns" in gguf_form({**base, "groupsize": 48}, [96])
    assert "input widths [40]" in gguf_form({**base, "groupsize": None}, [40, 64])
