"""Speed paths, kept out of the teaching code. Each one has the API of the plain code it
replaces, is switched on from outside (a layer swapped in, a model wrapped, a function
passed), and is tested equal to its plain twin. Figures: benchmarks/RESULTS.md.

1. One-row products on a CPU (decoding): few_row_linear, the FewRowLinear and FewRowLMHead
   layers, and use_few_row_linear(model), which swaps them in where they pay on this
   machine (few_row_pays times them).
2. The training loss without the (tokens, vocab) logits: linear_cross_entropy and
   use_chunked_loss(model), which swaps in ChunkedLossLMHead.
3. Top-p on a CPU without sorting the vocabulary: filter_top_p_fast, passed to
   decoding.generate as top_p_filter.
4. A compiled decoding step: compile_decoding(model) returns a CompiledDecoding, a wrapper
   with the model's API whose one-token steps run a torch.compile'd function.
5. int8 weights for CPU inference: quantize_int8(model).
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from decoding import filter_top_p
from kv_cache import KVCache
from transformer_model import AttentionInputs, AvoidedTokens, LMHead, LMOutput, TransformerLM, unwrap_model

# ------------------------------------------------------------ 1. one-row products on a CPU

FEW_ROWS = 4  # up to this many rows (beam search's 4 beams), few_row_linear takes its batched path
MIN_BLOCK_ROWS = 256  # ... cutting the weight into blocks of at least this many rows


def few_row_blocks(out_features: int, threads: int) -> int:
    """How many blocks few_row_linear cuts a weight of out_features rows into: one per
    thread, but none under MIN_BLOCK_ROWS rows. Fewer than 2 means the plain F.linear.

    Measured one layer at a time (benchmarks/RESULTS.md, 2 threads): blocks of 5,000, 512 and
    384 rows (LM head, MLP in, qkv) were 3.7x, 1.4x and 1.2x faster than F.linear; blocks of
    128 (attention output, MLP out: 256 rows) were slower. The rule keeps every block above
    that size whatever the thread count, and uses every thread where the rows allow."""
    return max(1, min(threads, out_features // MIN_BLOCK_ROWS))


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: x (..., in) @ weight^T (in, out) + bias, made fast for decoding on a CPU.

    A decoding step has one row per sequence, so each layer is a matrix-vector product whose
    cost is streaming the weight from memory. BLAS's path for it (MKL's gemv) uses one thread
    and a fraction of the memory's speed. Cutting the weight's rows into one block per thread
    (few_row_blocks) and multiplying the blocks as a batch (baddbmm) takes the batched path,
    which keeps every thread streaming: the same result up to rounding order. Float32 only
    (bf16 weights go through oneDNN, which is faster as it is); more rows (training, prompts,
    larger batches), GPUs and compiled code (torch.compile picks its own kernels) take the
    plain F.linear."""
    if torch.compiler.is_compiling():  # first: torch.compile cannot trace get_num_threads
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    blocks = few_row_blocks(out_features, torch.get_num_threads())
    if x.device.type != "cpu" or weight.dtype != torch.float32 or rows > FEW_ROWS or blocks < 2:
        return F.linear(x, weight, bias)
    per_block = out_features // blocks
    blocked = blocks * per_block  # the weight rows in blocks; the few left over (< blocks) go through F.linear
    weight_blocks = weight[:blocked].view(blocks, per_block, in_features)  # (blocks, per_block, in)
    x_rows = x.reshape(rows, in_features)  # (rows, in)
    columns = x_rows.T.expand(blocks, in_features, rows)  # (blocks, in, rows): every block meets the same rows
    if bias is None:
        y = torch.bmm(weight_blocks, columns)  # (blocks, per_block, rows)
    else:
        y = torch.baddbmm(bias[:blocked].view(blocks, per_block, 1), weight_blocks, columns)
    y = y.view(blocked, rows).T  # (rows, blocked)
    if blocked < out_features:
        rest = F.linear(x_rows, weight[blocked:], None if bias is None else bias[blocked:])  # (rows, out - blocked)
        y = torch.cat((y, rest), dim=1)
    return y.reshape(*x.shape[:-1], out_features)


