"""GGUF export: a model and its tokenizer in one file that llama.cpp (and ollama) can run.

GGUF names tensors its own way (token_embd, blk.0.attn_q, ...) and records the architecture's
sizes and the tokenizer as key-value metadata. We reuse the Hugging Face export: its weight
names (hf_interop.hf_state_dict) are the ones llama.cpp's converter knows, and the gguf
package's TensorNameMap turns them into GGUF names.

llama.cpp runs two of our shapes:
- GPT-2 (learned, sinusoidal or no positions; full attention);
- StarCoder2 (RoPE). llama.cpp's StarCoder2 has no sliding window, so a windowed model is
  exported with its context cut to the window, where the window changes nothing.
Neither has QK-norm or ALiBi, post-norm or skip weights: those are refused with the field
named (ExportError). llama.cpp's GELU is the tanh form, and it computes it through a
16-bit table: a model trained with exact GELU is refused unless allow_gelu_approx, and any
export's outputs differ from ours in the last digits.

- gguf_problems: why a config cannot go to llama.cpp (empty if it can).
- gguf_tensors: GGUF name -> numpy array.
- save_gguf: the file, written atomically.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import torch
import torch.nn as nn

from bpe_tokenizer import ENDOFTEXT, BPETokenizer, bytes_to_text
from common import write_atomically
from hf_interop import CHAT_TEMPLATE, ExportError, hf_architecture, hf_problems, hf_state_dict, windowed
from transformer_model import TransformerConfig, unwrap_model

GGUF_ARCHITECTURES = {"gpt2": "gpt2", "starcoder2": "starcoder2"}  # our hf_architecture -> llama.cpp's


def gguf_problems(config: TransformerConfig, allow_gelu_approx: bool = False) -> list[str]:
    """The fields that keep config from running in llama.cpp as it runs here."""
    architecture, problems = hf_problems(config)
    if architecture == "starcoder2" and config.qk_norm:
        problems.append("qk_norm=True (llama.cpp's StarCoder2 does not normalise queries and keys; export --format hf "
                        "instead)")
    if architecture not in GGUF_ARCHITECTURES:
        problems.append(f"position_embedding={config.position_embedding!r} (the GGUF export covers GPT-2 and "
                        "StarCoder2 only)")
    if config.activation == "relu2":
        problems.append("activation='relu2' (llama.cpp's GPT-2 and StarCoder2 use GELU)")
    if config.activation == "gelu" and not allow_gelu_approx:
        problems.append("activation='gelu' (exact GELU; llama.cpp has only the tanh form, so outputs would differ "
                        "slightly: pass --allow_gelu_approx to export anyway)")
    return problems


def gguf_context(config: TransformerConfig) -> int:
    """The context a GGUF file declares: the window where there is one, since llama.cpp has none."""
    return config.window_size if windowed(config) else config.max_position_embeddings


UNBIASED = ("token_embd", "position_embd", "output")  # the tables and the head: the matrices with no bias


def gguf_tensors(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    """GGUF tensor name -> array, every matrix in nn.Linear's (out, in) layout. Matrices in
    dtype; vectors (norms, biases) always in float32, as llama.cpp expects."""
    model = unwrap_model(model)
    architecture = GGUF_ARCHITECTURES[hf_architecture(model.config)]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], model.config.num_hidden_layers)
    tensors = {}
    for name, tensor in hf_state_dict(model, linear_layout=True).items():
        base, suffix = name.rsplit(".", 1)
        target = names.get_name(base)
        if target is None:
            raise ExportError(f"no GGUF name for {name}")
        tensors[f"{target}.{suffix}"] = tensor.to(dtype if tensor.dim() > 1 else torch.float32).contiguous().numpy()
    # llama.cpp's StarCoder2 requires every bias: a model trained without them gets zeros.
    for name, array in list(tensors.items()):
        layer = name.removesuffix(".weight")
        if array.ndim == 2 and layer not in UNBIASED and f"{layer}.bias" not in tensors:
            tensors[f"{layer}.bias"] = np.zeros(array.shape[0], dtype=np.float32)
    return tensors


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: BPETokenizer) -> None:
    """GPT-2's kind of tokenizer: byte-level tokens (as Hugging Face writes them), merges, and
    our special tokens as control tokens. Our split pattern is GPT-2's, pre-tokenizer gpt-2."""
    special_ids = set(tokenizer.special_tokens.values())
    tokens = [token.decode("utf-8") if i in special_ids else bytes_to_text(token)
              for i, token in sorted(tokenizer.vocab.items())]
    types = [gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL for i in range(len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{bytes_to_text(a)} {bytes_to_text(b)}" for a, b in tokenizer.merges])
    eos = tokenizer.special_tokens[ENDOFTEXT]
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def add_hyperparameters(writer: gguf.GGUFWriter, config: TransformerConfig, architecture: str) -> None:
    """The sizes llama.cpp builds the architecture from, under the architecture's own keys."""
    writer.add_context_length(gguf_context(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    if architecture == "starcoder2":
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)


def save_gguf(model: nn.Module, tokenizer: BPETokenizer, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              allow_gelu_approx: bool = False, name: str = "tinystories-transformer") -> str:
    """Write model and tokenizer as one GGUF file, atomically; dtype float32 or float16.
    Returns llama.cpp's architecture name; ExportError, before anything is written, if the
    model cannot run there."""
    model = unwrap_model(model)
    problems = gguf_problems(model.config, allow_gelu_approx)
    if problems:
        raise ExportError("cannot export to GGUF: " + "; ".join(problems))
    architecture = GGUF_ARCHITECTURES[hf_architecture(model.config)]
    tensors = gguf_tensors(model, dtype)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, architecture)
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == torch.float16 else gguf.LlamaFileType.ALL_F32)
        add_hyperparameters(writer, model.config, architecture)
        add_tokenizer(writer, tokenizer)
        for tensor_name, array in tensors.items():
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(path, write)
    return architecture
