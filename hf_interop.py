"""Hugging Face and GPT-2 interop: our tokenizer and model in the formats other software
reads, and those formats read back by ours.

The tokenizer:
- tokenizer_from_gpt2_files: GPT-2's vocab.json and merges.txt as a BPETokenizer that
  encodes exactly as GPT-2 does.
- save_hf_tokenizer / tokenizer_from_hf_json: a BPETokenizer as a Hugging Face tokenizer.json
  that encodes the same, and back.
- CHAT_TEMPLATE, hf_tokenizer_config: the chat template in Jinja, for apply_chat_template.

The model. Each configuration goes to the one transformers architecture that computes exactly
what it does, or is refused with the fields that have no exact twin named (ExportError):

    positions learned, sinusoidal or none  ->  GPT2LMHeadModel (the sinusoidal table as wpe)
    RoPE, with or without a window         ->  Starcoder2ForCausalLM (sliding_window)
    RoPE with QK-norm                      ->  the same plus starcoder2_qk_norm.py (remote code)
    ALiBi                                  ->  MptForCausalLM (no biases, MLP 4x, exact GELU)

- hf_architecture: which of these, or ExportError.
- WeightLink, weight_links: for every exported tensor, where it comes from in our model.
- hf_config: the transformers config.json, with our own config inside for the way back.
- hf_state_dict / state_from_hf: our weights to theirs and back, both by the same links.
- to_hf_model: the transformers model in memory (tests and benchmarks compare against it).
- save_hf_folder / load_hf_folder: an exported folder (config, safetensors, generation
  config, tokenizer files, model card), and back to (TransformerLM, BPETokenizer, metadata).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from bpe_tokenizer import ENDOFTEXT, BPETokenizer, TokenizerFileError, bytes_to_text, read_text_file, text_to_bytes
from common import write_atomically, write_folder_atomically
from transformer_model import RELEASED_METADATA, CheckpointError, TransformerConfig, TransformerLM, unwrap_model

# ----------------------------------------------------------------------- tokenizer


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


def tokenizer_from_hf_json(path: str | os.PathLike) -> BPETokenizer:
    """A tokenizer.json written by save_hf_tokenizer, read back as the BPETokenizer it came from."""
    try:
        data = json.loads(read_text_file(path))
        specials = {token["content"]: token["id"] for token in data["added_tokens"]}
        vocab = {i: text_to_bytes(s) for s, i in data["model"]["vocab"].items() if s not in specials}
        vocab |= {i: s.encode("utf-8") for s, i in specials.items()}
        merges = [(text_to_bytes(a), text_to_bytes(b)) for a, b in data["model"]["merges"]]
        pattern = data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
        return BPETokenizer(vocab, merges, sorted(specials, key=specials.get), pattern)
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise TokenizerFileError(f"{path}: not a tokenizer.json written by this project ({err})") from None


# Our apply_chat_template in Jinja: each turn is its role's token and its content, a reply
# ends with <|endoftext|>. (Ours always encodes content as text; Hugging Face renders to text
# first, so a "<user>" typed inside a message would become the special token there.)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant') }}{% endif %}"
    "{{ '<' + message['role'] + '>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|endoftext|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def special_tokens_map(tokenizer: BPETokenizer) -> dict:
    """special_tokens_map.json: <|endoftext|> ends a text and pads; the chat roles are the others."""
    return {"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
            "additional_special_tokens": [s for s in tokenizer.special_tokens if s != ENDOFTEXT]}


def hf_tokenizer_config(tokenizer: BPETokenizer, context: int) -> dict:
    """tokenizer_config.json: the fast tokenizer class, no BOS, the special tokens, the chat template."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "add_bos_token": False,
            "model_max_length": context, "clean_up_tokenization_spaces": False, **special_tokens_map(tokenizer),
            "chat_template": CHAT_TEMPLATE}


# -------------------------------------------------------------------- architecture

class ExportError(ValueError):
    """A model configuration with no exact twin in transformers (or GGUF); the message names the fields."""


def windowed(config: TransformerConfig) -> bool:
    """Whether the attention window is shorter than the context, so that it changes outputs."""
    return config.window_size is not None and config.window_size < config.max_position_embeddings


