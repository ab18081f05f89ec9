"""A decoder-only transformer language model, written out so that every step can be read.

The model maps token ids (batch, seq) to next-token logits (batch, seq, vocab):

    x = token embedding (+ absolute positions: sinusoidal or learned)
    repeat num_hidden_layers times:
        pre-norm:  x = x + Attention(LayerNorm(x));  x = x + FeedForward(LayerNorm(x))
        post-norm: x = LayerNorm(x + Attention(x));  x = LayerNorm(x + FeedForward(x))
    logits = LayerNorm(x) @ token_embedding^T          (the LM head shares the embedding)

Attention is causal (a token sees itself and earlier tokens) and optionally local: with
window_size w, query i sees key j only if i - w < j <= i. Relative position schemes act
inside attention: RoPE rotates queries and keys, ALiBi adds a distance penalty to the scores.
Four switches from modded-nanogpt and nanochat, off by default, change the diagram in small
places: QK-norm inside attention, ReLU² in the MLP, zero-initialised residual projections,
and per-block skip weights that mix the embedded input x0 back into x (TransformerConfig).

The file reads top to bottom, each part using only what came before it:
1. configuration: TransformerConfig;
2. positions: sinusoidal, RoPE, ALiBi;
3. attention: written out (scaled_dot_product_attention, attention_mask, MultiHeadAttention),
   then the fused path beside it (PyTorch's kernel, local windows block by block:
   FusedAttention), chosen by config.attention_impl;
4. the feed-forward layer, the block, the LM head and AvoidedTokens (what its loss pushes down);
5. the model, TransformerLM, whose forward reads like the diagram above;
6. checkpoints (one safe .pth file with config, weights, tokenizer; load_checkpoint also reads
   an exported Hugging Face folder) and FLOPs per token.

Elsewhere: the KV cache that attention writes into when decoding (kv_cache.py), decoding
(decoding.py), the optional speed paths, switched on from outside: one-row products, the
chunked loss, compiled decoding, int8 (speedups.py), and the Hugging Face exports and GPT-2's files
(hf_interop.py, gguf_export.py, export_model.py).
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe_tokenizer import BPETokenizer, TokenizerFileError
from common import pick_device, write_atomically
from kv_cache import KVCache

POSITION_EMBEDDINGS = ("sinusoidal", "learned", "rope", "alibi", "none")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu2")
ATTENTION_IMPLS = ("sdpa", "manual")


# ------------------------------------------------------------------- 1. configuration

@dataclass
class TransformerConfig:
    """Every size and choice of the model. window_size None (or 0) means full causal
    attention; position_embedding "none" (no positions at all, NoPE) is there for ablations.
    dropout applies to the embeddings and to what each sub-layer adds to the residual
    stream; attention_dropout to the attention weights, off by default because it forces
    the unfused attention path (about half the training speed on a CPU here).

    activation "relu2" is relu(x)^2. qk_norm RMS-normalises each head's queries and keys
    (no learned gain), which bounds the attention logits. zero_init_projections starts the
    projections that write into the residual stream at zero, so each block starts as the
    identity. skip_weights gives each block two learned scalars, x <- a * x + b * x0, where
    x0 is the embedded input (a = 1, b = 0 at the start)."""

    vocab_size: int = 10000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 1024
    max_position_embeddings: int = 512
    window_size: int | None = 256
    dropout: float = 0.1
    attention_dropout: float = 0.0
    position_embedding: str = "sinusoidal"
    norm_position: str = "pre"
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    bias: bool = True
    tie_word_embeddings: bool = True
    attention_impl: str = "sdpa"
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    # Switches from modded-nanogpt and nanochat, off by default (the seed's model); see
    # benchmarks/RESULTS.md for what each is worth on this data.
    qk_norm: bool = False
    zero_init_projections: bool = False
    skip_weights: bool = False

    def __post_init__(self):
        if self.window_size == 0:
            self.window_size = None
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name, allowed in (("position_embedding", POSITION_EMBEDDINGS), ("norm_position", NORM_POSITIONS),
                              ("activation", ACTIVATIONS), ("attention_impl", ATTENTION_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head size, but hidden_size / num_attention_heads = {self.head_dim}")
        if self.window_size is not None:
            if not isinstance(self.window_size, int) or self.window_size < 1:
                raise ValueError(f"window_size must be a positive integer or None, not {self.window_size!r}")
            if self.window_size > self.max_position_embeddings:
                raise ValueError(f"window_size ({self.window_size}) is larger than the context, "
                                 f"max_position_embeddings ({self.max_position_embeddings})")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        for name in ("rope_theta", "layer_norm_eps", "initializer_range"):  # (NaN fails 0 < v < inf too)
            if not 0.0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive finite number, not {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**data)


# ------------------------------------------------------------------------ 2. positions

def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": channel pair (2i, 2i+1) of
    position p is (sin(p / 10000^(2i/dim)), cos(p / 10000^(2i/dim))). Defined for any
    position. positions (...,) -> (..., dim)."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq  # (..., dim / 2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., dim / 2, 2) -> (..., dim)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding angles: channel i and i + head_dim/2 of a query or key at position p
    are rotated by p * theta^(-2i/head_dim). positions (...,) -> cos, sin (..., head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., head_dim): channel i and i + head_dim/2 share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) channel pair of x (batch, heads, seq, head_dim) by its
    angle; cos, sin (batch or 1, 1, seq, head_dim). Then q_m . k_n depends on m - n only."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (x_i, x_{i+d/2}) -> (-x_{i+d/2}, x_i)
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head penalty per token of distance: a geometric sequence starting at
    2^(-8/n) for n heads (for n not a power of two, the paper interleaves two sequences)."""
    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    power = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(power) + geometric(2 * power)[0::2][: num_heads - power]
    return torch.tensor(slopes, dtype=torch.float32)


