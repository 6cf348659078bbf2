"""Layer sources (prunekit/forward/sources.py): the streamed one bit-identical to the in-memory one,
one layer at a time."""
import json
import os
import re
import shutil
from unittest import mock

import pytest
import torch
import yaml
from conftest import tiny_params
from tiny import full_forward_nll

from prunekit.compression.hessians import collect_hessians
from prunekit.compression.prune import prune_model
from prunekit.config import ConfigError, Params, PruneParams
from prunekit.forward.layerwise import LayerwiseRunner
from prunekit.forward.scoring import perplexity
from prunekit.forward.sources import InMemoryModel, StreamedModel
from prunekit.models import adapter_for, load_model, load_tokenizer, prunable_parameters
from prunekit.steps import call
from prunekit.storage.checkpoint import INDEX_FILE, CheckpointReader
from prunekit.storage.hessian_store import HessianStore

CPU = torch.device("cpu")


def windows(n: int = 4, seqlen: int = 32) -> torch.Tensor:
    w = torch.randint(3, 500, (n, seqlen), generator=torch.Generator().manual_seed(0))
    w[:, 0] = 1
    return w


def loaded_params(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.device.type != "meta"}


def no_whole_model():
    """Every from_pretrained of a model (load_model's included) fails while this patch is active."""
    from transformers import PreTrainedModel

    return mock.patch.object(PreTrainedModel, "from_pretrained",
                             side_effect=AssertionError("a streamed stage loaded the whole model"))


@pytest.mark.parametrize("model_type", ["opt", "llama", "gemma3_text"])  # tied head, untied, tied + rotary
def test_streamed_hessians_equal_in_memory(model_type, tiny_models, tmp_path):
    model_dir = tiny_models[model_type]
    memory = InMemoryModel.load(model_dir)
    dense = HessianStore.open_for_writing(tmp_path / "dense.zarr", "m", "c", 3, "float32")
    collect_hessians(memory, memory.runner(windows()), dense, torch.float32)

    stream = StreamedModel(model_dir, CPU)
    assert not loaded_params(stream.model)
    streamed = HessianStore.open_for_writing(tmp_path / "streamed.zarr", "m", "c", 3, "float32")
    collect_hessians(stream, stream.runner(windows()), streamed, torch.float32)
    assert not loaded_params(stream.model)  # everything went back to meta
    for i in range(3):
        a, b = dense.read_layer(i), streamed.read_layer(i)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key][0], b[key][0]) and a[key][1] == b[key][1], (i, key)