MIN_SPEEDUP = 1.2  # use_few_row_linear swaps a layer only when few_row_linear is this much faster


@functools.cache
def few_row_pays(out_features: int, in_features: int, threads: int, repeats: int = 25) -> bool:
    """Is few_row_linear clearly faster (MIN_SPEEDUP) than F.linear here, for one row through
    an (out_features, in_features) weight with this many threads? Timed once per shape (the
    answer is cached): medians of repeats calls each, on random weights. It depends on the
    CPU's BLAS: on the AMD EPYC of benchmarks/RESULTS.md the batched path made the LM head
    3.7x faster, while on an Intel Xeon with a fast one-row path it was slower for every
    layer of this model. Shapes that make fewer than two blocks are not timed: False."""
    if few_row_blocks(out_features, threads) < 2:
        return False
    weight, bias, x = torch.randn(out_features, in_features), torch.randn(out_features), torch.randn(1, in_features)

    def median_time(linear: Callable[..., torch.Tensor]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            linear(x, weight, bias)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    median_time(few_row_linear)  # a first, untimed round: allocations and thread start-up
    return median_time(F.linear) >= MIN_SPEEDUP * median_time(few_row_linear)


class FewRowLinear(nn.Linear):
    """nn.Linear through few_row_linear: the same parameters, the same result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return few_row_linear(x, self.weight, self.bias)


class FewRowLMHead(LMHead):
    """LMHead whose logits go through few_row_linear."""

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return few_row_linear(x, weight)


def use_few_row_linear(model: TransformerLM) -> TransformerLM:
    """Swap few_row_linear into the model's layers where it pays on this machine
    (few_row_pays: measured once per layer shape; on a GPU, or for weights other than
    float32, nowhere), in place, and return the model. Only the layers' class changes (their
    forward), so parameters, state-dict keys and results (up to rounding order) stay. For
    inference; it leaves the int8 layers of quantize_int8 alone."""
    weight = model.head_weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return model
    threads = torch.get_num_threads()
    for module in model.modules():
        if type(module) is nn.Linear and few_row_pays(module.out_features, module.in_features, threads):
            module.__class__ = FewRowLinear
    if type(model.lm_head) is LMHead and few_row_pays(*weight.shape, threads):
        model.lm_head.__class__ = FewRowLMHead
    return model


# ------------------------------------------------------------------- 2. the chunked loss

class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight^T, targets), the mean over targets that are not -100,
    each counted by its loss weight, computed a chunk of rows at a time: the (tokens, vocab)
    logits never exist in full, and the gradients are made in the same pass, where each
    chunk's logits are still at hand:
    d loss / d logits = (softmax(logits) - onehot(target)) x its weight / the weights' sum."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, loss_weights, chunk_rows):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            x, w = hidden.to(dtype), weight.to(dtype)
            counted = (targets != -100).float()  # each target's weight: 0 for one left out
            if loss_weights is not None:
                counted = counted * loss_weights.float()
            count = counted.sum().clamp(min=torch.finfo(torch.float32).tiny)  # 0 / tiny = 0 when none count
            safe_targets = targets.clamp(min=0)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(x)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, x.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                target = safe_targets[rows, None]
                logits = (x[rows] @ w.T).float()  # (chunk, vocab)
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
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         loss_weights: torch.Tensor | None = None, chunk_rows: int = 256) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight^T (hidden (tokens, hidden_size),
    weight (vocab, hidden_size), targets (tokens,), -100 ignored, loss_weights (tokens,) or
    None) without building them all. Same value and gradients as LMHead's loss on
    F.linear(hidden, weight); about a third less time and memory for the LM head in
    training. (0, not NaN, when every target is ignored and there are no weights.)"""
    return _LinearCrossEntropy.apply(hidden, weight, targets, loss_weights, chunk_rows)


