"""The speed paths of speedups.py, each against the plain code it stands in for: the same
values (and gradients, and tokens), and the path really taken where that is the point."""

import copy

import pytest
import torch
import torch.nn.functional as F

import speedups
from decoding import generate
from speedups import (
    FEW_ROWS,
    MIN_BLOCK_ROWS,
    TOP_P_NUCLEUS,
    TOP_P_TAIL,
    FewRowLinear,
    FewRowLMHead,
    compile_decoding,
    few_row_blocks,
    few_row_linear,
    filter_top_p_fast,
    linear_cross_entropy,
    quantize_int8,
    use_chunked_loss,
    use_few_row_linear,
)
from test_transformer_model import VOCAB, random_ids, tiny_model
from transformer_model import TransformerConfig, TransformerLM

# ----------------------------------------------------------------- one-row products


@pytest.mark.parametrize("threads", [1, 2, 3, 6, 12])
@pytest.mark.parametrize("rows", [1, 3, 4, 40])  # 40 is above FEW_ROWS: the plain path
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_few_row_linear_equals_f_linear_values_and_gradients(threads, rows, with_bias, monkeypatch):
    monkeypatch.setattr(speedups, "MIN_BLOCK_ROWS", 16)  # 64 rows: up to 4 blocks; 3 threads leave a row over
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 48, generator=generator, requires_grad=True)
    weight = torch.randn(64, 48, generator=generator, requires_grad=True)
    bias = torch.randn(64, generator=generator, requires_grad=True) if with_bias else None
    expected = torch.nn.functional.linear(x, weight, bias)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, weight])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = few_row_linear(x, weight, bias)
        grads = torch.autograd.grad(got.square().sum(), [x, weight])
    finally:
        torch.set_num_threads(before)
    assert got.shape == (rows, 1, 64)
    torch.testing.assert_close(got, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):  # (sums in another order)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads, blocks", [
    (1, {"LM head": 1, "qkv": 1, "attention output": 1, "MLP in": 1, "MLP out": 1}),  # one thread: plain F.linear
    (2, {"LM head": 2, "qkv": 2, "attention output": 1, "MLP in": 2, "MLP out": 1}),
    (3, {"LM head": 3, "qkv": 3, "attention output": 1, "MLP in": 3, "MLP out": 1}),
    (6, {"LM head": 6, "qkv": 3, "attention output": 1, "MLP in": 4, "MLP out": 1}),
    (12, {"LM head": 12, "qkv": 3, "attention output": 1, "MLP in": 4, "MLP out": 1}),
])
def test_few_row_blocks_are_never_below_the_measured_size_whatever_the_threads(threads, blocks):
    config = TransformerConfig()
    rows = {"LM head": config.vocab_size, "qkv": 3 * config.hidden_size, "attention output": config.hidden_size,
            "MLP in": config.intermediate_size, "MLP out": config.hidden_size}
    assert {name: few_row_blocks(out, threads) for name, out in rows.items()} == blocks
    assert all(out // blocks[name] >= MIN_BLOCK_ROWS for name, out in rows.items() if blocks[name] > 1)


@pytest.mark.parametrize("threads", [1, 2, 3, 6, 12])
def test_few_row_linear_takes_the_batched_path_exactly_when_the_gate_says(threads, monkeypatch):
    calls = []
    baddbmm = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: calls.append(a[1].shape) or baddbmm(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out in (256, 768, 1024, 10_000):
            weight, bias, x = torch.randn(out, 32), torch.randn(out), torch.randn(1, 1, 32)
            torch.testing.assert_close(few_row_linear(x, weight, bias), F.linear(x, weight, bias))
            few_row_linear(torch.randn(FEW_ROWS + 1, 32), weight, bias)  # more rows: always F.linear
    finally:
        torch.set_num_threads(before)
    expected = [(few_row_blocks(out, threads), out // few_row_blocks(out, threads), 32)
                for out in (256, 768, 1024, 10_000) if few_row_blocks(out, threads) > 1]
    assert calls == expected


def test_few_row_pays_is_timed_once_per_shape_and_never_for_one_block(monkeypatch):
    timed = []
    monkeypatch.setattr(speedups, "few_row_linear", lambda *a: timed.append(a[1].shape) or F.linear(*a))
    speedups.few_row_pays.cache_clear()
    assert speedups.few_row_pays(256, 64, 2) is False and not timed  # one block: the plain path, untimed
    assert speedups.few_row_pays(1024, 64, 2) in (True, False) and timed
    count = len(timed)
    speedups.few_row_pays(1024, 64, 2)
    assert len(timed) == count  # cached
    speedups.few_row_pays.cache_clear()


def test_few_row_layers_go_only_where_they_pay_here(monkeypatch):
    asked = []
    monkeypatch.setattr(speedups, "few_row_pays", lambda out, inp, threads: asked.append((out, inp)) or out == 512)
    model = use_few_row_linear(tiny_model(hidden_size=64, intermediate_size=512, num_attention_heads=4))
    assert type(model.blocks[0].feed_forward.fc1) is FewRowLinear and type(model.lm_head) is not FewRowLMHead
    assert (64 * 3, 64) in asked and (VOCAB, 64) in asked  # every layer and the head were asked about
    bf16 = tiny_model(hidden_size=64, intermediate_size=512, num_attention_heads=4).to(torch.bfloat16)
    assert not any(type(m) is FewRowLinear for m in use_few_row_linear(bf16).modules())  # float32 only


def test_swapping_in_few_row_layers_keeps_the_weights_the_keys_and_the_tokens(monkeypatch):
    monkeypatch.setattr(speedups, "few_row_pays", lambda out, inp, threads: few_row_blocks(out, 2) > 1)
    model = tiny_model(hidden_size=64, intermediate_size=512, num_attention_heads=4, vocab_size=2 * MIN_BLOCK_ROWS,
                       initializer_range=0.3)
    keys, ids = list(model.state_dict()), random_ids(2, 12)
    expected_logits, expected_tokens = model(ids).logits, generate(model, [5, 17, 42], 20, do_sample=False)
    use_few_row_linear(model)
    block = model.blocks[0]
    assert type(block.feed_forward.fc1) is FewRowLinear  # 512 outputs: two blocks of 256
    assert type(block.attention.qkv) is torch.nn.Linear and type(block.feed_forward.fc2) is torch.nn.Linear
    assert type(model.lm_head) is FewRowLMHead  # 512 rows
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(ids).logits, expected_logits)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert generate(model, [5, 17, 42], 20, do_sample=False) == expected_tokens
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------- the chunked loss


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_lm_loss_has_the_gradients_of_cross_entropy(autocast, weighted):
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    targets[::7] = -100
    loss_weights = torch.rand(300) * 5 if weighted else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
        counted = (targets != -100).float() * (1 if loss_weights is None else loss_weights)
        reference = (losses * counted).sum() / counted.sum()  # cross_entropy's mean, when unweighted
    reference_grads = torch.autograd.grad(reference * 3, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = linear_cross_entropy(hidden, weight, targets, loss_weights, chunk_rows=64)
    fused_grads = torch.autograd.grad(fused * 3, (hidden, weight))
    tolerance = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused, reference, **tolerance)
    for ours, theirs in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(ours, theirs, **tolerance)


def test_the_chunked_loss_head_trains_like_the_plain_one_without_logits():
    model = tiny_model(dropout=0.0).train()
    chunked = use_chunked_loss(copy.deepcopy(model))
    ids, targets = random_ids(2, 12), random_ids(2, 12, seed=5)
    targets[0, :5] = -100
    plain, fast = model(ids, targets=targets), chunked(ids, targets=targets)
    assert fast.logits is None  # training builds no (batch, seq, vocab) logits
    torch.testing.assert_close(fast.loss, plain.loss)
    plain.loss.backward()
    fast.loss.backward()
    for (name, ours), theirs in zip(chunked.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():  # evaluation: the plain head, logits and all
        torch.testing.assert_close(chunked(ids, targets=targets).logits, model(ids).logits)


# ------------------------------------------------------------------------------ int8


def test_int8_decodes_with_almost_the_float_logits():
    model = tiny_model(hidden_size=64, intermediate_size=512, num_attention_heads=4)
    quantized = quantize_int8(use_few_row_linear(copy.deepcopy(model)))  # few-row layers are quantized too
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    ids = random_ids(2, 12)
    expected, got = model(ids).logits, quantized(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # int8 rounding: a few percent at most
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert len(generate(quantized, [5, 17, 42], 10, do_sample=False)[0]) == 10
    assert isinstance(model.lm_head, type(TransformerLM(model.config).lm_head))  # the original is untouched


# ------------------------------------------------------------------------------ top-p


def test_fast_top_p_on_a_large_vocabulary_equals_hugging_face_on_each_of_its_paths(monkeypatch):
    from transformers import TopPLogitsWarper

    ran = []  # which part of filter_top_p_fast decided (see its docstring), from the k it asked topk for
    topk, sort = torch.topk, torch.sort
    monkeypatch.setattr(torch, "topk", lambda *a, **k: ran.append({TOP_P_NUCLEUS: "largest", TOP_P_TAIL: "smallest"}[a[1]])
                        or topk(*a, **k))
    monkeypatch.setattr(torch, "sort", lambda *a, **k: ran.append("sort") or sort(*a, **k))
    torch.manual_seed(0)
    peaked, flat, uniform = (torch.randn(2, 3 * TOP_P_TAIL) * scale for scale in (6.0, 0.5, 0.01))
    cases = [(peaked, 0.9, "largest"), (flat, 0.9, "smallest"), (uniform, 0.5, "sort"), (peaked, 1e-9, "largest"),
             (torch.cat((peaked[:1], flat[:1])), 0.9, "sort"),  # a batch decides by its hardest row
             (torch.cat((uniform[:1], flat[:1])), 0.95, "smallest")]
    for logits, p, path in cases:
        ran.clear()
        ours = filter_top_p_fast(logits, p)
        assert ran[-1] == path, (path, p, ran)
        assert torch.equal(ours, TopPLogitsWarper(p)(None, logits.clone())), (path, p)
    for logits in (peaked, uniform):  # at p = 0 (generate refuses it) each path still keeps the top token
        kept = filter_top_p_fast(logits, 0.0).isfinite()
        assert kept.sum().item() == len(logits) and kept.gather(1, logits.argmax(1, keepdim=True)).all()


# ------------------------------------------------------------------ compiled decoding


@pytest.mark.parametrize("cuda_graphs", [False, True])  # frozen weights (CPUs), or caches at fixed addresses (GPUs)
@pytest.mark.parametrize("position_embedding, window, prompts", [
    ("rope", 6, [[5, 17, 42, 99, 3]]),  # the ring buffer wraps
    ("alibi", None, [[5, 17, 42], [8, 1, 2, 3, 4, 5, 6]]),  # left padding, float mask
    ("sinusoidal", 4, [[9, 9, 9, 9, 9, 9, 9, 9]]),
])
def test_the_compiled_decoding_step_is_traced_once_whole_and_decodes_like_eager(position_embedding, window, prompts,
                                                                                 cuda_graphs, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    marked = []  # the buffers given fixed addresses
    monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda tensor, guard=False: marked.append(tensor))
    frozen_when_traced = []

    class Counter(CompileCounter):  # counts the graphs it is given and runs them as they are
        def __call__(self, graph, example_inputs):
            frozen_when_traced.append(torch._inductor.config.freezing)
            return super().__call__(graph, example_inputs)

    torch._dynamo.reset()  # every model's step shares one code object, and torch's limit of 8 traces of it
    model = tiny_model(position_embedding=position_embedding, window_size=window, initializer_range=0.3)
    monkeypatch.setattr(speedups, "few_row_pays", lambda *shape: True)
    use_few_row_linear(model)  # every layer: few_row_linear must not break the graph
    eager = generate(model, prompts, 20, do_sample=False)
    counter = Counter()
    compiled = compile_decoding(model, cuda_graphs=cuda_graphs, backend=counter, fullgraph=True)  # a graph break would raise
    assert generate(compiled, [prompts[0]] * 3, 4, do_sample=False)  # another batch size: its own trace
    assert generate(compiled, prompts, 20, do_sample=False) == eager
    assert generate(compiled, [row[1:] for row in prompts], 30, do_sample=False)  # other lengths: the same cache size
    assert generate(compiled, prompts, 20, do_sample=False) == eager  # a new cache: new buffers, no retrace
    assert counter.frame_count == 2  # one trace per batch size; no step-dependent integer reached the graph
    assert frozen_when_traced == [not cuda_graphs] * 2 and not torch._inductor.config.freezing  # only in the calls
    cache = compiled.new_cache(len(prompts), 40)
    compiled(torch.tensor([prompts[0]] * len(prompts)), past_key_values=cache)
    cache.reorder(torch.tensor([0, 0, 0]))  # beam search's reorder to another number of rows: new buffers
    buffers = cache.keys + cache.values
    assert all(any(buffer is m for m in marked) for buffer in buffers) == cuda_graphs


def test_a_copy_of_a_compiled_model_decodes_with_its_own_weights():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_model(initializer_range=0.3)
    compiled = compile_decoding(model, backend=CompileCounter())
    copied = copy.deepcopy(compiled)
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    compiled_tokens = generate(copied, [5, 17, 42], 20, do_sample=False)
    assert compiled_tokens == generate(copied.model, [5, 17, 42], 20, do_sample=False)
    assert compiled_tokens != generate(model, [5, 17, 42], 20, do_sample=False)