def mpt_problems(config: TransformerConfig) -> list[str]:
    """What keeps an ALiBi model from being MPT, whose layers have no biases, whose MLP is 4x
    wide with exact GELU, and whose slopes match ours for a power-of-two number of heads."""
    problems = []
    if config.bias:
        problems.append("bias=True with position_embedding='alibi' (MPT, the ALiBi architecture, has no biases)")
    if config.intermediate_size != 4 * config.hidden_size:
        problems.append(f"intermediate_size={config.intermediate_size} (MPT's MLP is 4 x hidden_size)")
    if config.activation != "gelu":
        problems.append(f"activation={config.activation!r} (MPT uses exact GELU)")
    if config.num_attention_heads & (config.num_attention_heads - 1):
        problems.append(f"num_attention_heads={config.num_attention_heads} (MPT's ALiBi slopes match ours only "
                        "for a power of two)")
    if not config.tie_word_embeddings:
        problems.append("tie_word_embeddings=False (MPT ties its head to the embedding)")
    return problems


def hf_problems(config: TransformerConfig) -> tuple[str, list[str]]:
    """The architecture for this config's positions ("gpt2", "starcoder2" or "mpt"), and every
    field that keeps it from computing exactly what config does (empty if none).
    (BLOOM, the other ALiBi architecture, is never exact: it normalises the embeddings.)"""
    architecture = {"learned": "gpt2", "sinusoidal": "gpt2", "none": "gpt2", "rope": "starcoder2",
                    "alibi": "mpt"}[config.position_embedding]
    problems = []
    if config.norm_position != "pre":
        problems.append(f"norm_position={config.norm_position!r} (every exported architecture is pre-norm)")
    if config.skip_weights:
        problems.append("skip_weights=True (no exported architecture mixes the input back into each block)")
    if config.qk_norm and architecture != "starcoder2":
        problems.append(f"qk_norm=True with position_embedding={config.position_embedding!r} (only the RoPE "
                        "export carries QK-norm)")
    if windowed(config) and architecture != "starcoder2":
        problems.append(f"window_size={config.window_size} (GPT-2 and MPT attend to their whole context of "
                        f"{config.max_position_embeddings}; only the RoPE export has a sliding window)")
    if architecture == "mpt":
        problems += mpt_problems(config)
    return architecture, problems


def hf_architecture(config: TransformerConfig) -> str:
    """"gpt2", "starcoder2", "starcoder2_qk_norm" or "mpt": the architecture that computes exactly
    what config does. Otherwise ExportError, naming every field without an exact twin."""
    architecture, problems = hf_problems(config)
    if problems:
        raise ExportError("no exact Hugging Face architecture for this model: " + "; ".join(problems))
    return "starcoder2_qk_norm" if config.qk_norm else architecture


HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu2": "relu2"}  # transformers' ACT2FN names


def gpt2_config(config: TransformerConfig) -> dict:
    c = config
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_positions": c.max_position_embeddings, "n_embd": c.hidden_size, "n_layer": c.num_hidden_layers,
            "n_head": c.num_attention_heads, "n_inner": c.intermediate_size,
            "activation_function": HF_ACTIVATIONS[c.activation], "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
            "attn_pdrop": c.attention_dropout, "layer_norm_epsilon": c.layer_norm_eps,
            "initializer_range": c.initializer_range,
            # Sinusoidal positions scale the token embeddings up, so the head needs its own copy.
            "tie_word_embeddings": c.tie_word_embeddings and c.position_embedding != "sinusoidal"}


def starcoder2_config(config: TransformerConfig) -> dict:
    c = config
    result = {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "vocab_size": c.vocab_size,
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_attention_heads, "hidden_act": HF_ACTIVATIONS[c.activation],
              "max_position_embeddings": c.max_position_embeddings, "norm_epsilon": c.layer_norm_eps,
              "initializer_range": c.initializer_range, "rope_theta": c.rope_theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
              "sliding_window": c.window_size if windowed(c) else None, "attention_dropout": c.attention_dropout,
              "residual_dropout": c.dropout, "embedding_dropout": c.dropout, "use_bias": c.bias,
              "tie_word_embeddings": c.tie_word_embeddings}
    if c.qk_norm:  # Starcoder2 plus the remote-code file that normalises queries and keys
        result |= {"architectures": ["Starcoder2QKNormForCausalLM"], "model_type": "starcoder2_qk_norm",
                   "auto_map": {"AutoConfig": "starcoder2_qk_norm.Starcoder2QKNormConfig",
                                "AutoModelForCausalLM": "starcoder2_qk_norm.Starcoder2QKNormForCausalLM"}}
    return result