# ------------------------------------------------------------------------ 3. attention

def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention written out: softmax(q k^T / sqrt(head_dim) + bias) v.

    q: (batch, heads, q_len, head_dim); k, v: (batch, heads, k_len, head_dim).
    mask, as in torch.nn.functional.scaled_dot_product_attention: None; a bool tensor where
    True means "may attend"; or a float tensor added to the scores (an ALiBi bias, with -inf
    where attending is not allowed). It broadcasts to (batch, heads, q_len, k_len).
    Returns the output (batch, heads, q_len, head_dim), and the attention weights
    (batch, heads, q_len, k_len) too when return_weights.
    """
    # How well each query matches each key, scaled so the scores' spread does not grow with head_dim.
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (batch, heads, q_len, k_len)
    # Keys a query may not see get -inf, so softmax gives them weight 0.
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # Softmax in float32: in bf16 the sum over hundreds of keys would lose precision.
    weights = scores.float().softmax(dim=-1).to(q.dtype)  # each row sums to 1
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    # Each query's output is the weighted average of the values.
    output = weights @ v  # (batch, heads, q_len, head_dim)
    return (output, weights) if return_weights else output


def attention_mask(
    query_columns: torch.Tensor,
    key_columns: torch.Tensor,
    window_size: int | None,
    key_valid: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which keys each query may attend to, in torch's attn_mask convention.

    query_columns (q_len,), key_columns (k_len,): where each token stands in the sequence.
    Query i may see key j iff 0 <= i - j < window_size (causal, local). key_valid
    (batch, k_len) marks padding keys False: no query sees them, but a padding query sees
    itself so that no softmax row is empty. With alibi_slopes (heads,) the result is a float
    bias, -slope * (i - j), with -inf where not allowed; otherwise a bool mask.
    Shape: (q_len, k_len), (batch, 1, q_len, k_len) with key_valid, or with heads for ALiBi.
    """
    distance = query_columns[:, None] - key_columns[None, :]  # (q_len, k_len)
    allowed = distance >= 0
    if window_size is not None:
        allowed = allowed & (distance < window_size)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, None, :]) | (distance == 0)  # (batch, 1, q_len, k_len)
    if alibi_slopes is None:
        return allowed
    bias = -alibi_slopes[:, None, None] * distance.to(alibi_slopes.dtype)  # (heads, q_len, k_len)
    return bias.masked_fill(~allowed, float("-inf"))


class LocalBlocks(NamedTuple):
    """Local attention computed block by block: queries in blocks of window_size, each block
    seeing only the keys from window_size - 1 before it to its own end, so attention costs
    about seq * 2 * window instead of seq * seq. first: the first block's mask (None: plain
    causal); rest: the mask shared by every later block, (window, 2 * window - 1)."""

    window: int
    first: torch.Tensor | None
    rest: torch.Tensor


