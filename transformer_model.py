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

Sections: configuration; attention (written out, and the fused fast path); positions; the
model; the KV cache for incremental decoding; checkpoints and devices; GPT-2 interop.
"""

from __future__ import annotations

import codecs
import copy
import functools
import math
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe_tokenizer import BPETokenizer, TokenizerFileError

POSITION_EMBEDDINGS = ("sinusoidal", "learned", "rope", "alibi", "none")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh")
ATTENTION_IMPLS = ("sdpa", "manual")


# ------------------------------------------------------------------- configuration

@dataclass
class TransformerConfig:
    """Every size and choice of the model. window_size None (or 0) means full causal
    attention; position_embedding "none" (no positions at all, NoPE) is there for ablations.
    dropout applies to the embeddings and to what each sub-layer adds to the residual
    stream; attention_dropout to the attention weights, off by default because it forces
    the unfused attention path (about half the training speed on a CPU here)."""

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


# ---------------------------------------------------------------------- attention

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
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # Softmax in float32: in bf16 the sum over hundreds of keys would lose precision.
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    output = weights @ v
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
    distance = query_columns[:, None] - key_columns[None, :]
    allowed = distance >= 0
    if window_size is not None:
        allowed = allowed & (distance < window_size)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, None, :]) | (distance == 0)
    if alibi_slopes is None:
        return allowed
    bias = -alibi_slopes[:, None, None] * distance.to(alibi_slopes.dtype)
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
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, key_start:end], v[:, :, key_start:end],
            attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal))
    return torch.cat(outputs, dim=2)


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: x (..., in) @ weight^T (in, out) + bias, made fast for decoding on a CPU.

    A decoding step has one row per sequence, so each layer is a matrix-vector product whose
    cost is streaming the weight from memory. BLAS's path for it (MKL's gemv) uses one thread
    and a fraction of the memory's speed. Cutting the weight's rows into one block per thread
    and multiplying the blocks as a batch (baddbmm) takes the batched path, which keeps every
    thread streaming: the same result up to rounding order, about 3.7x faster for this model's
    LM head and 1.3x to 1.6x for its wider block layers (benchmarks/RESULTS.md). Float32 only
    (bf16 weights go through oneDNN, which is faster as it is); more rows (training, prompts,
    larger batches), GPUs and compiled code (torch.compile picks its own kernels) take the
    plain F.linear too.
    """
    if torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    blocks, (out_features, in_features) = torch.get_num_threads(), weight.shape
    rows = x.numel() // in_features
    if x.device.type != "cpu" or weight.dtype != torch.float32 or rows > FEW_ROWS or out_features % blocks:
        return F.linear(x, weight, bias)
    # (blocks, out / blocks, in) @ (blocks, in, rows): every block meets the same rows.
    weight_blocks = weight.view(blocks, out_features // blocks, in_features)
    columns = x.reshape(rows, in_features).T.expand(blocks, in_features, rows)
    if bias is None:
        y = torch.bmm(weight_blocks, columns)
    else:
        y = torch.baddbmm(bias.view(blocks, -1, 1), weight_blocks, columns)
    return y.view(out_features, rows).T.reshape(*x.shape[:-1], out_features)


FEW_ROWS = 4  # up to this many rows (beam search's 4 beams), few_row_linear takes its batched path


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for the model's linear layers: an nn.Linear goes through few_row_linear; any
    other layer (quantize_int8's int8 Linear) is simply called."""
    if type(layer) is nn.Linear:
        return few_row_linear(x, layer.weight, layer.bias)
    return layer(x)


class MultiHeadAttention(nn.Module):
    """Causal self-attention: one fused projection to queries, keys and values, attention
    per head, and an output projection back to the residual stream."""

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq, hidden = x.shape
        # (batch, seq, 3 * hidden) -> three tensors of (batch, heads, seq, head_dim)
        q, k, v = linear(self.qkv, x).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        dropout_p = self.config.attention_dropout if self.training else 0.0
        weights = None
        if output_attentions or self.config.attention_impl == "manual":
            out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p, return_weights=True)
        elif isinstance(mask, LocalBlocks):
            out = local_block_attention(q, k, v, mask, dropout_p)
        else:
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, seq, hidden)
        return self.resid_dropout(linear(self.proj, out)), (weights if output_attentions else None)