def mpt_config(config: TransformerConfig) -> dict:
    c = config
    return {"architectures": ["MptForCausalLM"], "model_type": "mpt", "vocab_size": c.vocab_size,
            "d_model": c.hidden_size, "n_heads": c.num_attention_heads, "n_layers": c.num_hidden_layers,
            "expansion_ratio": 4, "max_seq_len": c.max_position_embeddings, "resid_pdrop": c.dropout,
            "emb_pdrop": c.dropout, "layer_norm_epsilon": c.layer_norm_eps, "no_bias": True,
            "initializer_range": c.initializer_range, "tie_word_embeddings": True,
            # (transformers types MPT's attn_pdrop as an int: attention dropout is not exported.)
            "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0,
                            "softmax_scale": None, "attn_type": "multihead_attention", "clip_qkv": None,
                            "qk_ln": False, "prefix_lm": False, "attn_impl": "torch"}}


def hf_config(config: TransformerConfig, eos_token_id: int | None, metadata: dict | None = None) -> dict:
    """The transformers config.json for this model, with our config (and the checkpoint's
    plain metadata) inside, so that load_hf_folder gets back exactly what was exported."""
    architecture = hf_architecture(config)
    build = {"gpt2": gpt2_config, "mpt": mpt_config}.get(architecture, starcoder2_config)
    return build(config) | {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "dtype": "float32",
                            "tinystories_config": config.to_dict(), "tinystories_metadata": metadata or {}}


# ------------------------------------------------------------------------- weights

class WeightLink(NamedTuple):
    """One tensor of the exported model: its name there, and where it comes from here.
    source is our parameter's name, or None for a tensor that follows from the config alone
    (fixed: a position table, or a zero bias where we have none). part (i, n): the i-th of n
    equal row blocks of the source (our fused qkv, split into q, k and v). transpose: stored
    transposed (GPT-2's Conv1D). scale: multiplied by this (sinusoidal positions scale the
    token embeddings by sqrt(hidden_size))."""

    name: str
    source: str | None
    fixed: torch.Tensor | None = None
    part: tuple[int, int] | None = None
    transpose: bool = False
    scale: float = 1.0


def linear_links(name: str, ours: nn.Module, source: str, transpose: bool = False,
                 part: tuple[int, int] | None = None, zero_bias: bool = True) -> list[WeightLink]:
    """A linear layer's or LayerNorm's weight and bias. A bias we do not have is exported as
    zeros where the architecture always has one (zero_bias), else left out."""
    links = [WeightLink(f"{name}.weight", f"{source}.weight", part=part, transpose=transpose)]
    if ours.bias is not None:
        return [*links, WeightLink(f"{name}.bias", f"{source}.bias", part=part)]
    if not zero_bias:
        return links
    rows = ours.weight.shape[0] // (part[1] if part else 1)
    return [*links, WeightLink(f"{name}.bias", None, fixed=torch.zeros(rows))]


def gpt2_links(model: TransformerLM) -> list[WeightLink]:
    config = model.config
    positions = {"learned": lambda: WeightLink("transformer.wpe.weight", "embed_positions.weight"),
                 "sinusoidal": lambda: WeightLink("transformer.wpe.weight", None, fixed=model.sinusoidal_table),
                 "none": lambda: WeightLink("transformer.wpe.weight", None,
                                            fixed=torch.zeros(config.max_position_embeddings, config.hidden_size))}
    scale = math.sqrt(config.hidden_size) if config.position_embedding == "sinusoidal" else 1.0
    links = [WeightLink("transformer.wte.weight", "embed_tokens.weight", scale=scale),
             positions[config.position_embedding]()]
    for i, block in enumerate(model.blocks):
        for ours, source, theirs in ((block.norm1, "norm1", "ln_1"),
                                     (block.attention.qkv, "attention.qkv", "attn.c_attn"),
                                     (block.attention.proj, "attention.proj", "attn.c_proj"),
                                     (block.norm2, "norm2", "ln_2"),
                                     (block.feed_forward.fc1, "feed_forward.fc1", "mlp.c_fc"),
                                     (block.feed_forward.fc2, "feed_forward.fc2", "mlp.c_proj")):
            # GPT-2's Conv1D stores weights as (in, out): the transpose of nn.Linear's.
            links += linear_links(f"transformer.h.{i}.{theirs}", ours, f"blocks.{i}.{source}",
                                  transpose=isinstance(ours, nn.Linear))
    links += linear_links("transformer.ln_f", model.final_norm, "final_norm")
    if not gpt2_config(config)["tie_word_embeddings"]:
        head = "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        links.append(WeightLink("lm_head.weight", head))
    return links


