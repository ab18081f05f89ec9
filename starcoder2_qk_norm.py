"""Starcoder2 with QK-norm: the transformers model that runs this project's QK-norm models exactly.

No architecture in transformers matches a model trained with --qk_norm. Starcoder2 has all
the rest (LayerNorm with bias, rotate-half RoPE, a GELU MLP with bias, tied embeddings, a
sliding window) but does not normalise queries and keys. This file adds that, and
hf_interop.save_hf_folder copies it into every exported folder of a QK-norm model, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the model. It imports only torch and transformers: the folder works without this repo.

How: a forward hook on each q_proj and k_proj scales every head's vector to unit RMS, with no
learned gain, as transformer_model.MultiHeadAttention does. Our model normalises before RoPE
and Starcoder2 rotates after the projection, so the order is the same; and since RoPE only
rotates pairs of channels, which keeps a head's RMS, the order would not matter anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import Starcoder2Config, Starcoder2ForCausalLM


class Starcoder2QKNormConfig(Starcoder2Config):
    """Starcoder2's configuration under a model type of its own, so the Auto classes find this file."""

    model_type = "starcoder2_qk_norm"


def normalise_heads(head_dim: int) -> Callable[[torch.nn.Module, tuple, torch.Tensor], torch.Tensor]:
    """A forward hook for a projection to heads: (..., heads * head_dim) -> the same, each
    head's head_dim channels scaled to unit RMS (eps None: the dtype's own, as in training)."""

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        heads = output.unflatten(-1, (-1, head_dim))  # (..., heads, head_dim)
        return F.rms_norm(heads, (head_dim,)).flatten(-2)  # (..., heads * head_dim)

    return hook


class Starcoder2QKNormForCausalLM(Starcoder2ForCausalLM):
    """Starcoder2ForCausalLM whose attention normalises each head's queries and keys."""

    config_class = Starcoder2QKNormConfig

    def __init__(self, config: Starcoder2QKNormConfig):
        super().__init__(config)
        for layer in self.model.layers:
            attention = layer.self_attn
            attention.q_proj.register_forward_hook(normalise_heads(attention.head_dim))
            attention.k_proj.register_forward_hook(normalise_heads(attention.head_dim))