class FeedForward(nn.Module):
    """Position-wise MLP: hidden -> intermediate -> GELU -> hidden."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.fc2.is_residual_projection = True
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(linear(self.fc2, F.gelu(linear(self.fc1, x), approximate=self.approximate)))


class TransformerBlock(nn.Module):
    """Attention then feed-forward, each inside a residual connection with a LayerNorm:
    before the sub-layer (pre-norm, GPT-2) or after the residual sum (post-norm, the
    original transformer)."""

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.attention = MultiHeadAttention(config, layer_index)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.feed_forward = FeedForward(config)

    def forward(self, x, mask, is_causal, rope, cache, output_attentions):
        if self.pre_norm:
            attended, weights = self.attention(self.norm1(x), mask, is_causal, rope, cache, output_attentions)
            x = x + attended
            return x + self.feed_forward(self.norm2(x)), weights
        attended, weights = self.attention(x, mask, is_causal, rope, cache, output_attentions)
        x = self.norm1(x + attended)
        return self.norm2(x + self.feed_forward(x)), weights


# ---------------------------------------------------------------------- positions

def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": channel pair (2i, 2i+1) of
    position p is (sin(p / 10000^(2i/dim)), cos(p / 10000^(2i/dim))). Defined for any
    position. positions (...,) -> (..., dim)."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding angles: channel i and i + head_dim/2 of a query or key at position p
    are rotated by p * theta^(-2i/head_dim). positions (...,) -> cos, sin (..., head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) channel pair of x (batch, heads, seq, head_dim) by its
    angle; cos, sin (batch or 1, 1, seq, head_dim). Then q_m . k_n depends on m - n only."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
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


# ---------------------------------------------------------------- fused LM loss

class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight^T, targets), mean over targets that are not -100,
    computed a chunk of rows at a time: the (tokens, vocab) logits never exist in full, and
    the gradients are made in the same pass, where each chunk's logits are still at hand:
    d loss / d logits = (softmax(logits) - onehot(target)) / number of targets."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            x, w = hidden.to(dtype), weight.to(dtype)
            counted = targets != -100
            count = counted.sum().clamp(min=1)
            safe_targets = targets.clamp(min=0)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(x)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, x.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                target = safe_targets[rows, None]
                logits = (x[rows] @ w.T).float()
                log_norm = logits.logsumexp(dim=-1, keepdim=True)
                loss += ((log_norm - logits.gather(1, target))[:, 0] * counted[rows]).sum()
                grad_logits = logits.sub_(log_norm).exp_()  # softmax, in place
                grad_logits.scatter_add_(1, target, torch.full_like(log_norm, -1.0))
                grad_logits.mul_((counted[rows] / count)[:, None])
                grad_logits = grad_logits.to(dtype)
                grad_hidden[rows] = grad_logits @ w
                if dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, x[rows])  # accumulate in place
                else:
                    grad_weight += (grad_logits.T @ x[rows]).float()
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = 256) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight^T (hidden (tokens, hidden_size),
    weight (vocab, hidden_size), targets (tokens,), -100 ignored) without building them all.
    Same value and gradients as F.cross_entropy(F.linear(hidden, weight), targets); about a
    third less time and memory for the LM head in training. (0, not NaN, when every target
    is ignored.)"""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


# -------------------------------------------------------------------------- model