class ChunkedLossLMHead(LMHead):
    """LMHead that, when training (targets given, gradients on), returns the loss from
    linear_cross_entropy and no logits; otherwise the plain head. Avoided tokens are few, so
    their term is LMHead's own avoided_loss, over the same count of weighted targets."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None,
                loss_weights: torch.Tensor | None = None,
                avoided: AvoidedTokens | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if targets is None or not torch.is_grad_enabled():
            return super().forward(x, weight, targets, loss_weights, avoided)
        targets = targets.reshape(-1)
        flat_weights = None if loss_weights is None else loss_weights.reshape(-1)
        loss = linear_cross_entropy(x.reshape(-1, x.size(-1)), weight, targets, flat_weights)
        if avoided is None:
            return None, loss
        counted = (targets != -100).float() * (1.0 if flat_weights is None else flat_weights.float())
        return None, loss + self.avoided_loss(x, weight, avoided) / counted.sum()


def use_chunked_loss(model: TransformerLM) -> TransformerLM:
    """Swap ChunkedLossLMHead in (in place; it holds the same parameters) and return the
    model: training then never builds the (batch, seq, vocab) logits. training.train does
    this to the model it is given; the head stays swapped after training, which changes
    nothing but speed (use_few_row_linear then leaves the head as it is)."""
    model.lm_head.__class__ = ChunkedLossLMHead
    return model


# ---------------------------------------------------------------------- 3. top-p on a CPU

TOP_P_NUCLEUS = 256  # filter_top_p_fast looks for the nucleus among this many largest logits,
TOP_P_TAIL = 2048  # then for the dropped tokens among this many smallest


def filter_top_p_fast(logits: torch.Tensor, p: float) -> torch.Tensor:
    """decoding.filter_top_p, without sorting the whole vocabulary when a few logits found
    by torch.topk decide the rule. On a CPU the sort is the slow part (about 0.6 ms for
    10,000 logits here, more than a decoding step):
    - a peaked distribution (a trained model's, nearly always): if the TOP_P_NUCLEUS largest
      hold a mass of at least p, the nucleus is among them. In descending order a token is
      dropped when the mass strictly above it is at least p, and every token outside is.
      (They cannot hold p when TOP_P_NUCLEUS x the largest probability is below it.)
    - a flat one: if the TOP_P_TAIL smallest hold more than 1 - p, every dropped token is
      among them, and the ascending rule applies to them as it is.
    Otherwise, and on GPUs (where the sort is one fast kernel, quicker than these steps),
    filter_top_p sorts. (Among tokens tied at the boundary, the topk paths may keep another
    one than a sort would: the same number of tokens and the same mass.)"""
    if p >= 1.0 or logits.device.type != "cpu" or logits.size(-1) <= 2 * TOP_P_TAIL:
        return filter_top_p(logits, p)
    log_total = logits.logsumexp(dim=-1, keepdim=True)  # (batch, 1): log of the softmax's denominator
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
    return filter_top_p(logits, p)


# --------------------------------------------------------------- 4. compiled decoding

def decode_step(model: TransformerLM, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache) -> torch.Tensor:
    """What CompiledDecoding compiles: TransformerLM.forward after its embed, for one new
    token on a cache: x (batch, 1, hidden) -> logits (batch, 1, vocab). Only tensor work."""
    for block in model.blocks:
        x, _ = block(x, inputs, cache, False)
    logits, _ = model.lm_head(model.final_norm(x), model.head_weight)
    return logits


def call_with_inductor_freezing(compiled: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """compiled(*args) with inductor's `freezing` on, which makes the weights constants of
    the compiled code. TorchDynamo reads the flag when it traces, which happens inside a
    call (the first, or a retrace); set only around the call, it leaves every other
    torch.compile of the process as it was."""
    import torch._inductor.config as inductor_config

    before, inductor_config.freezing = inductor_config.freezing, True
    try:
        return compiled(*args)
    finally:
        inductor_config.freezing = before


class CompiledDecoding(nn.Module):
    """A TransformerLM for inference whose one-token decoding steps (on a KV cache) run a
    compiled decode_step; everything else (prompts, training, attention weights) runs the
    model as it is. It has the model's call, config and new_cache, so every function of
    decoding.py takes it. Every step has the same shapes (the cache is attended over its
    whole capacity, unwritten slots masked, and new_cache gives every cache the largest
    size a run can need), so it compiles once per batch size, on the first step.

    cuda_graphs (default: whether the model is on a CUDA device) picks the strategy:
    - False, for CPUs: inductor's freezing (call_with_inductor_freezing) plus max-autotune,
      which lets inductor pick its own C++ kernels for these one-row products, pre-packed
      and fused with their neighbours (about 2x eager here). Compiling takes seconds.
      Weights changed later are not seen.
    - True, for GPUs: reduce-overhead replays the whole step as one CUDA graph, which
      removes the launch cost of its many small kernels. A graph writes into the cache in
      place, so the cache's buffers are marked as fixed addresses (one capture per cache),
      and freezing, which would fold them in as constants, stays off.
    compile_options (torch.compile's) replace the default mode.

    To torch every model's step is the same function, which it traces at most 8 times in a
    process (torch._dynamo.config.recompile_limit) before running it eagerly: a process that
    compiles many models should call torch._dynamo.reset() between them."""

    def __init__(self, model: TransformerLM, cuda_graphs: bool | None = None, **compile_options):
        super().__init__()
        self.model = model
        self.config = model.config
        if cuda_graphs is None:
            cuda_graphs = next(model.parameters()).device.type == "cuda"
        self.cuda_graphs = cuda_graphs
        if not compile_options:
            compile_options = {"mode": "reduce-overhead" if cuda_graphs else "max-autotune-no-cudagraphs",
                               "dynamic": False}
        # decode_step takes the model as an argument, so a copy of this wrapper (copy.deepcopy)
        # decodes with its own weights.
        step = torch.compile(decode_step, **compile_options)
        self.step = step if cuda_graphs else functools.partial(call_with_inductor_freezing, step)

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """The model's largest cache (max_length is not used): one shape, one compile."""
        cache = self.model.new_cache(batch_size)
        cache.static_addresses = self.cuda_graphs
        return cache

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False, output_attentions: bool = False,
                attention_mask: torch.Tensor | None = None) -> LMOutput:
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache(input_ids.size(0))  # this wrapper's cache: one size, fixed addresses
        one_token_step = input_ids.size(1) == 1 and past_key_values is not None and targets is None
        if not one_token_step or output_attentions:
            return self.model(input_ids, targets, past_key_values, use_cache, output_attentions, attention_mask)
        x, inputs = self.model.embed(input_ids, past_key_values, attention_mask, False)
        return LMOutput(self.step(self.model, x, inputs, past_key_values), None, past_key_values, None)


def compile_decoding(model: TransformerLM, cuda_graphs: bool | None = None, **compile_options) -> CompiledDecoding:
    """The model wrapped in CompiledDecoding: call it once the weights are final and the
    model is on its device, and decode with the wrapper."""
    return CompiledDecoding(model, cuda_graphs, **compile_options)


# ------------------------------------------------------------------------------- 5. int8

class LinearLMHead(LMHead):
    """An LM head that is a layer of its own, an nn.Linear holding a copy of the head's
    weight, so that quantize_dynamic can replace it by an int8 one. The weight the model
    hands in is not used."""

    def __init__(self, weight: torch.Tensor):
        nn.Module.__init__(self)
        self.register_parameter("weight", None)
        self.linear = nn.Linear(weight.size(1), weight.size(0), bias=False)
        self.linear.weight = nn.Parameter(weight.detach().clone())

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def quantize_int8(model: TransformerLM) -> TransformerLM:
    """A copy for CPU inference with dynamic int8 quantisation: the weights of every linear
    layer, the LM head included, stored as int8 with a scale; activations quantised on the
    fly. About 4x less weight memory to read per token."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise ValueError("int8 quantisation needs torch.ao.quantization, which this torch does not have") from None
    model = copy.deepcopy(unwrap_model(model)).cpu().eval()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.__class__ = nn.Linear  # a FewRowLinear too: quantize_dynamic replaces plain Linears only
    model.lm_head = LinearLMHead(model.head_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch announces a future move of this API
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
