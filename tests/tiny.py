"""Tiny random causal LMs of every supported architecture, built from configs (no network).

A small BPE tokenizer is trained on WikiText-2 validation text so the models see real token
statistics; it prepends BOS like Gemma's, so the BOS code paths run too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from prunekit.data import WIKITEXT

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
HIDDEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)

CONFIGS = {
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=64),
    "bloom": dict(hidden_size=64, n_layer=3, n_head=4),
    "llama": dict(**HIDDEN, num_key_value_heads=2),
    "qwen2": dict(**HIDDEN, num_key_value_heads=2),
    "mistral": dict(**HIDDEN, num_key_value_heads=2, sliding_window=64),
    "gemma3_text": dict(**HIDDEN, num_key_value_heads=1, head_dim=16, sliding_window=32,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}


def train_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = WIKITEXT["wikitext2-valid"].read_text("utf-8").splitlines()[:2000]
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_model(model_type: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny model of `model_type` with the shared tokenizer into out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **COMMON, **CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def full_forward_nll(model, windows: torch.Tensor) -> float:
    """The test oracle for the scoring path: mean next-token NLL from the model's own forward
    (whole model, full-vocabulary logits), one window at a time."""
    import torch.nn.functional as F

    total = 0.0
    for row in windows:
        logits = model(input_ids=row.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, row[1:], reduction="sum").item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))