class LMOutput(NamedTuple):
    """What TransformerLM.forward returns: logits (batch, seq, vocab); the mean
    cross-entropy loss when targets were given; the KV cache when use_cache; and, with
    output_attentions, one (batch, heads, q_len, k_len) weight tensor per layer. When
    training (targets given and gradients on) logits is None: the loss is computed without
    them (linear_cross_entropy)."""

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
        self.compiled_decode_step = None  # set by compile_decoding()
        self.static_cache_addresses = False  # likewise
        self.blocks = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_hidden_layers))
        # Post-norm blocks already end in a LayerNorm; pre-norm needs one before the head.
        self.final_norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
                           if config.norm_position == "pre" else nn.Identity())
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # (Tied, the head is the embedding matrix itself: logits = hidden @ embed_tokens.weight^T.)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, and the projections that
        write into the residual stream scaled down by sqrt(2 * layers), so the stream's
        variance does not grow with depth."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
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

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache; max_length (prompt + new tokens) sizes it up front. With a
        compiled decoding step every cache takes the largest size a run can need (the window,
        or the context: a longer prompt is cut to fit), so that its shapes, and the compiled
        code, are the same for every prompt and length."""
        config = self.config
        capacity = config.window_size or config.max_position_embeddings  # the largest a run can need
        if max_length and self.compiled_decode_step is None:
            capacity = min(capacity, max_length) if config.window_size else max_length
        return KVCache(config.num_hidden_layers, batch_size, capacity, config.window_size,
                       static_addresses=self.static_cache_addresses)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        position_offset: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> LMOutput:
        """input_ids (batch, seq) -> LMOutput.

        targets (batch, seq): next-token ids; -100 marks positions left out of the loss.
        With gradients enabled the loss comes from linear_cross_entropy and logits is None.
        past_key_values / use_cache: continue from (and return) a KVCache; the new tokens
        follow the cached ones. position_offset: position of the first token when there is
        no cache. attention_mask (batch, seq): 1 for tokens, 0 for (left) padding; positions
        count real tokens only, and the cache remembers the mask for later calls.
        """
        config = self.config
        batch, seq = input_ids.shape
        cache = past_key_values if past_key_values is not None else (self.new_cache(batch) if use_cache else None)
        start = cache.length if cache is not None else position_offset
        columns = torch.arange(start, start + seq, device=input_ids.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        positions = self._positions(columns, cache, attention_mask)
        if cache is not None:
            key_columns, key_valid = cache.begin(seq, attention_mask, input_ids.device)
        else:
            key_columns, key_valid = None, attention_mask

        # Position tables hold max_position_embeddings rows; beyond them (long generation
        # with a window) sinusoidal and RoPE values are computed on the fly.
        in_table = start + seq <= config.max_position_embeddings  # a position never exceeds its column
        if config.position_embedding == "learned" and not in_table:
            raise ValueError(f"sequence reaches position {start + seq - 1}, but learned position embeddings stop "
                             f"at max_position_embeddings - 1 = {config.max_position_embeddings - 1}")
        x = self.embed_tokens(input_ids)
        if config.position_embedding == "sinusoidal":
            # Scale the token embeddings up to the size of the encoding, as the original transformer does.
            table = self.sinusoidal_table[positions] if in_table else sinusoidal_embedding(positions, config.hidden_size)
            x = x * math.sqrt(config.hidden_size) + table
        elif config.position_embedding == "learned":
            x = x + self.embed_positions(positions)
        x = self.dropout(x)
        rope = None
        if config.position_embedding == "rope":
            if in_table:
                rope = self.rope_cos_table[positions][:, None], self.rope_sin_table[positions][:, None]
            else:
                cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)
                rope = cos[:, None], sin[:, None]

        mask, is_causal = self._attention_mask(columns, key_columns, key_valid, output_attentions)
        if seq == 1 and cache is not None and self.compiled_decode_step is not None and targets is None \
                and not output_attentions:
            # One new token on a cache: the step that compile_decoding() compiled.
            logits = self.compiled_decode_step(self, x, mask, is_causal, rope, cache)
            return LMOutput(logits, None, cache, None)
        x, attentions = self.run_blocks(x, mask, is_causal, rope, cache, output_attentions)
        if targets is not None and torch.is_grad_enabled():
            # Training: the loss straight from the hidden states, no (batch, seq, vocab) logits.
            loss = linear_cross_entropy(x.reshape(-1, x.size(-1)), self.head_weight, targets.reshape(-1))
            return LMOutput(None, loss, cache, attentions)
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits, loss, cache, attentions)

    def run_blocks(
        self, x: torch.Tensor, mask: torch.Tensor | LocalBlocks | None, is_causal: bool,
        rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None, output_attentions: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The blocks and the final norm: (batch, seq, hidden) -> (batch, seq, hidden), and
        each layer's attention weights if asked. Only tensor work: the cache's bookkeeping
        (Python integers) happened before, in forward, so torch.compile can trace this whole."""
        attentions = []
        for block in self.blocks:
            x, weights = block(x, mask, is_causal, rope, cache, output_attentions)
            attentions.append(weights)
        return self.final_norm(x), (tuple(attentions) if output_attentions else None)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's (vocab, hidden) weight: tied, the token embedding matrix itself."""
        return self.lm_head.weight if hasattr(self, "lm_head") else self.embed_tokens.weight

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head: (..., hidden) -> (..., vocab) logits. (quantize_int8's head is a
        layer of its own, with no float weight, so it is called as it is.)"""
        if hasattr(self, "lm_head"):
            return linear(self.lm_head, x)
        return few_row_linear(x, self.embed_tokens.weight)

    def decode_step(
        self, x: torch.Tensor, mask: torch.Tensor, is_causal: bool, rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache,
    ) -> torch.Tensor:
        """What compile_decoding compiles: the blocks, the final norm and the head for one new
        token. x (batch, 1, hidden) -> logits (batch, 1, vocab)."""
        return self.head(self.run_blocks(x, mask, is_causal, rope, cache, False)[0])

    def compile_decoding(self, cuda_graphs: bool | None = None, **compile_options) -> None:
        """torch.compile the decoding step (one new token on a KV cache) for inference: call it
        once the weights are final and the model is on its device. Every step has the same
        shapes (the cache is attended over its whole capacity, unwritten slots masked, and
        new_cache then gives every run the same capacity), so it compiles once per batch
        size, on the first step. Prompts and training run eagerly.

        cuda_graphs (default: whether the model is on a CUDA device) picks the strategy:
        - False, for CPUs: the weights become constants of the compiled code (inductor's
          "freezing"), and max-autotune lets inductor pick its own C++ kernels for these
          one-row products, pre-packed and fused with their neighbours (about 2x eager
          here, benchmarks/RESULTS.md). Compiling takes seconds. Weights changed later are
          not seen.
        - True, for GPUs: reduce-overhead replays the whole step as one CUDA graph, which
          removes the launch cost of its many small kernels. A graph writes into the cache
          in place, so the cache's buffers are marked as fixed addresses (one capture per
          cache), and freezing, which would fold them in as constants, stays off.
        compile_options (torch.compile's) replace the default mode.

        To torch every model's step is the same function, which it traces at most 8 times in
        a process (torch._dynamo.config.recompile_limit) before running it eagerly: a process
        that compiles many models should call torch._dynamo.reset() between them.
        """
        if cuda_graphs is None:
            cuda_graphs = self.embed_tokens.weight.device.type == "cuda"
        if not compile_options:
            compile_options = {"mode": "reduce-overhead" if cuda_graphs else "max-autotune-no-cudagraphs",
                               "dynamic": False}
        # The function, not the bound method: it takes the model as an argument, so a copy of
        # this model (copy.deepcopy, quantize_int8) decodes with its own weights, not these.
        step = torch.compile(TransformerLM.decode_step, **compile_options)
        self.compiled_decode_step = step if cuda_graphs else functools.partial(with_frozen_weights, step)
        self.static_cache_addresses = cuda_graphs

    @staticmethod
    def _positions(columns: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Position of each new token: its column, or, once padding is involved, the number
        of real tokens before it in its row. (1 or batch, seq)."""
        seen = cache.real_tokens if cache is not None and cache.real_tokens is not None else None
        if attention_mask is not None:
            before = seen[:, None] if seen is not None else columns[:1]
            return (before + attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        if seen is not None:
            return seen[:, None] + torch.arange(columns.numel(), device=columns.device)
        return columns[None]

    def _attention_mask(
        self, columns: torch.Tensor, key_columns: torch.Tensor | None, key_valid: torch.Tensor | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor | None, bool]:
        """The mask for this forward (shared by all layers), or None with is_causal when the
        fused kernel's own causal masking is exactly right, which is its fastest path."""
        config = self.config
        slopes = self.alibi_slopes if config.position_embedding == "alibi" else None
        fused = config.attention_impl == "sdpa" and not output_attentions
        window, seq = config.window_size, columns.numel()
        if fused and slopes is None and key_valid is None and key_columns is None and (window is None or window >= seq):
            return None, True
        if fused and key_valid is None and key_columns is None and window is not None and window < seq:
            return local_blocks(window, slopes, columns.device), False
        keys = columns if key_columns is None else key_columns
        return attention_mask(columns, keys, window, key_valid, slopes), False


def with_frozen_weights(compiled: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """compiled(*args) with inductor's freezing on. TorchDynamo reads the flag when it traces,
    which happens inside a call (the first, or a retrace); set only around the call, it leaves
    every other torch.compile of the process as it was."""
    import torch._inductor.config as inductor_config

    before, inductor_config.freezing = inductor_config.freezing, True
    try:
        return compiled(*args)
    finally:
        inductor_config.freezing = before


# ----------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of the tokens seen so far, so that decoding feeds one new token per
    forward instead of the whole sequence.

    keys[layer] and values[layer] are (batch, heads, capacity, head_dim) buffers, allocated
    once. Column c (the c-th token fed, padding included) lives in slot c % capacity, a ring
    buffer: with a window, capacity = window_size, so memory stays bounded and a key is
    overwritten just when it leaves every later query's window. Without a window the
    buffers double when full (new_cache(max_length=...) sizes them up front).
    Attention does not care about the order of keys, only about their columns, which
    slot_columns records (for masks and ALiBi). An empty slot holds EMPTY, a column after
    every real one, so the causal mask alone hides it.

    A decoding step (one new token) attends over the whole buffer, the same shapes every
    step, and writes its key at a slot given as a tensor: no Python integer that changes per
    step reaches the tensor work, which is what lets compile_decoding compile it once.
    """

    EMPTY = torch.iinfo(torch.long).max

    def __init__(self, num_layers: int, batch_size: int, capacity: int, window_size: int | None,
                 static_addresses: bool = False):
        self.batch_size = batch_size
        self.static_addresses = static_addresses  # see _new_buffer
        self.capacity = capacity
        self.window_size = window_size
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # columns fed so far
        self.slot_columns: torch.Tensor | None = None  # (capacity,): column in each slot, EMPTY if none
        self.key_valid: torch.Tensor | None = None  # (batch, capacity): False for padding; None if never padded
        self.real_tokens: torch.Tensor | None = None  # (batch,) real tokens so far; None if never padded
        self.slots: torch.Tensor | None = None  # (stored,): the slots this forward writes
        self._step: tuple[int, int] | None = None  # this forward's (old length, tokens stored)

    def begin(
        self, num_new: int, new_valid: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Book num_new tokens (validity (batch, num_new) or None). Returns the columns of the
        keys that update() will hand to attention (None: the same as the queries') and their
        validity (None: no padding)."""
        old, capacity_needed = self.length, self.length + num_new
        if self.window_size is not None:
            capacity_needed = min(capacity_needed, self.window_size)
        if capacity_needed > self.capacity:
            grown = max(capacity_needed, 2 * self.capacity)
            self._grow(grown if self.window_size is None else min(grown, self.window_size))
        if self.slot_columns is None:
            self.slot_columns = torch.full((self.capacity,), self.EMPTY, dtype=torch.long, device=device)
        if new_valid is not None and self.key_valid is None:
            self.key_valid = torch.ones(self.batch_size, self.capacity, dtype=torch.bool, device=device)
            self.real_tokens = torch.full((self.batch_size,), old, dtype=torch.long, device=device)
        if self.key_valid is not None and new_valid is None:
            new_valid = torch.ones(self.batch_size, num_new, dtype=torch.bool, device=device)

        new_columns = torch.arange(old, old + num_new, device=device)
        stored = min(num_new, self.capacity)
        slots = new_columns[-stored:] % self.capacity
        in_use = min(old, self.capacity)
        if num_new == 1:  # decoding: written before attending, and every slot attended (see update)
            self._store_bookkeeping(slots, new_columns, new_valid)
            key_columns, key_valid = self.slot_columns, self.key_valid
        else:
            key_columns = torch.cat((self.slot_columns[:in_use], new_columns)) if old else None
            key_valid = None
            if self.key_valid is not None:
                key_valid = torch.cat((self.key_valid[:, :in_use], new_valid), dim=1)
            self._store_bookkeeping(slots, new_columns[-stored:], new_valid[:, -stored:] if new_valid is not None else None)
        if self.real_tokens is not None:
            self.real_tokens = self.real_tokens + new_valid.sum(dim=1)
        self.slots, self._step = slots, (old, stored)
        self.length += num_new
        return key_columns, key_valid

    def _store_bookkeeping(self, slots: torch.Tensor, columns: torch.Tensor, valid: torch.Tensor | None) -> None:
        self.slot_columns[slots] = columns
        if valid is not None:
            self.key_valid[:, slots] = valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys and values (batch, heads, num_new, head_dim) for layer
        and return every key and value the new queries may need."""
        if self.keys[layer] is None:
            shape = (k.size(0), k.size(1), self.capacity, k.size(3))
            self.keys[layer] = self._new_buffer(torch.zeros(shape, dtype=k.dtype, device=k.device))
            self.values[layer] = self._new_buffer(torch.zeros(shape, dtype=v.dtype, device=v.device))
        keys, values = self.keys[layer], self.values[layer]
        if k.size(2) == 1:
            # Decoding: write into the slot (it held the column that just left the window),
            # then attend over the whole buffer; the mask hides empty slots.
            keys.index_copy_(2, self.slots, k.to(keys.dtype))
            values.index_copy_(2, self.slots, v.to(values.dtype))
            return keys, values
        old, stored = self._step
        # Several new tokens (a prompt): attend over the cached keys then the new ones, and
        # keep the last `capacity` new ones.
        in_use = min(old, self.capacity)
        k_all = torch.cat((keys[:, :, :in_use], k), dim=2) if in_use else k
        v_all = torch.cat((values[:, :, :in_use], v), dim=2) if in_use else v
        keys.index_copy_(2, self.slots, k[:, :, -stored:].to(keys.dtype))
        values.index_copy_(2, self.slots, v[:, :, -stored:].to(values.dtype))
        return k_all, v_all

    def _new_buffer(self, buffer: torch.Tensor) -> torch.Tensor:
        """A key or value buffer. For a compiled decoding step, which writes into it in place,
        its address is marked as fixed: a CUDA graph may only write into inputs whose address it
        keeps (captured once per cache)."""
        if self.static_addresses:
            torch._dynamo.mark_static_address(buffer)
        return buffer

    def _grow(self, capacity: int) -> None:
        """Enlarge the buffers. Only happens before the ring wraps, so slots are in order."""
        extra = capacity - self.capacity
        for store in (self.keys, self.values):
            for i, buffer in enumerate(store):
                if buffer is not None:
                    store[i] = self._new_buffer(F.pad(buffer, (0, 0, 0, extra)))
        if self.slot_columns is not None:
            self.slot_columns = F.pad(self.slot_columns, (0, extra), value=self.EMPTY)
        if self.key_valid is not None:
            self.key_valid = F.pad(self.key_valid, (0, extra), value=False)
        self.capacity = capacity

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reorders beams every step). Only the slots in
        use are copied."""
        in_use = min(self.length, self.capacity)
        for store in (self.keys, self.values):
            for i, buffer in enumerate(store):
                if buffer is None:
                    continue
                if index.numel() == buffer.size(0):
                    buffer[:, :, :in_use] = buffer[:, :, :in_use].index_select(0, index)
                else:  # a different number of rows: a new buffer
                    store[i] = self._new_buffer(buffer.index_select(0, index))
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index)
            self.real_tokens = self.real_tokens.index_select(0, index)
        self.batch_size = index.numel()


# ------------------------------------------------------------ checkpoints, devices

CHECKPOINT_FORMAT = "tinystories-transformer/checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, foreign, unsafe or inconsistent."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The TransformerLM inside torch.compile and DistributedDataParallel wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
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
    losses, history, optimizer state, ...) to one .pth file. Written to a temporary file and
    renamed, so a crash never leaves half a checkpoint. weights_dtype (torch.float16 or
    torch.bfloat16) stores floating-point weights in 16 bits; load_checkpoint restores
    float32."""
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
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


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
    """(model in eval mode on device, tokenizer, metadata) from a file of save_checkpoint.
    Anything wrong raises CheckpointError with one line naming the file and the problem."""
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


def pick_device(name: str = "auto") -> torch.device:
    """"auto" prefers CUDA, then Apple's MPS, then the CPU; asking for a device this machine
    does not have is a ValueError that says so."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here (no GPU, or a CPU-only torch); use --device cpu")
    if kind == "mps" and not mps:
        raise ValueError(f"device {name!r}: Apple's MPS is not available here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: choose auto, cpu, cuda or mps")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 natively (Intel AMX, or AVX-512 BF16 on Intel and AMD)?"""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype to train with on this device: bf16 where it is supported
    (fp16, which needs a GradScaler, on CUDA GPUs older than Ampere), None (float32) on a
    CPU without native bf16 units."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


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


def quantize_int8(model: TransformerLM) -> TransformerLM:
    """A copy for CPU inference with dynamic int8 quantisation: the weights of every linear
    layer, the LM head included, stored as int8 with a scale; activations quantised on the
    fly. About 4x less weight memory to read per token."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise ValueError("int8 quantisation needs torch.ao.quantization, which this torch does not have") from None
    model = copy.deepcopy(unwrap_model(model)).cpu().eval()
    if not hasattr(model, "lm_head"):  # untie: the head becomes a Linear that can be quantised
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
        model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch announces a future move of this API
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


