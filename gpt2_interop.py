"""GPT-2 and Hugging Face interop: our tokenizer and model in the formats other software
reads, and GPT-2's own files read by ours.

- tokenizer_from_gpt2_files: GPT-2's vocab.json and merges.txt as a BPETokenizer that
  encodes exactly as GPT-2 does.
- save_hf_tokenizer: a BPETokenizer as a Hugging Face tokenizer.json that encodes the same.
- gpt2_incompatibilities, to_hf_gpt2: a model whose configuration is GPT-2's architecture (learned positions, full
  attention, pre-norm, tanh GELU, biases, tied head) as a transformers.GPT2LMHeadModel with
  the same weights and the same logits (any other configuration is refused, the fields
  that differ named). The tests and benchmarks use it to check our model and our decoding
  against Hugging Face's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from bpe_tokenizer import ENDOFTEXT, BPETokenizer, TokenizerFileError, bytes_to_text, read_text_file, text_to_bytes
from common import write_atomically
from transformer_model import TransformerConfig, TransformerLM, unwrap_model


def tokenizer_from_gpt2_files(
    vocab_json: str | os.PathLike, merges_txt: str | os.PathLike, special_tokens: list[str] | None = None
) -> BPETokenizer:
    """Read GPT-2's vocab.json and merges.txt. special_tokens None means GPT-2's own
    <|endoftext|> (id 50256); any others are appended after it."""
    vocab_text, merges_text = read_text_file(vocab_json), read_text_file(merges_txt)
    try:
        vocab = {int(i): text_to_bytes(token) for token, i in json.loads(vocab_text).items()}
        merges = []
        for line in merges_text.splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            a, b = line.split(" ")
            merges.append((text_to_bytes(a), text_to_bytes(b)))
    except (json.JSONDecodeError, AttributeError, ValueError) as err:
        raise TokenizerFileError(f"{vocab_json} / {merges_txt}: not GPT-2 tokenizer files: {err}") from None
    if special_tokens is None:
        special_tokens = [ENDOFTEXT] if ENDOFTEXT.encode() in vocab.values() else []
    return BPETokenizer(vocab, merges, special_tokens)


def save_hf_tokenizer(tokenizer: BPETokenizer, path: str | os.PathLike) -> None:
    """Write a Hugging Face tokenizer.json that tokenizers.Tokenizer.from_file loads and
    that encodes exactly like tokenizer: our regex as a Split pre-tokenizer, then
    the byte-to-character map, then BPE with our vocabulary and merges."""
    special_ids = set(tokenizer.special_tokens.values())
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for s, i in tokenizer.special_tokens.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {bytes_to_text(t): i for i, t in tokenizer.vocab.items() if i not in special_ids}
            | {s: i for s, i in tokenizer.special_tokens.items()},
            "merges": [[bytes_to_text(a), bytes_to_text(b)] for a, b in tokenizer.merges],
        },
    }
    text = json.dumps(data, ensure_ascii=False)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def gpt2_incompatibilities(config: TransformerConfig) -> list[str]:
    """The config fields that keep this model from being GPT-2's architecture."""
    problems = []
    if config.position_embedding != "learned":
        problems.append(f"position_embedding={config.position_embedding!r} (GPT-2 learns its positions)")
    if config.window_size is not None and config.window_size < config.max_position_embeddings:
        problems.append(f"window_size={config.window_size} (GPT-2 attends to its whole context)")
    if config.norm_position != "pre":
        problems.append(f"norm_position={config.norm_position!r} (GPT-2 is pre-norm)")
    if config.activation != "gelu_tanh":
        problems.append(f"activation={config.activation!r} (GPT-2 uses the tanh approximation, gelu_tanh)")
    if not config.bias:
        problems.append("bias=False (GPT-2 has biases)")
    if not config.tie_word_embeddings:
        problems.append("tie_word_embeddings=False (GPT-2 ties its LM head to the embedding)")
    if config.qk_norm:
        problems.append("qk_norm=True (GPT-2 does not normalise queries and keys)")
    if config.skip_weights:
        problems.append("skip_weights=True (GPT-2's blocks read the residual stream alone)")
    return problems


def to_hf_gpt2(model: TransformerLM, eos_token_id: int | None = None) -> nn.Module:
    """A transformers.GPT2LMHeadModel with this model's weights, giving the same logits.
    Only for configurations that are GPT-2's architecture; otherwise a ValueError names the
    fields that are not. eos_token_id (our <|endoftext|>) tells Hugging Face generate where to stop."""
    model = unwrap_model(model)
    config = model.config
    problems = gpt2_incompatibilities(config)
    if problems:
        raise ValueError("not a GPT-2 architecture: " + "; ".join(problems))
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers, n_head=config.num_attention_heads, n_inner=config.intermediate_size,
        activation_function="gelu_new", resid_pdrop=config.dropout, embd_pdrop=config.dropout,
        attn_pdrop=config.attention_dropout, layer_norm_epsilon=config.layer_norm_eps, tie_word_embeddings=True,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
    ))
    state = {"transformer.wte.weight": model.embed_tokens.weight, "transformer.wpe.weight": model.embed_positions.weight,
             "transformer.ln_f.weight": model.final_norm.weight, "transformer.ln_f.bias": model.final_norm.bias,
             "lm_head.weight": model.embed_tokens.weight}
    for i, block in enumerate(model.blocks):
        # GPT-2's Conv1D stores weights as (in, out): the transpose of nn.Linear's.
        for ours, theirs in ((block.norm1, "ln_1"), (block.norm2, "ln_2"), (block.attention.qkv, "attn.c_attn"),
                             (block.attention.proj, "attn.c_proj"), (block.feed_forward.fc1, "mlp.c_fc"),
                             (block.feed_forward.fc2, "mlp.c_proj")):
            weight = ours.weight.T if isinstance(ours, nn.Linear) else ours.weight
            state[f"transformer.h.{i}.{theirs}.weight"] = weight
            state[f"transformer.h.{i}.{theirs}.bias"] = ours.bias
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return hf.to(model.embed_tokens.weight.device).eval()