def test_only_the_current_layer_is_in_memory(tiny_models):
    stream = StreamedModel(tiny_models["llama"], CPU)
    with stream.outside_layers():
        assert loaded_params(stream.model) == {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(3):
        with stream.layer(i) as layer:
            expected = {f"model.layers.{i}.{n}" for n, _ in layer.named_parameters()}
            assert loaded_params(stream.model) == expected
    assert not loaded_params(stream.model)


@pytest.mark.parametrize("model_type", ["opt", "llama", "gemma3_text"])  # tied head, untied, tied + rotary
def test_streamed_perplexity_equals_in_memory(model_type, tiny_models, tmp_path):
    model_dir = tiny_models[model_type]
    dense = perplexity(InMemoryModel.load(model_dir), windows())
    stream = StreamedModel(model_dir, CPU)
    streamed = perplexity(stream, windows())
    assert not loaded_params(stream.model)
    assert perplexity(stream, windows()) == streamed  # a stream serves several passes
    assert streamed == dense  # the same tensors through the same code
    assert streamed["tokens"] == 4 * 31
    assert streamed["nll"] == pytest.approx(full_forward_nll(load_model(str(model_dir)), windows()), rel=1e-5)


@pytest.mark.parametrize("model_type,names", [
    ("llama", {"model.norm.weight", "lm_head.weight"}),
    ("opt", {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias",
             "lm_head.weight", "model.decoder.embed_tokens.weight"}),  # tied: the head is the embedding
])
def test_head_loads_the_final_norm_and_the_head_only(model_type, names, tiny_models):
    model = load_model(str(tiny_models[model_type]))
    stream = StreamedModel(tiny_models[model_type], CPU)
    with stream.head() as skeleton:
        assert loaded_params(skeleton) == names
        assert torch.equal(skeleton.lm_head.weight, model.lm_head.weight)
    assert not loaded_params(stream.model)


def prune_both(model_dir, tmp_path, mode: str) -> tuple:
    """The prune stage's two paths on one model: (in-memory folder, streamed folder)."""
    memory = InMemoryModel.load(model_dir, out_dir=tmp_path / "memory")
    sparsity = dict.fromkeys(prunable_parameters(memory.model, memory.adapter), 0.6)
    params = PruneParams(sparsity=0.6, mode=mode)
    store = None
    if mode == "parallel":
        store = HessianStore.open_for_writing(tmp_path / "h.zarr", "m", "c", 3, "float32")
        collect_hessians(memory, memory.runner(windows()), store, torch.float32)
    tokenizer = load_tokenizer(str(model_dir))
    for source in (memory, StreamedModel(model_dir, CPU, out_dir=tmp_path / "streamed")):
        runner = source.runner(windows()) if store is None else None
        stats = prune_model(source, sparsity, params, runner=runner, store=store)
        source.save(tokenizer, {"linears": stats})
    return tmp_path / "memory", tmp_path / "streamed"


@pytest.mark.parametrize("model_type,mode", [("opt", "sequential"), ("llama", "sequential"), ("llama", "parallel"),
                                             ("gemma3_text", "sequential")])
def test_streamed_pruning_is_bit_identical(model_type, mode, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    memory, streamed = prune_both(tiny_models[model_type], tmp_path, mode)
    assert (streamed / INDEX_FILE).is_file() and not (tmp_path / "streamed.tmp").exists()
    for name in ("prunekit.json", "config.json", "generation_config.json", "tokenizer.json"):
        assert (memory / name).read_text() == (streamed / name).read_text(), name  # fingerprint included
    a = AutoModelForCausalLM.from_pretrained(memory).state_dict()
    b = AutoModelForCausalLM.from_pretrained(streamed).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (b["model.layers.0.mlp.down_proj.weight" if model_type != "opt" else
              "model.decoder.layers.0.fc2.weight"] == 0).float().mean() > 0.5
    tied = AutoModelForCausalLM.from_pretrained(streamed)
    assert (tied.lm_head.weight is tied.get_input_embeddings().weight) == tied.config.tie_word_embeddings
    if tied.config.tie_word_embeddings:  # stored once, like save_pretrained does
        assert "lm_head.weight" not in json.loads((streamed / INDEX_FILE).read_text())["weight_map"]


def test_stream_reads_a_sharded_checkpoint(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / INDEX_FILE).is_file()
    stream = StreamedModel(tmp_path / "sharded", CPU)
    runner = stream.runner(windows())
    with stream.layer(0):
        streamed = runner.hessians(0)
    model = load_model(str(tiny_models["llama"]))
    dense = LayerwiseRunner(model, adapter_for(model), windows(), CPU).hessians(0)
    assert all(torch.equal(dense[k].H, streamed[k].H) for k in dense)


def run_stages(model_dir, root, stream: bool):
    """Every stage from prepare_model to export, with evaluate of the three models, in `root`
    (uniform schedule instead of the schedule stage); returns the run's Paths. With `stream`,
    no stage ever loads the whole model."""
    from contextlib import nullcontext

    from prunekit.artifacts import write_json
    from stages import baseline, calibrate, estimate, evaluate, export, hessians, prepare_model, prune, quantize
    from stages.common import Paths

    params = Params.model_validate(tiny_params(model_dir, runtime={"device": "cpu", "stream": stream}))
    root.mkdir()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
        paths = Paths.of(params)
        with no_whole_model() if stream else nullcontext():
            for stage in (prepare_model, calibrate):
                stage.check(params)
                stage.run(params, call)
            skeleton = StreamedModel(paths.model, CPU)  # the schedule needs the shapes only
            sparsity = dict.fromkeys(prunable_parameters(skeleton.model, skeleton.adapter), 0.7)
            write_json(paths.schedule, {"target": params.prune.sparsity, "sparsity": sparsity})
            for stage in (hessians, estimate, prune, quantize, export):
                stage.check(params)
                stage.run(params, call)
            for variant in baseline.VARIANTS:
                baseline.run(params, call, variant)
            for variant in evaluate.VARIANTS:
                evaluate.run(params, call, variant)
    finally:
        os.chdir(cwd)
    return paths


@pytest.mark.pipeline
def test_stream_param_in_the_stages(tiny_models, tmp_path):
    import pandas as pd

    from prunekit.storage.packing import MANIFEST, WEIGHTS
    from stages.common import VARIANTS

    memory = run_stages(tiny_models["opt"], tmp_path / "memory", stream=False)
    streamed = run_stages(tiny_models["opt"], tmp_path / "streamed", stream=True)
    for out in ("pruned", "compressed", "uniform", "quantized"):
        a, b = getattr(memory, out), getattr(streamed, out)
        assert (a / "prunekit.json").read_text() == (b / "prunekit.json").read_text(), out
    assert (memory.compressed / "qparams.safetensors").read_bytes() == \
        (streamed.compressed / "qparams.safetensors").read_bytes()
    meta = [json.loads((out.pruned / "prunekit.json").read_text()) for out in (memory, streamed)]
    a = HessianStore.open_for_reading(memory.hessians, meta[0]["dense_fingerprint"])
    b = HessianStore.open_for_reading(streamed.hessians, meta[1]["dense_fingerprint"])
    for i in range(3):
        assert all(torch.equal(h, b.read_layer(i)[k][0]) for k, (h, _) in a.read_layer(i).items())

    pd.testing.assert_frame_equal(pd.read_parquet(memory.estimates), pd.read_parquet(streamed.estimates))

    for variant in VARIANTS:
        a, b = (json.loads((out.reports / "metrics" / f"{variant}.json").read_text()) for out in (memory, streamed))
        assert {k: v for k, v in a.items() if k not in ("ppl", "details")} == \
            {k: v for k, v in b.items() if k not in ("ppl", "details")}
        assert a["ppl"].keys() == b["ppl"].keys() == {"wikitext2", "c4"}
        for name in a["ppl"]:
            assert b["details"][name] == a["details"][name], (variant, name)  # one code path, same tensors

    # The export reads the sharded streamed model and the single-file in-memory one alike.
    for name in ("packed/" + WEIGHTS, "packed/" + MANIFEST, "packed/config.json", "hf/model.safetensors",
                 "compressed-tensors/model.safetensors", "compressed-tensors/config.json"):
        assert (memory.export / name).read_bytes() == (streamed.export / name).read_bytes(), name
    a, b = (json.loads((out.export / "export.json").read_text()) for out in (memory, streamed))
    for summary in (a, b):  # the stored files themselves differ: one file against one shard per layer
        del summary["source_sha256"], summary["bytes"]["stored_files"]
    assert a == b


def prepare(source, root, stream: bool):
    """The prepare_model stage on `source`, run in `root`; returns the prepared model's folder."""
    from stages import prepare_model
    from stages.common import Paths

    params = Params.model_validate(tiny_params(source, runtime={"device": "cpu", "stream": stream}))
    root.mkdir()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        prepare_model.run(params, call)
    finally:
        os.chdir(cwd)
    return Paths.of(params, root).model


@pytest.mark.parametrize("model_type,variant", [("opt", "as saved"), ("llama", "as saved"),
                                                ("llama", "bf16 shards")])
def test_streamed_prepare_equals_in_memory(model_type, variant, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tiny_models[model_type]
    if variant == "bf16 shards":  # cast to float32 on read, like load_model; its own generation config
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        model.generation_config.update(do_sample=True, temperature=0.7)
        model.save_pretrained(tmp_path / "source", max_shard_size="40KB")
        load_tokenizer(str(source)).save_pretrained(tmp_path / "source")
        source = tmp_path / "source"
        assert (source / INDEX_FILE).is_file()
    memory = prepare(source, tmp_path / "memory", stream=False)
    with no_whole_model():
        streamed = prepare(source, tmp_path / "streamed", stream=True)
    assert (streamed / INDEX_FILE).is_file() and not streamed.with_name(streamed.name + ".tmp").exists()
    for name in ("prunekit.json", "config.json", "generation_config.json", "tokenizer.json"):
        assert (memory / name).read_text() == (streamed / name).read_text(), name  # fingerprint included
    assert json.loads((streamed / "prunekit.json").read_text()).keys() == {"source", "fingerprint", "model_type",
                                                                          "n_layers"}
    # The same tensors stored (a tied head once, as the embedding), loading to the same model.
    assert CheckpointReader(memory).weight_map.keys() == CheckpointReader(streamed).weight_map.keys()
    a, b = (load_model(str(folder)).state_dict() for folder in (memory, streamed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"])  # layer; rest
def test_streamed_prepare_refuses_nan_weights(bad, tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "nan"
    shutil.copytree(tiny_models["llama"], source)
    tensors = load_file(source / "model.safetensors")
    tensors[bad][3, 5] = float("nan")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    message = f"model {source} has NaN or inf weights in {bad}; refusing to prepare it"
    with no_whole_model(), pytest.raises(ConfigError, match=re.escape(message)):
        prepare(source, tmp_path / "run", stream=True)
    models = tmp_path / "run" / "data" / "models"
    assert not models.exists() or not any(models.iterdir())  # neither the model nor its temporary folder


def test_prepare_streams_local_safetensors_only(tiny_models, tmp_path):
    from stages.prepare_model import why_not_streamed

    assert why_not_streamed(str(tiny_models["llama"])) is None
    (tmp_path / "model.gguf").touch()
    assert "GGUF" in why_not_streamed(str(tmp_path / "model.gguf"))
    assert "hub id" in why_not_streamed("facebook/opt-125m")
    (tmp_path / "bin").mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", tmp_path / "bin")
    assert "no safetensors" in why_not_streamed(str(tmp_path / "bin"))


def test_stream_refuses_checkpoint_names_it_does_not_know(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "legacy"  # OPT's hub checkpoints lack the "model." prefix
    shutil.copytree(tiny_models["opt"], source)
    tensors = load_file(source / "model.safetensors")
    save_file({k.removeprefix("model."): t for k, t in tensors.items()}, source / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="checkpoint lacks .*runtime.stream: false"):
        StreamedModel(source, CPU)


def test_tensor_file_writer_round_trips_and_aligns(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from prunekit.storage.checkpoint import TensorFileWriter

    tensors = {"mask": torch.arange(7, dtype=torch.uint8), "w": torch.randn(3, 5), "h": torch.randn(9).half(),
               "flag": torch.tensor(True), "empty": torch.zeros(0, 4), "ids": torch.arange(3)}
    writer = TensorFileWriter(tmp_path / "t.safetensors", metadata={"format": "test"})
    for name, t in tensors.items():
        writer.write(name, t)
    with pytest.raises(ValueError, match="twice"):
        writer.write("w", tensors["w"])
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # the part files are gone
    loaded = load_file(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], t) for k, t in tensors.items())
    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert f.metadata() == {"format": "test"}
    raw = (tmp_path / "t.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    for name, entry in json.loads(raw[8 : 8 + n]).items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name


def test_packed_tensors_read_back_by_name(tmp_path):
    from prunekit.storage import packing

    W = torch.randn(8, 16) * (torch.rand(8, 16) > 0.7)
    state = {"lin": W, "emb": torch.randn(4, 3), "lin2": W.T.contiguous()}
    packing.save_packed(tmp_path, *packing.pack_state(state, ["lin", "lin2"], float_dtype=None))
    assert packing.load_packed(tmp_path, ["lin2", "emb"]).keys() == {"lin2", "emb"}
    assert all(torch.equal(packing.load_packed(tmp_path, [n])[n], t) for n, t in state.items())
    assert all(torch.equal(packing.load_packed(tmp_path)[n], t) for n, t in state.items())


def test_reader_chunks_and_writer_index(tmp_path):
    from prunekit.storage.checkpoint import CheckpointReader, ShardWriter

    a, b = torch.randn(100, 7), torch.randn(3)
    writer = ShardWriter(tmp_path)
    writer.write({"a": a})
    writer.write({"b": b})
    writer.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == (700 + 3) * 4
    reader = CheckpointReader(tmp_path)
    parts = list(reader.chunks("a", max_bytes=7 * 4 * 30))  # 30 rows a chunk
    assert [len(p) for p in parts] == [30, 30, 30, 10]
    assert torch.equal(torch.cat(parts), a) and torch.equal(reader.read(["b"])["b"], b)