# ------------------------------------------------------------------ GPT-2 interop

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
    return problems


def to_hf_gpt2(model: TransformerLM, eos_token_id: int | None = None):
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


# ---------------------------------------------------------------------- decoding
#
# Every decoding method runs on the KV cache: the prompt goes through the model once, then
# each step feeds only the newest token. Sampling turns the last position's logits into a
# distribution in the order Hugging Face uses: repetition penalty, no-repeat n-grams,
# minimum length, then temperature, top-k and top-p.

def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); -inf elsewhere."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens whose probabilities add up to at
    least p (always at least one); -inf elsewhere. Sorted ascending, a token is dropped when
    the probability mass at or below it is at most 1 - p.

    On a CPU, sorting the whole vocabulary is the slow part (about 0.6 ms for 10,000 logits
    here, more than a decoding step), so the rule is first applied to a few logits found by
    torch.topk, when they are enough to decide it:
    - a peaked distribution (a trained model's, nearly always): if the TOP_P_NUCLEUS largest
      hold a mass of at least p, the nucleus is among them. In descending order a token is
      dropped when the mass strictly above it is at least p, and every token outside is.
      (They cannot hold p when TOP_P_NUCLEUS x the largest probability is below it.)
    - a flat one: if the TOP_P_TAIL smallest hold more than 1 - p, every dropped token is
      among them, and the ascending rule applies to them as it is.
    Only when neither holds is the whole vocabulary sorted. On a GPU the sort is one fast
    kernel, quicker than those steps (benchmarks/RESULTS.md), and is always used. (Among
    tokens tied at the boundary, the topk paths may keep another one than a sort would: the
    same number of tokens and the same mass.)"""
    if p >= 1.0:
        return logits
    if logits.device.type == "cpu" and logits.size(-1) > 2 * TOP_P_TAIL:
        log_total = logits.logsumexp(dim=-1, keepdim=True)
        largest_prob = (logits.amax(dim=-1) - log_total[..., 0]).exp()
        if bool((TOP_P_NUCLEUS * largest_prob >= p).all()):
            top, index = torch.topk(logits, TOP_P_NUCLEUS, dim=-1)  # descending
            probs = (top - log_total).exp()
            mass = probs.cumsum(dim=-1)
            if bool((mass[..., -1] >= p).all()):
                drop = mass - probs >= p
                drop[..., 0] = False  # the most probable token always stays
                return torch.full_like(logits, float("-inf")).scatter(-1, index, top.masked_fill(drop, float("-inf")))
        bottom, index = torch.topk(logits, TOP_P_TAIL, dim=-1, largest=False)  # ascending
        mass = (bottom - log_total).exp().cumsum(dim=-1)
        if bool((mass[..., -1] > 1.0 - p).all()):
            return logits.scatter(-1, index, bottom.masked_fill(mass <= 1.0 - p, float("-inf")))
    ascending, order = torch.sort(logits, dim=-1)
    mass_at_or_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = mass_at_or_below <= 1.0 - p
    drop[..., -1] = False  # the most probable token always stays
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


TOP_P_NUCLEUS = 256  # filter_top_p looks for the nucleus among this many largest logits,
TOP_P_TAIL = 2048  # then for the dropped tokens among this many smallest


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row, drawn with probability softmax(logits), by inverse transform
    sampling: the first token whose cumulative probability exceeds a uniform draw u.
    (batch, vocab) -> (batch,). Tokens at -inf have probability 0 and are never drawn."""
    cumulative = logits.softmax(dim=-1).cumsum(dim=-1)
    total = cumulative[:, -1:]
    below_total = torch.nextafter(total, torch.zeros_like(total))  # u stays strictly below the last step
    u = torch.rand(total.shape, generator=generator, device=logits.device, dtype=total.dtype) * below_total
    return torch.searchsorted(cumulative, u, right=True)[:, 0]


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: a token already in the sequence (seen, (batch, vocab)
    bool) has its logit divided by penalty if positive, multiplied if negative."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


class _NgramBlocker:
    """Bans any token that would repeat an n-gram already in a row's sequence."""

    def __init__(self, n: int, rows: list[list[int]]):
        self.n = n
        self.rows = [list(row) for row in rows]
        self.followers: list[dict[tuple[int, ...], set[int]]] = [{} for _ in rows]
        for index, row in enumerate(self.rows):
            for end in range(n, len(row) + 1):
                self._remember(index, row[end - n : end])

    def _remember(self, index: int, ngram: list[int]) -> None:
        self.followers[index].setdefault(tuple(ngram[:-1]), set()).add(ngram[-1])

    def push(self, tokens: list[int]) -> None:
        for index, token in enumerate(tokens):
            row = self.rows[index]
            row.append(token)
            if len(row) >= self.n:
                self._remember(index, row[-self.n :])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, row in enumerate(self.rows):
            if len(row) >= self.n - 1:
                banned = self.followers[index].get(tuple(row[len(row) - self.n + 1 :]))
                if banned:
                    logits[index, list(banned)] = float("-inf")
        return logits


def _prompt_rows(prompts) -> list:
    """One prompt (token ids), a list of them or a (batch, seq) tensor -> a list of prompts."""
    if torch.is_tensor(prompts):
        return prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not prompts or isinstance(prompts[0], int):
        return [prompts]  # one prompt (possibly empty)
    return list(prompts)


def _prompt_batch(model: TransformerLM, prompts, bos_token_id: int | None, max_new_tokens: int):
    """Token lists -> a left-padded (batch, seq) tensor and its attention mask (None when all
    prompts have the same length), after the checks and the context limit."""
    rows = []
    for row in _prompt_rows(prompts):
        row = [int(t) for t in row]
        if not row:
            if bos_token_id is None:
                raise ValueError("an empty prompt needs a bos_token_id to start from (e.g. <|endoftext|>)")
            row = [bos_token_id]
        rows.append(row)
    config = model.config
    # Without a window (or with learned positions) the model cannot look past its context:
    # keep the end of a long prompt and leave room for the new tokens.
    if config.window_size is None or config.position_embedding == "learned":
        room = config.max_position_embeddings - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                             f"{config.max_position_embeddings}-token context")
        if max(map(len, rows)) > room:
            warnings.warn(f"prompt cut to its last {room} tokens to fit the {config.max_position_embeddings}-token "
                          f"context with {max_new_tokens} new tokens", stacklevel=3)
            rows = [row[-room:] for row in rows]
    longest = max(map(len, rows))
    device = model.embed_tokens.weight.device
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=device)
    if all(len(r) == longest for r in rows):
        return rows, ids, None
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)
    return rows, ids, mask


