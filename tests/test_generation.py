"""Decoding: the KV-cache loop against the plain loop without a cache and Hugging Face
generate, filters against Hugging Face's warpers, beam search against brute-force
enumeration."""

import itertools
import math

import pytest
import torch

import decoding
from decoding import (
    beam_search,
    filter_top_k,
    filter_top_p,
    generate,
    generate_without_cache,
    sample_from_logits,
    stream,
)
from hf_interop import to_hf_model
from test_transformer_model import SWITCHES, VOCAB, switch_ids, switched_model, tiny_model, tokenizer_of_size
from transformer_model import TransformerConfig, TransformerLM

EOS = 7


@pytest.fixture(scope="module")
def model():
    return tiny_model(window_size=6, position_embedding="rope", initializer_range=0.3)


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_of_size(VOCAB)


def argmax_without_cache(model, prompt, steps):
    """Brute force: the whole sequence through the model at every step, the largest logit kept."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
    return ids[len(prompt) :]


# -------------------------------------------------------------------------- greedy

@pytest.mark.parametrize("position_embedding, window", [("rope", 6), ("sinusoidal", None), ("alibi", 4), ("learned", None)])
def test_greedy_equals_an_argmax_loop_that_recomputes_everything(position_embedding, window):
    model = tiny_model(position_embedding=position_embedding, window_size=window, initializer_range=0.3)
    prompt = [5, 17, 42, 99, 3]
    expected = argmax_without_cache(model, prompt, 25)
    assert generate(model, prompt, 25, do_sample=False) == [expected]
    assert generate_without_cache(model, prompt, 25, temperature=0) == expected


@pytest.mark.parametrize("switches", SWITCHES, ids=switch_ids)
def test_with_each_switch_greedy_and_one_beam_equal_the_argmax_loop(switches):
    model = switched_model(position_embedding="rope", window_size=6, **switches)
    prompt = [5, 17, 42, 99, 3]
    expected = argmax_without_cache(model, prompt, 20)
    assert generate(model, prompt, 20, do_sample=False) == [expected]
    (tokens, _), = beam_search(model, prompt, num_beams=1, max_new_tokens=20)
    assert tokens == expected


@pytest.mark.parametrize("position_embedding, window", [("rope", 6), ("sinusoidal", None), ("alibi", 4), ("learned", None)])
@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_the_plain_loop_without_a_cache_samples_the_tokens_of_the_cache_loop(position_embedding, window, settings):
    model = tiny_model(position_embedding=position_embedding, window_size=window, initializer_range=0.3)
    prompt = [5, 17, 42, 99, 3]
    plain = generate_without_cache(model, prompt, 25, generator=torch.Generator().manual_seed(4), **settings)
    assert [plain] == generate(model, prompt, 25, generator=torch.Generator().manual_seed(4), **settings)
    assert len(set(plain)) > 1  # really sampled, not one token over and over


def test_the_plain_loop_stops_at_the_end_token_and_keeps_it(model):
    greedy = argmax_without_cache(model, [1, 2, 3], 12)
    eos = greedy[4]
    assert generate_without_cache(model, [1, 2, 3], 12, temperature=0, eos_token_id=eos) == greedy[: greedy.index(eos) + 1]


def test_zero_new_tokens_give_one_empty_list_per_prompt(model):
    assert generate(model, [[1, 2], [3]], 0) == [[], []]
    assert generate(model, [1, 2], 0) == [[]]


@pytest.mark.parametrize("temperature", [0, 1e-4, 1e-30])
def test_temperature_going_to_zero_is_greedy(model, temperature):
    prompt = [1, 2, 3]
    greedy = generate(model, prompt, 10, do_sample=False)
    assert generate(model, prompt, 10, temperature=temperature, seed=0) == greedy


def test_a_batch_of_different_lengths_equals_each_prompt_alone(model):
    prompts = [[5, 17, 42, 99, 3, 8, 9], [11], [250, 251, 252]]
    batch = generate(model, prompts, 12, do_sample=False)
    assert batch == [generate(model, p, 12, do_sample=False)[0] for p in prompts]
    sampled = generate(model, prompts, 12, seed=3)
    assert len(sampled) == 3 and all(len(row) == 12 for row in sampled)


def test_generation_stops_at_the_end_token_and_keeps_it(model):
    greedy = argmax_without_cache(model, [1, 2, 3], 12)
    eos = greedy[4]
    (out,) = generate(model, [1, 2, 3], 12, do_sample=False, eos_token_id=eos)
    assert out == greedy[: greedy.index(eos) + 1]
    (longer,) = generate(model, [1, 2, 3], 12, do_sample=False, eos_token_id=eos, min_new_tokens=8)
    assert len(longer) >= 8 and eos not in longer[:8]


def test_stop_strings_end_a_row_once_its_text_contains_them(model, tokenizer):
    (free,) = generate(model, [1, 2, 3], 30, do_sample=False)
    text = tokenizer.decode(free)
    stop = text[10:12]
    (stopped,) = generate(model, [1, 2, 3], 30, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    assert stop in tokenizer.decode(stopped) and stop not in tokenizer.decode(stopped[:-1])


def test_long_prompts_are_cut_from_the_left_without_a_window():
    model = tiny_model(max_position_embeddings=16)
    with pytest.warns(UserWarning, match="prompt cut to its last 12 tokens"):
        (out,) = generate(model, list(range(1, 31)), 4, do_sample=False)
    assert out == argmax_without_cache(model, list(range(19, 31)), 4)


def test_with_a_window_long_prompts_and_outputs_run_past_the_context():
    model = tiny_model(window_size=4, max_position_embeddings=16, position_embedding="alibi", initializer_range=0.3)
    prompt = list(range(1, 31))
    (out,) = generate(model, prompt, 10, do_sample=False)
    assert out == argmax_without_cache(model, prompt, 10)


# ------------------------------------------------------------------------ sampling

def test_sampling_with_a_seed_is_reproducible(model):
    a = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert a == generate(model, [1, 2, 3], 20, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert a != generate(model, [1, 2, 3], 20, temperature=1.0, top_k=50, top_p=0.9, seed=8)


def test_top_k_1_and_a_tiny_top_p_are_greedy(model):
    greedy = generate(model, [4, 5], 15, do_sample=False)
    assert generate(model, [4, 5], 15, top_k=1, seed=0) == greedy
    assert generate(model, [4, 5], 15, top_p=1e-6, seed=0) == greedy


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_filter_equals_hugging_face_ties_included(k):
    from transformers import TopKLogitsWarper

    logits = torch.randn(6, 50).round(decimals=1)  # rounding makes many ties
    torch.testing.assert_close(filter_top_k(logits, k), TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_top_p_filter_equals_hugging_face_ties_included(p):
    from transformers import TopPLogitsWarper

    logits = torch.randn(6, 50).round(decimals=1)
    torch.testing.assert_close(filter_top_p(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


def test_repetition_penalty_and_no_repeat_ngrams(model):
    (plain,) = generate(model, [9, 9, 9], 40, do_sample=False)
    (blocked,) = generate(model, [9, 9, 9], 40, do_sample=False, no_repeat_ngram_size=2)
    sequence = [9, 9, 9, *blocked]
    bigrams = list(itertools.pairwise(sequence))
    assert len(set(bigrams[2:])) == len(bigrams[2:])  # (the prompt itself repeats 9 9)
    (penalized,) = generate(model, [9, 9, 9], 40, do_sample=False, repetition_penalty=5.0)
    assert 9 not in penalized or len(set(penalized)) > len(set(plain))


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number > 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
])
def test_invalid_settings_are_refused(model, settings, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [1], **{"max_new_tokens": 3, **settings})


def test_an_empty_prompt_needs_a_start_token(model):
    with pytest.raises(ValueError, match="empty prompt needs a bos_token_id"):
        generate(model, [], 3)
    assert len(generate(model, [], 3, bos_token_id=EOS, do_sample=False)[0]) == 3


# ----------------------------------------------------------------------- streaming

def test_streamed_text_joins_to_the_generated_text(model, tokenizer):
    settings = dict(temperature=0.9, seed=11, eos_token_id=EOS)
    tokens = generate(model, [3, 4, 5], 60, **settings)[0]
    pieces = list(stream(model, tokenizer, [3, 4, 5], 60, **settings))
    expected = tokens[:-1] if tokens[-1] == EOS else tokens
    assert "".join(pieces) == tokenizer.decode(expected)


def test_streaming_holds_a_character_back_until_all_its_bytes_are_there(monkeypatch, tokenizer):
    tokens = tokenizer.encode("a 🙂 b")
    assert len(tokenizer.encode("🙂")) == 4  # one byte token each
    monkeypatch.setattr(decoding, "generate_steps", lambda *args, **kwargs: iter([[t] for t in tokens]))
    pieces = list(stream(None, tokenizer, [1], 10))
    assert "".join(pieces) == "a 🙂 b"
    assert "🙂" in pieces and not any("\ufffd" in piece for piece in pieces)


# --------------------------------------------------------------------- beam search

def test_one_beam_is_greedy(model):
    (tokens, _), = beam_search(model, [1, 2, 3], num_beams=1, max_new_tokens=12)
    assert tokens == generate(model, [1, 2, 3], 12, do_sample=False)[0]


def test_enough_beams_find_the_best_sequence_by_brute_force():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=16, window_size=None,
                                            dropout=0.0, initializer_range=1.0)).eval()
    prompt = [1, 2]

    def log_probability(sequence):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(sequence)])).logits[0].log_softmax(-1)
        return sum(logits[len(prompt) - 1 + i, token].item() for i, token in enumerate(sequence))

    scored = sorted(((log_probability(s), list(s)) for s in itertools.product(range(8), repeat=4)), reverse=True)
    results = beam_search(model, prompt, num_beams=8**3, max_new_tokens=4, length_penalty=0.0, num_return_sequences=3)
    assert [tokens for tokens, _ in results] == [tokens for _, tokens in scored[:3]]
    assert [score for _, score in results] == pytest.approx([score for score, _ in scored[:3]], abs=1e-4)


def test_beam_scores_are_length_normalised_log_probabilities(model):
    results = beam_search(model, [1, 2, 3], num_beams=4, max_new_tokens=6, num_return_sequences=4, length_penalty=1.0)
    assert len(results) == 4 and [s for _, s in results] == sorted((s for _, s in results), reverse=True)
    tokens, score = results[0]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, *tokens]])).logits[0].log_softmax(-1)
    total = sum(logits[2 + i, t].item() for i, t in enumerate(tokens))
    assert score == pytest.approx(total / len(tokens), abs=1e-4)


@pytest.mark.parametrize("settings, message", [
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences must be between 1 and num_beams"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number, not nan"),
])
def test_invalid_beam_settings_are_refused(model, settings, message):
    with pytest.raises(ValueError, match=message):
        beam_search(model, [1], max_new_tokens=3, **settings)


# -------------------------------------------------------- against Hugging Face GPT-2

@pytest.fixture(scope="module")
def gpt2_pair():
    pytest.importorskip("transformers")
    ours = tiny_model(position_embedding="learned", activation="gelu_tanh", initializer_range=0.3)
    return ours, to_hf_model(ours, eos_token_id=EOS)


def test_greedy_equals_hugging_face_generate(gpt2_pair):
    ours, hf = gpt2_pair
    prompt = [5, 17, 42, 99, 3]
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30, eos_token_id=EOS,
                           pad_token_id=EOS)[0, len(prompt) :].tolist()
    (tokens,) = generate(ours, prompt, 30, do_sample=False, eos_token_id=EOS)
    assert tokens == expected[: len(tokens)] and (len(tokens) == 30 or tokens[-1] == EOS)


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [(3, 1.0, False), (4, 0.5, True), (5, 2.0, "never")])
def test_beam_search_equals_hugging_face(gpt2_pair, num_beams, length_penalty, early_stopping):
    ours, hf = gpt2_pair
    prompt = [5, 17, 42, 99, 3]
    out = hf.generate(torch.tensor([prompt]), do_sample=False, num_beams=num_beams, max_new_tokens=12,
                      length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=num_beams,
                      eos_token_id=EOS, pad_token_id=EOS, output_scores=True, return_dict_in_generate=True)
    results = beam_search(ours, prompt, num_beams=num_beams, max_new_tokens=12, length_penalty=length_penalty,
                          early_stopping=early_stopping, num_return_sequences=num_beams, eos_token_id=EOS)
    for (tokens, score), sequence, hf_score in zip(results, out.sequences, out.sequences_scores, strict=True):
        hf_tokens = sequence[len(prompt) :].tolist()
        assert tokens == hf_tokens[: len(tokens)]
        assert all(t == EOS for t in hf_tokens[len(tokens) :])  # Hugging Face pads with eos
        assert math.isclose(score, hf_score.item(), abs_tol=1e-4)


def test_sampling_draws_each_token_with_its_probability():
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2]]))  # token 1 has probability 0
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_from_logits(logits.expand(1000, -1), generator) for _ in range(20)]).flatten()
    frequencies = torch.bincount(draws, minlength=4) / draws.numel()
    assert frequencies[1] == 0
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.01, rtol=0)