def local_blocks(window: int, alibi_slopes: torch.Tensor | None = None, device=None) -> LocalBlocks:
    """The masks of LocalBlocks. In a later block, query i (of window) and key j (of
    2 * window - 1, starting window - 1 before the block) are i - j + window - 1 apart."""
    columns = torch.arange(2 * window - 1, device=device)
    first = None if alibi_slopes is None else attention_mask(columns[:window], columns[:window], window, None,
                                                             alibi_slopes)
    rest = attention_mask(columns[:window] + window - 1, columns, window, None, alibi_slopes)
    return LocalBlocks(window, first, rest)


def kernel_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A mask as F.scaled_dot_product_attention wants it: a float one (an ALiBi bias) in the
    queries' dtype; a bool one, or None, as it is."""
    return mask.to(dtype) if mask is not None and mask.dtype != torch.bool else mask


def local_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: LocalBlocks,
                          dropout_p: float = 0.0) -> torch.Tensor:
    """Fused attention over LocalBlocks; the same result as one call with the full
    (seq, seq) local mask. q, k, v: (batch, heads, seq, head_dim)."""
    window, seq = blocks.window, q.size(2)
    outputs = []
    for start in range(0, seq, window):
        end, key_start = min(start + window, seq), max(0, start - window + 1)
        if start == 0:
            mask, is_causal = blocks.first, blocks.first is None
        else:
            mask, is_causal = blocks.rest[..., : end - start, : end - key_start], False
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, key_start:end], v[:, :, key_start:end],
            attn_mask=kernel_mask(mask, q.dtype), dropout_p=dropout_p, is_causal=is_causal))  # (batch, heads, end - start, head_dim)
    return torch.cat(outputs, dim=2)  # (batch, heads, seq, head_dim)


class AttentionInputs(NamedTuple):
    """What every layer's attention needs besides x, made once per forward by the model:
    mask (a tensor, LocalBlocks, or None with is_causal when the fused kernel's own causal
    masking is exactly right) and rope, the (cos, sin) angles of the new tokens, or None."""

    mask: torch.Tensor | LocalBlocks | None
    is_causal: bool
    rope: tuple[torch.Tensor, torch.Tensor] | None


class MultiHeadAttention(nn.Module):
    """Causal self-attention, written out: one projection to queries, keys and values, the
    attention of each head, and an output projection back to the residual stream."""

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index  # which of the KV cache's layers this one writes
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None,
                output_attentions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (batch, seq, hidden) -> (batch, seq, hidden), and the attention weights if asked."""
        batch, seq, hidden = x.shape
        # Queries, keys and values of every head from one matrix product.
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, hidden // self.num_heads)  # (batch, seq, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # three of (batch, heads, seq, head_dim)
        # QK-norm: every query and key scaled to unit RMS, so no score can grow without bound.
        if self.config.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        # RoPE turns position into a rotation of queries and keys.
        if inputs.rope is not None:
            q, k = apply_rope(q, *inputs.rope), apply_rope(k, *inputs.rope)
        # Decoding: keep these keys and values, and attend over every cached one too.
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (batch, heads, keys, head_dim)
        dropout_p = self.config.attention_dropout if self.training else 0.0
        out, weights = self.attend(q, k, v, inputs, dropout_p, output_attentions)  # (batch, heads, seq, head_dim)
        # Put the heads side by side again and project back into the residual stream.
        out = out.transpose(1, 2).reshape(batch, seq, hidden)  # (batch, seq, heads * head_dim)
        return self.resid_dropout(self.proj(out)), weights

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, dropout_p: float,
               output_attentions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(q k^T / sqrt(d) + mask) v, written out (the model gives this class a full mask)."""
        out, weights = scaled_dot_product_attention(q, k, v, inputs.mask, dropout_p, return_weights=True)
        return out, (weights if output_attentions else None)