def check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    """Raise ValueError, with the rule, for a sampling setting outside its range."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), not {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), not {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 turns it off), not {repetition_penalty}")


@torch.no_grad()
def generate_steps(
    model: TransformerLM,
    prompts,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
):
    """The decoding loop, one step at a time: yields a list with the next token of every row.
    It does not stop by itself before max_new_tokens; generate() and stream() do.
    prompts: token ids, a list of token-id lists (any lengths), or a (batch, seq) tensor."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    rows, ids, mask = _prompt_batch(model, prompts, bos_token_id, max_new_tokens)
    greedy = not do_sample or temperature == 0
    if generator is None and seed is not None:
        generator = torch.Generator(ids.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(len(rows), ids.size(1) + max_new_tokens)
        logits = model(ids, past_key_values=cache, attention_mask=mask).logits[:, -1].float()
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            for index, row in enumerate(rows):
                seen[index, row] = True
        blocker = _NgramBlocker(no_repeat_ngram_size, rows) if no_repeat_ngram_size > 0 else None
        for step in range(max_new_tokens):
            if seen is not None:
                logits = penalize_repetition(logits, seen, repetition_penalty)
            if blocker is not None:
                logits = blocker.apply(logits)
            if eos_token_id is not None and step < min_new_tokens:
                logits[:, eos_token_id] = float("-inf")
            if greedy:
                tokens = logits.argmax(dim=-1)
            else:
                # Shift the largest logit to 0 before dividing: a tiny temperature then sends the
                # others to -inf (greedy, in the limit) instead of the largest to +inf (NaN).
                logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
                logits = filter_top_p(filter_top_k(logits, top_k), top_p)
                tokens = sample_from_logits(logits, generator)
            token_list = tokens.tolist()
            yield token_list
            if step + 1 == max_new_tokens:
                break
            if seen is not None:
                seen[torch.arange(len(rows)), tokens] = True
            if blocker is not None:
                blocker.push(token_list)
            logits = model(tokens[:, None], past_key_values=cache).logits[:, -1].float()
    finally:
        model.train(was_training)


def generate(model: TransformerLM, prompts, max_new_tokens: int, stop_strings: list[str] | None = None,
             tokenizer: BPETokenizer | None = None, **settings) -> list[list[int]]:
    """Generate up to max_new_tokens after each prompt; returns each row's new tokens.

    A row stops at eos_token_id (kept as its last token) or when its text ends with one of
    stop_strings (which needs the tokenizer). Settings are those of generate_steps:
    do_sample (False: greedy; temperature 0 is greedy too), temperature, top_k, top_p,
    repetition_penalty, no_repeat_ngram_size, min_new_tokens, eos_token_id, bos_token_id
    (starts an empty prompt), seed or generator (reproducible sampling).
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to read the text")
    eos = settings.get("eos_token_id")
    outputs: list[list[int]] | None = None
    done: list[bool] = []
    for tokens in generate_steps(model, prompts, max_new_tokens, **settings):
        if outputs is None:
            outputs, done = [[] for _ in tokens], [False] * len(tokens)
        for index, token in enumerate(tokens):
            if done[index]:
                continue
            outputs[index].append(token)
            done[index] = token == eos or (bool(stop_strings) and _ends_with_stop(tokenizer, outputs[index], stop_strings))
        if all(done):
            break
    return outputs if outputs is not None else [[] for _ in _prompt_rows(prompts)]


def _ends_with_stop(tokenizer: BPETokenizer, tokens: list[int], stop_strings: list[str]) -> bool:
    # A stop string of n characters spans at most 4n tokens (4 UTF-8 bytes per character).
    tail = tokenizer.decode(tokens[-4 * max(map(len, stop_strings)) :])
    return any(stop in tail for stop in stop_strings)


def stream(model: TransformerLM, tokenizer: BPETokenizer, prompt: list[int], max_new_tokens: int,
           stop_strings: list[str] | None = None, **settings):
    """Generate for one prompt and yield its text as it is made. A character split across
    tokens (an emoji is 4 bytes) comes out once complete; <|endoftext|> ends the stream
    without being printed. The pieces join to tokenizer.decode(generate(...)) without the
    end token; the generator's return value (StopIteration.value) is the new token list."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    eos = settings.get("eos_token_id")
    generated: list[int] = []
    for (token,) in generate_steps(model, [prompt], max_new_tokens, **settings):
        if token == eos:
            break
        generated.append(token)
        text = decoder.decode(tokenizer.decode_bytes([token]))
        if text:
            yield text
        if stop_strings and _ends_with_stop(tokenizer, generated, stop_strings):
            break
    rest = decoder.decode(b"", final=True)
    if rest:
        yield rest
    return generated


@torch.no_grad()
def beam_search(
    model: TransformerLM,
    prompt,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
) -> list[tuple[list[int], float]]:
    """Beam search on the KV cache for one prompt; returns the num_return_sequences best
    (new tokens, score), best first. Hugging Face's algorithm and stopping rules:

    Each step extends every beam by every token and keeps the 2 * num_beams best
    continuations by total log-probability. Those among the first num_beams that end (in
    eos_token_id, or at max_new_tokens) become finished hypotheses, scored
    log-probability / generated_length ** length_penalty; the best num_beams others carry on,
    and the cache rows are reordered to follow them. The search stops when no running beam
    can beat the worst of num_beams finished ones (early_stopping=False: judged at the
    current length; "never": at the longest length when length_penalty > 0), as soon as
    num_beams are finished (early_stopping=True), or at max_new_tokens.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, not {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be between 1 and num_beams ({num_beams}), not {num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f'early_stopping must be True, False or "never", not {early_stopping!r}')
    rows, ids, _ = _prompt_batch(model, [prompt] if not torch.is_tensor(prompt) else prompt, bos_token_id, max_new_tokens)
    if len(rows) != 1:
        raise ValueError("beam_search takes one prompt")
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(1, ids.size(1) + max_new_tokens)
        logits = model(ids, past_key_values=cache).logits[:, -1].float()
        cache.reorder(torch.zeros(num_beams, dtype=torch.long, device=ids.device))
        logits = logits.expand(num_beams, -1)
        # All beams start as the prompt; only the first may be extended at the first step.
        scores = torch.full((num_beams,), -1e9, device=ids.device)
        scores[0] = 0.0
        beams: list[list[int]] = [[] for _ in range(num_beams)]
        finished: list[tuple[float, list[int]]] = []
        vocab = logits.size(-1)
        keep = min(2 * num_beams, num_beams * vocab)
        for step in range(max_new_tokens):
            totals = (logits.log_softmax(dim=-1) + scores[:, None]).view(-1)
            top_scores, top_index = totals.topk(keep)
            origins, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
            length = step + 1
            ends = [token == eos_token_id or length == max_new_tokens for token in tokens]
            for rank in range(num_beams):
                if ends[rank]:
                    finished.append((top_scores[rank].item() / length**length_penalty, beams[origins[rank]] + [tokens[rank]]))
            finished = sorted(finished, key=lambda hyp: -hyp[0])[:num_beams]
            carry_on = [rank for rank in range(keep) if not ends[rank]][:num_beams]
            if not carry_on:
                break  # every continuation ended: max_new_tokens reached
            beams = [beams[origins[rank]] + [tokens[rank]] for rank in carry_on]
            scores = top_scores[carry_on]
            if len(finished) == num_beams:
                if early_stopping is True:
                    break
                best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else length
                if scores[0].item() / best_length**length_penalty <= finished[-1][0]:
                    break
            cache.reorder(torch.tensor([origins[rank] for rank in carry_on], device=ids.device))
            new_tokens = torch.tensor([[tokens[rank]] for rank in carry_on], device=ids.device)
            logits = model(new_tokens, past_key_values=cache).logits[:, -1].float()
    finally:
        model.train(was_training)
    return [(tokens, score) for score, tokens in finished[:num_return_sequences]]