def starcoder2_links(model: TransformerLM) -> list[WeightLink]:
    links = [WeightLink("model.embed_tokens.weight", "embed_tokens.weight")]
    for i, block in enumerate(model.blocks):
        layer, qkv = f"model.layers.{i}", block.attention.qkv
        links += linear_links(f"{layer}.input_layernorm", block.norm1, f"blocks.{i}.norm1")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):  # our qkv's rows: all queries, all keys, all values
            links += linear_links(f"{layer}.self_attn.{name}", qkv, f"blocks.{i}.attention.qkv", part=(j, 3),
                                  zero_bias=False)  # use_bias follows our bias: a bias we lack is left out
        for ours, source, theirs in ((block.attention.proj, "attention.proj", "self_attn.o_proj"),
                                     (block.feed_forward.fc1, "feed_forward.fc1", "mlp.c_fc"),
                                     (block.feed_forward.fc2, "feed_forward.fc2", "mlp.c_proj")):
            links += linear_links(f"{layer}.{theirs}", ours, f"blocks.{i}.{source}", zero_bias=False)
        links += linear_links(f"{layer}.post_attention_layernorm", block.norm2, f"blocks.{i}.norm2")
    links += linear_links("model.norm", model.final_norm, "final_norm")
    if not model.config.tie_word_embeddings:
        links.append(WeightLink("lm_head.weight", "lm_head.weight"))
    return links


def mpt_links(model: TransformerLM) -> list[WeightLink]:
    links = [WeightLink("transformer.wte.weight", "embed_tokens.weight")]
    for i, block in enumerate(model.blocks):
        prefix = f"transformer.blocks.{i}"
        links += linear_links(f"{prefix}.norm_1", block.norm1, f"blocks.{i}.norm1", zero_bias=False)  # MPT: no biases
        links += linear_links(f"{prefix}.norm_2", block.norm2, f"blocks.{i}.norm2", zero_bias=False)
        links += [WeightLink(f"{prefix}.attn.Wqkv.weight", f"blocks.{i}.attention.qkv.weight"),
                  WeightLink(f"{prefix}.attn.out_proj.weight", f"blocks.{i}.attention.proj.weight"),
                  WeightLink(f"{prefix}.ffn.up_proj.weight", f"blocks.{i}.feed_forward.fc1.weight"),
                  WeightLink(f"{prefix}.ffn.down_proj.weight", f"blocks.{i}.feed_forward.fc2.weight")]
    return links + linear_links("transformer.norm_f", model.final_norm, "final_norm", zero_bias=False)


def weight_links(model: TransformerLM) -> list[WeightLink]:
    """Every tensor of the exported model and where it comes from (ExportError if none fits)."""
    architecture = hf_architecture(model.config)
    return {"gpt2": gpt2_links, "mpt": mpt_links}.get(architecture, starcoder2_links)(model)


def hf_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32,
                  linear_layout: bool = False) -> dict[str, torch.Tensor]:
    """The exported model's weights (name -> tensor), computed from ours through weight_links.
    linear_layout keeps every matrix in nn.Linear's (out, in) layout, GPT-2's too (GGUF's way)."""
    model = unwrap_model(model)
    ours = dict(model.named_parameters())
    state = {}
    for link in weight_links(model):
        tensor = link.fixed if link.source is None else ours[link.source].detach()
        if link.part is not None:
            tensor = tensor.chunk(link.part[1])[link.part[0]]
        tensor = tensor.T if link.transpose and not linear_layout else tensor
        state[link.name] = (tensor.float() * link.scale).to(dtype).contiguous().cpu()
    return state