class FusedAttention(MultiHeadAttention):
    """The same attention through PyTorch's fused kernel (F.scaled_dot_product_attention),
    which never stores the (q_len, k_len) weights; local windows go block by block
    (local_block_attention). Only the attention weights, when asked for, need the
    written-out path. Tested equal to MultiHeadAttention for every position scheme."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, dropout_p: float,
               output_attentions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Only the written-out path has the weights to show.
        if output_attentions:
            return super().attend(q, k, v, inputs, dropout_p, output_attentions)
        # A window shorter than the sequence: block by block, each block against its keys only.
        if isinstance(inputs.mask, LocalBlocks):
            return local_block_attention(q, k, v, inputs.mask, dropout_p), None
        # Otherwise one kernel call: (batch, heads, seq, head_dim).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=kernel_mask(inputs.mask, q.dtype),
                                              dropout_p=dropout_p, is_causal=inputs.is_causal), None


ATTENTION_CLASSES = {"manual": MultiHeadAttention, "sdpa": FusedAttention}  # by config.attention_impl


# --------------------------------------------------------- 4. feed-forward, block, head

def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (Primer; modded-nanogpt and nanochat use it in place of GELU)."""
    return F.relu(x).square()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, the tanh approximation (the only form llama.cpp has)."""
    return F.gelu(x, approximate="tanh")


ACTIVATION_FUNCTIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu2": relu_squared}  # by config.activation


class FeedForward(nn.Module):
    """Position-wise MLP: hidden -> intermediate -> activation (GELU by default) -> hidden."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.fc2.is_residual_projection = True
        self.activation = ACTIVATION_FUNCTIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, seq, hidden) -> (batch, seq, intermediate) -> (batch, seq, hidden)
        return self.dropout(self.fc2(self.activation(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Attention then feed-forward, each inside a residual connection with a LayerNorm:
    before the sub-layer (pre-norm, GPT-2) or after the residual sum (post-norm, the
    original transformer)."""

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.attention = ATTENTION_CLASSES[config.attention_impl](config, layer_index)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None,
                output_attentions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (batch, seq, hidden) -> (batch, seq, hidden), and the attention weights if asked."""
        if self.pre_norm:
            # Tokens exchange information (attention), then each is transformed alone (MLP);
            # each adds its result to the residual stream x.
            attended, weights = self.attention(self.norm1(x), inputs, cache, output_attentions)
            x = x + attended
            return x + self.feed_forward(self.norm2(x)), weights
        # Post-norm: the same two sub-layers, each residual sum normalised after it.
        attended, weights = self.attention(x, inputs, cache, output_attentions)
        x = self.norm1(x + attended)
        return self.norm2(x + self.feed_forward(x)), weights


class AvoidedTokens(NamedTuple):
    """Tokens the loss pushes down, beside the targets it pushes up: at each position
    (batch, seq) up to k token ids (-1 for none), each with its weight. Chat tuning avoids a
    requested word before its first use (chat_data.avoided_tokens)."""

    ids: torch.Tensor  # (batch, seq, k)
    weights: torch.Tensor  # (batch, seq, k)


class LMHead(nn.Module):
    """The output layer: final hidden states (batch, seq, hidden) -> next-token logits
    (batch, seq, vocab), and the mean cross-entropy against targets when they are given
    (-100 marks a target left out). With loss_weights (batch, seq), a weighted mean: each
    target counts its weight (chat tuning stresses the tokens that show a request was
    followed, chat_data.ChatExamples). With avoided, the loss also holds each avoided
    token's weighted -log(1 - p) (avoided_loss), over the same count of weighted targets.
    Tied (GPT-2's choice, the default), the weight is the token embedding matrix, handed in
    by the model, and this layer holds none of its own.
    (speedups swaps in layers with the same call that compute the same values faster.)"""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        weight = None if config.tie_word_embeddings else nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.register_parameter("weight", weight)

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """One score per token of the vocabulary: x @ weight^T."""
        return F.linear(x, weight)

    def avoided_loss(self, x: torch.Tensor, weight: torch.Tensor, avoided: AvoidedTokens | None) -> torch.Tensor:
        """The sum over positions and avoided ids of weight x -log(1 - p(id)): the loss that
        falls as the model gives the avoided tokens less probability. Only the positions
        that avoid something get their logits made (0 when avoided is None)."""
        if avoided is None:
            return x.new_zeros((), dtype=torch.float32)
        ids = avoided.ids.reshape(-1, avoided.ids.size(-1))  # (batch * seq, k)
        weights = avoided.weights.reshape(ids.shape).float() * (ids >= 0)  # an id of -1 weighs nothing
        rows = (weights > 0).any(dim=-1)
        hidden = x.reshape(-1, x.size(-1))[rows]  # (avoiding positions, hidden)
        log_probs = F.log_softmax(self.logits(hidden, weight).float(), dim=-1)  # (avoiding positions, vocab)
        log_p = log_probs.gather(1, ids[rows].clamp(min=0)).clamp(max=-1e-6)  # (avoiding positions, k); p < 1
        # -log(1 - p) as -log1p(-p): exact where p is small, as it mostly is.
        return -(torch.log1p(-log_p.exp()) * weights[rows]).sum()

    def forward(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None,
                loss_weights: torch.Tensor | None = None,
                avoided: AvoidedTokens | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logits = self.logits(x, weight)  # (batch, seq, vocab)
        if targets is None:
            return logits, None
        # Mean over the counted targets of -log softmax(logits)[target], in float32:
        # (batch * seq, vocab) logits against (batch * seq,) targets.
        scores, targets = logits.float().view(-1, logits.size(-1)), targets.reshape(-1)
        if loss_weights is None and avoided is None:
            return logits, F.cross_entropy(scores, targets, ignore_index=-100)
        losses = F.cross_entropy(scores, targets, ignore_index=-100, reduction="none")  # (batch * seq,)
        counted = (targets != -100).float()
        if loss_weights is not None:
            counted = counted * loss_weights.reshape(-1).float()
        return logits, ((losses * counted).sum() + self.avoided_loss(x, weight, avoided)) / counted.sum()


# ----------------------------------------------------------------------------- 5. model

class LMOutput(NamedTuple):
    """What TransformerLM.forward returns: logits (batch, seq, vocab); the mean
    cross-entropy loss when targets were given; the KV cache when use_cache or
    past_key_values; and, with output_attentions, one (batch, heads, q_len, k_len) weight
    tensor per layer. (speedups.use_chunked_loss's head returns no logits when training.)"""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class TransformerLM(nn.Module):
    """The decoder-only language model (see the module docstring)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # Fixed position tables, computed once (not saved: they follow from the config).
        positions = torch.arange(config.max_position_embeddings)
        if config.position_embedding == "sinusoidal":
            self.register_buffer("sinusoidal_table", sinusoidal_embedding(positions, config.hidden_size), persistent=False)
        if config.position_embedding == "rope":
            cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos_table", cos, persistent=False)
            self.register_buffer("rope_sin_table", sin, persistent=False)
        if config.position_embedding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_hidden_layers))
        # skip_weights: (a, b) per block, for x <- a * x + b * x0; they start as (1, 0), the plain model.
        skips = torch.tensor([[1.0, 0.0]] * config.num_hidden_layers) if config.skip_weights else None
        self.register_parameter("skip_weights", None if skips is None else nn.Parameter(skips))
        # Post-norm blocks already end in a LayerNorm; pre-norm needs one before the head.
        self.final_norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
                           if config.norm_position == "pre" else nn.Identity())
        self.lm_head = LMHead(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, and the projections that
        write into the residual stream scaled down by sqrt(2 * layers), so the stream's
        variance does not grow with depth (or zero, with zero_init_projections)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = 0.0 if self.config.zero_init_projections else std / math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, LMHead)) and module.weight is not None:
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters (a tied LM head counts once). exclude_embeddings leaves out
        the token and learned position tables."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
            if self.config.position_embedding == "learned":
                total -= self.embed_positions.weight.numel()
        return total

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's (vocab, hidden) weight: tied, the token embedding matrix itself."""
        return self.embed_tokens.weight if self.lm_head.weight is None else self.lm_head.weight

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache; max_length (prompt + new tokens) sizes it up front. Without it,
        the largest size a run can need: the window (keys older than it are never needed
        again), or the whole context."""
        config = self.config
        capacity = config.window_size or config.max_position_embeddings
        if max_length:
            capacity = min(capacity, max_length) if config.window_size else max_length
        return KVCache(config.num_hidden_layers, batch_size, capacity, config.window_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        attention_mask: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        avoided: AvoidedTokens | None = None,
    ) -> LMOutput:
        """input_ids (batch, seq) -> LMOutput.

        targets (batch, seq): next-token ids; -100 marks positions left out of the loss.
        loss_weights (batch, seq): how much each target counts in the loss (default: alike).
        avoided: tokens the loss pushes down at each position (AvoidedTokens; default none).
        past_key_values / use_cache: continue from (and return) a KVCache; the new tokens
        follow the cached ones. attention_mask (batch, seq): 1 for tokens, 0 for (left)
        padding; positions count real tokens only, and the cache remembers the mask.
        """
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache(input_ids.size(0))
        cache = past_key_values
        # Embed the tokens (and absolute positions), and make what each attention needs.
        x, inputs = self.embed(input_ids, cache, attention_mask, output_attentions)  # (batch, seq, hidden)
        # The blocks, each reading the residual stream x and adding to it.
        attentions, x0 = [], x
        for index, block in enumerate(self.blocks):
            if self.skip_weights is not None:  # each block reads a learned mix of the stream and the input
                x = self.skip_weights[index, 0] * x + self.skip_weights[index, 1] * x0
            x, weights = block(x, inputs, cache, output_attentions)  # (batch, seq, hidden)
            attentions.append(weights)
        x = self.final_norm(x)
        # Scores for every next token at every position, and the loss against the targets.
        logits, loss = self.lm_head(x, self.head_weight, targets, loss_weights, avoided)  # (batch, seq, vocab)
        return LMOutput(logits, loss, cache, tuple(attentions) if output_attentions else None)

    def embed(self, input_ids: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None,
              output_attentions: bool) -> tuple[torch.Tensor, AttentionInputs]:
        """Token ids (batch, seq) -> the residual stream x (batch, seq, hidden) with absolute
        positions added, and the AttentionInputs shared by every layer: the mask and the
        RoPE angles. Books the new tokens in the cache (all the per-call bookkeeping, in
        Python integers, happens here, so that the blocks are pure tensor work)."""
        config = self.config
        seq = input_ids.size(1)
        start = cache.length if cache is not None else 0  # the column of the first new token
        columns = torch.arange(start, start + seq, device=input_ids.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        positions = self._positions(columns, cache, attention_mask)  # (1 or batch, seq)
        key_columns, key_valid = None, attention_mask
        if cache is not None:
            key_columns, key_valid = cache.begin(seq, attention_mask, input_ids.device)
        # Position tables hold max_position_embeddings rows; beyond them (long generation
        # with a window) sinusoidal and RoPE values are computed on the fly.
        in_table = start + seq <= config.max_position_embeddings  # a position never exceeds its column
        if config.position_embedding == "learned" and not in_table:
            raise ValueError(f"sequence reaches position {start + seq - 1}, but learned position embeddings stop "
                             f"at max_position_embeddings - 1 = {config.max_position_embeddings - 1}")
        x = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        if config.position_embedding == "sinusoidal":
            # Scale the token embeddings up to the size of the encoding, as the original transformer does.
            table = self.sinusoidal_table[positions] if in_table else sinusoidal_embedding(positions, config.hidden_size)
            x = x * math.sqrt(config.hidden_size) + table
        elif config.position_embedding == "learned":
            x = x + self.embed_positions(positions)
        mask, is_causal = self._attention_mask(columns, key_columns, key_valid, output_attentions)
        return self.dropout(x), AttentionInputs(mask, is_causal, self._rope(positions, in_table))

    def _rope(self, positions: torch.Tensor, in_table: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE's (cos, sin) for the new tokens, (1 or batch, 1, seq, head_dim), or None."""
        config = self.config
        if config.position_embedding != "rope":
            return None
        if in_table:  # (1 or batch, seq, head_dim) -> (1 or batch, 1, seq, head_dim): one angle for every head
            return self.rope_cos_table[positions][:, None], self.rope_sin_table[positions][:, None]
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)
        return cos[:, None], sin[:, None]

    @staticmethod
    def _positions(columns: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Position of each new token: its column, or, once padding is involved, the number
        of real tokens before it in its row. (1 or batch, seq)."""
        seen = cache.real_tokens if cache is not None and cache.real_tokens is not None else None
        if attention_mask is not None:
            before = seen[:, None] if seen is not None else columns[:1]  # (batch, 1), or (1,)
            return (before + attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (batch, seq)
        if seen is not None:
            return seen[:, None] + torch.arange(columns.numel(), device=columns.device)  # (batch, seq)
        return columns[None]  # (1, seq)

    def _attention_mask(
        self, columns: torch.Tensor, key_columns: torch.Tensor | None, key_valid: torch.Tensor | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor | LocalBlocks | None, bool]:
        """The mask for this forward (shared by all layers). The written-out attention gets
        the full mask; the fused kernel gets None with is_causal when its own causal masking
        is exactly right (its fastest path), or LocalBlocks for a window shorter than seq."""
        config = self.config
        slopes = self.alibi_slopes if config.position_embedding == "alibi" else None
        fused = config.attention_impl == "sdpa" and not output_attentions
        window, seq = config.window_size, columns.numel()
        plain_causal = key_valid is None and key_columns is None
        if fused and plain_causal and slopes is None and (window is None or window >= seq):
            return None, True
        if fused and plain_causal and window is not None and window < seq:
            return local_blocks(window, slopes, columns.device), False
        keys = columns if key_columns is None else key_columns
        return attention_mask(columns, keys, window, key_valid, slopes), False


# -------------------------------------------------------------- 6. checkpoints, FLOPs

CHECKPOINT_FORMAT = "tinystories-transformer/checkpoint"
CHECKPOINT_VERSION = 1
# What a released or exported model keeps of a checkpoint's metadata (no optimizer state).
RELEASED_METADATA = ("kind", "history", "step", "args")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, foreign, unsafe or inconsistent."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The TransformerLM inside torch.compile, DistributedDataParallel and
    speedups.CompiledDecoding wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module") or isinstance(getattr(model, "model", None), nn.Module):
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None) or model.model
    return model


def _plain(value, where: str):
    """Metadata as tensors and plain Python values only, so that torch.load(weights_only=True)
    can read it back: numpy values become Python numbers or tensors."""
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__module__ == "numpy":
        return torch.from_numpy(value) if hasattr(value, "shape") and value.shape else value.item()
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into a checkpoint (tensors and plain values only)")


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, tokenizer: BPETokenizer, weights_dtype: torch.dtype | None = None,
    **metadata,
) -> None:
    """Write the config, the weights, the tokenizer (as its JSON text) and metadata (step,
    losses, history, optimizer state, ...) to one .pth file, atomically (a crash never leaves
    half a checkpoint). weights_dtype (torch.float16 or torch.bfloat16) stores floating-point
    weights in 16 bits; load_checkpoint restores float32."""
    model = unwrap_model(model)
    state = {
        name: t.detach().cpu().to(weights_dtype) if weights_dtype is not None and t.is_floating_point() else t.detach().cpu()
        for name, t in model.state_dict().items()
    }
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "model": state,
        "tokenizer": tokenizer.to_json(),
        "metadata": _plain(metadata, "metadata"),
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw contents of a checkpoint file, read safely (tensors and plain values only)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged or foreign file
        if isinstance(err, pickle.UnpicklingError) and "global" in str(err).lower():
            raise CheckpointError(f"{path}: refused: it holds Python objects, not only tensors and plain values, and "
                                  "loading those could run code (only weights_only checkpoints are read)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not a PyTorch file: "
                              f"{type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (a bare state_dict or another program's file?)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r}, this code reads {CHECKPOINT_VERSION}")
    return payload


def load_checkpoint(path: str | os.PathLike, device: str = "auto") -> tuple[TransformerLM, BPETokenizer, dict]:
    """(model in eval mode on device, tokenizer, metadata) from a file of save_checkpoint, or
    from a Hugging Face folder that export_model.py wrote (hf_interop.load_hf_folder).
    Anything wrong raises CheckpointError with one line naming the file and the problem."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        from hf_interop import load_hf_folder  # here, not at the top: hf_interop builds on this file

        model, tokenizer, metadata = load_hf_folder(path)
        return model.to(pick_device(device)), tokenizer, metadata
    payload = read_checkpoint(path)
    try:
        config = TransformerConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad model config: {err}") from None
    try:
        tokenizer = BPETokenizer.from_json(payload["tokenizer"], source=f"{path} (its tokenizer)")
    except (KeyError, TypeError, TokenizerFileError) as err:
        raise CheckpointError(str(err) if isinstance(err, TokenizerFileError) else f"{path}: no tokenizer inside") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                              f"is {config.vocab_size}")
    model = TransformerLM(config)
    try:
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: weights do not fit the config: {str(err).strip().splitlines()[-1].strip()}") from None
    return model.to(pick_device(device)).eval(), tokenizer, payload.get("metadata", {})


def estimate_flops_per_token(config: TransformerConfig, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token: 2 per weight of every linear layer and the LM head (6 when
    training: forward plus twice that backward) plus attention's q k^T and weights @ v,
    2 * 2 * keys * hidden per layer (keys: the window or the sequence, halved on average
    by causality)."""
    h, n = config.hidden_size, config.num_hidden_layers
    weights = n * (4 * h * h + 2 * h * config.intermediate_size) + config.vocab_size * h
    keys = min(seq_len, config.window_size or seq_len)
    average_keys = keys / 2 if keys == seq_len else keys - keys * keys / (2 * seq_len)
    forward = 2 * weights + 4 * n * average_keys * h
    return 3 * forward if training else forward