def state_from_hf(model: TransformerLM, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict for model's config from an exported state: hf_state_dict run backwards.
    A source exported twice (a tied embedding next to its scaled copy) is read where it was
    not scaled."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for link in sorted(weight_links(model), key=lambda link: link.scale != 1.0):
        if link.source is None or (link.part is None and link.source in pieces):
            continue
        tensor = state[link.name].float()
        tensor = (tensor.T if link.transpose else tensor) / link.scale
        pieces.setdefault(link.source, {})[link.part[0] if link.part else 0] = tensor
    return {source: torch.cat([parts[i] for i in sorted(parts)]) for source, parts in pieces.items()}


def to_hf_model(model: nn.Module, eos_token_id: int | None = None) -> nn.Module:
    """The transformers model (eval mode, on model's device) that gives model's logits: GPT-2,
    Starcoder2 (with QK-norm: starcoder2_qk_norm's class) or MPT. ExportError if none fits.
    eos_token_id (our <|endoftext|>) tells Hugging Face generate where to stop."""
    import transformers

    model = unwrap_model(model)
    settings = hf_config(model.config, eos_token_id)
    if settings["model_type"] == "starcoder2_qk_norm":
        import starcoder2_qk_norm

        config_class = starcoder2_qk_norm.Starcoder2QKNormConfig
        model_class = starcoder2_qk_norm.Starcoder2QKNormForCausalLM
    else:
        config_class = type(transformers.AutoConfig.for_model(settings["model_type"]))
        model_class = getattr(transformers, settings["architectures"][0])
    hf = model_class(config_class(**{k: v for k, v in settings.items() if k != "model_type"}))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    tied = {"lm_head.weight"} if settings["tie_word_embeddings"] else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export mapping is incomplete: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(model.embed_tokens.weight.device).eval()


# ------------------------------------------------------------------------- folders

def plain_metadata(metadata: dict) -> dict:
    """The parts of a checkpoint's metadata worth keeping in an export, as JSON values; an
    absolute path among the run's flags keeps only its last part (the folder may be published)."""
    keep = {key: metadata[key] for key in RELEASED_METADATA if key in metadata}
    if isinstance(keep.get("args"), dict):
        keep["args"] = {k: os.path.basename(v) if isinstance(v, str) and os.path.isabs(v) else v
                        for k, v in keep["args"].items()}
    return json.loads(json.dumps(keep, default=str))


CARD_FLAGS = ("dataset", "optimizer", "learning_rate", "batch_size", "block_size", "weight_decay", "dropout")


def model_card(config: TransformerConfig, architecture: str, metadata: dict) -> str:
    """README.md of an exported folder: what the model is, how it was made, how to run it."""
    history = metadata.get("history") if isinstance(metadata.get("history"), list) else []
    scores = [entry["val_bits_per_byte"] for entry in history
              if isinstance(entry, dict) and "val_bits_per_byte" in entry]
    args = metadata.get("args") if isinstance(metadata.get("args"), dict) else {}
    chat = metadata.get("kind") == "chat"
    what = ("A chat model: a base model trained from scratch on TinyStories, then fine-tuned on conversations "
            "made from its stories (assistant-only loss)." if chat else
            "A base model trained from scratch on TinyStories: it writes short stories.")
    remote = ", trust_remote_code=True" if architecture == "starcoder2_qk_norm" else ""
    lines = [
        "# A tinystories-transformer model", "",
        f"{what} Made with tinystories-transformer, a decoder-only transformer written out for learning, and "
        "exported by its `export_model.py`; the run's flags and history are in `config.json` (`tinystories_metadata`).",
        "",
        f"- architecture: `{architecture}` in Hugging Face transformers"
        + (" (Starcoder2 plus QK-norm from `starcoder2_qk_norm.py` in this folder, loaded as remote code)"
           if remote else ""),
        f"- size: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
        f"context {config.max_position_embeddings}, window {config.window_size or 'none'}, positions "
        f"{config.position_embedding}, vocabulary {config.vocab_size} (byte-level BPE)",
        f"- training: {metadata.get('step', 'unknown')} steps; "
        + ", ".join(f"{flag} {args[flag]}" for flag in CARD_FLAGS if flag in args),
    ]
    if scores:
        lines.append(f"- best validation bits per byte during training: {min(scores):.4f} "
                     + ("(on the replies of held-out conversations)" if chat else "(on held-out stories)"))
    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
              'folder = "path/to/this/folder"',
              f"model = AutoModelForCausalLM.from_pretrained(folder{remote})",
              "tokenizer = AutoTokenizer.from_pretrained(folder)",
              'generator = pipeline("text-generation", model=model, tokenizer=tokenizer)',
              'print(generator("Once upon a time", max_new_tokens=100)[0]["generated_text"])']
    if chat:
        lines += ['chat = [{"role": "user", "content": "Tell me a story about a cat."}]',
                  "ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, "
                  'return_tensors="pt")["input_ids"]',
                  "reply = model.generate(ids, max_new_tokens=200)[0, ids.shape[1]:]",
                  "print(tokenizer.decode(reply, skip_special_tokens=True))"]
    return "\n".join([*lines, "```", ""])


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_hf_folder(model: nn.Module, tokenizer: BPETokenizer, folder: str | os.PathLike, metadata: dict | None = None,
                   sampling: dict | None = None, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> str:
    """Write a Hugging Face folder of this model (config.json, model.safetensors,
    generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    README.md, and starcoder2_qk_norm.py for a QK-norm model), atomically. sampling: the
    default decoding settings (temperature, top_k, top_p, max_new_tokens). Returns the
    architecture; ExportError, before anything is written, if none fits."""
    from safetensors.torch import save_file

    model = unwrap_model(model)
    eos = tokenizer.special_tokens.get(ENDOFTEXT)
    metadata = plain_metadata(metadata or {})
    config = hf_config(model.config, eos, metadata) | {"dtype": str(dtype).removeprefix("torch.")}
    architecture = hf_architecture(model.config)
    state = hf_state_dict(model, dtype)

    def write(tmp: str) -> None:
        write_json(f"{tmp}/config.json", config)
        save_file(state, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        write_json(f"{tmp}/generation_config.json", {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
                                                     "do_sample": True, **(sampling or {})})
        save_hf_tokenizer(tokenizer, f"{tmp}/tokenizer.json")
        write_json(f"{tmp}/tokenizer_config.json", hf_tokenizer_config(tokenizer, model.config.max_position_embeddings))
        write_json(f"{tmp}/special_tokens_map.json", special_tokens_map(tokenizer))
        Path(f"{tmp}/README.md").write_text(model_card(model.config, architecture, metadata), encoding="utf-8")
        if architecture == "starcoder2_qk_norm":
            shutil.copyfile(Path(__file__).with_name("starcoder2_qk_norm.py"), f"{tmp}/starcoder2_qk_norm.py")

    write_folder_atomically(folder, write, overwrite=overwrite)
    return architecture


def read_export_config(folder: str | os.PathLike) -> tuple[dict, TransformerConfig]:
    """An exported folder's config.json and our config inside it; CheckpointError for any
    folder that save_hf_folder did not write."""
    try:
        settings = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
        return settings, TransformerConfig.from_dict(settings["tinystories_config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}: not a model folder written by export_model.py (config.json: "
                              f"{type(err).__name__}: {err})") from None


def read_export_weights(folder: str | os.PathLike, model: TransformerLM) -> None:
    """Load model.safetensors into model, and check that every tensor is the one our model
    exports, the fixed ones too (a position table, zero biases): a folder changed outside this
    project would otherwise load as a different model without a word."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder, "model.safetensors")
    try:
        state = load_file(path)
        model.load_state_dict(state_from_hf(model, state))
    except (OSError, KeyError, RuntimeError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [""])[-1]
        raise CheckpointError(f"{path}: does not hold this model's weights ({type(err).__name__}: {reason})") from None
    dtype = next(iter(state.values())).dtype
    for name, tensor in hf_state_dict(model, dtype).items():
        same = state[name].shape == tensor.shape and torch.allclose(state[name].float(), tensor.float(), 1e-5, 1e-6)
        if not same:
            raise CheckpointError(f"{path}: {name} is not what this project's model exports (changed outside it?)")


def load_hf_folder(folder: str | os.PathLike) -> tuple[TransformerLM, BPETokenizer, dict]:
    """(model, tokenizer, metadata) from a folder written by save_hf_folder; CheckpointError,
    one line naming the folder or file, for anything else."""
    settings, config = read_export_config(folder)
    model = TransformerLM(config)
    read_export_weights(folder, model)
    try:
        tokenizer = tokenizer_from_hf_json(Path(folder, "tokenizer.json"))
    except TokenizerFileError as err:
        raise CheckpointError(str(err)) from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{folder}: its tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                              f"is {config.vocab_size}")
    return model.eval(), tokenizer, settings.get("tinystories_metadata", {})
