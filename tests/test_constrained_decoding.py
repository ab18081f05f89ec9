"""Beam search with forced words: every answer holds every word, enough beams find the best
such sequence (checked by brute force), and words become the spellings they have in text."""

import itertools

import pytest
import torch

from decoding import beam_search, constrained_beam_search, split_words, word_constraints, word_spellings
from helpers import story_tokenizer
from test_transformer_model import VOCAB, tiny_model
from transformer_model import TransformerConfig, TransformerLM


def holds(tokens: list[int], spellings: list[list[int]]) -> bool:
    """Does the token list contain one of the spellings, as consecutive tokens?"""
    return any(tokens[i:i + len(s)] == s for s in spellings for i in range(len(tokens) - len(s) + 1))


@pytest.fixture(scope="module")
def model():  # ALiBi with a window: the searches are on the KV cache, whatever the positions
    return tiny_model(window_size=4, position_embedding="alibi", initializer_range=0.3)


@pytest.fixture(scope="module")
def tokenizer():
    return story_tokenizer(VOCAB)


def test_enough_beams_find_the_best_sequence_that_holds_the_words_by_brute_force():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=6, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=16, window_size=None,
                                            dropout=0.0, initializer_range=1.0)).eval()
    prompt, words = [1, 2], [[[3, 5]], [[4], [0, 1]]]  # the word "3 5", and "4" or "0 1"
    sequences = [list(s) for s in itertools.product(range(6), repeat=4) if all(holds(list(s), w) for w in words)]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + s for s in sequences])).logits.log_softmax(-1)  # (sequences, 6, 6)
    scores = [sum(logits[row, len(prompt) - 1 + i, t].item() for i, t in enumerate(s)) for row, s in enumerate(sequences)]
    best = sorted(zip(scores, sequences, strict=True), reverse=True)[:3]
    results = constrained_beam_search(model, prompt, words, num_beams=6**3, max_new_tokens=4, length_penalty=0.0,
                                      num_return_sequences=3)
    assert [tokens for tokens, _ in results] == [tokens for _, tokens in best]
    assert [score for _, score in results] == pytest.approx([score for score, _ in best], abs=1e-4)


@pytest.mark.parametrize("num_beams", [1, 2, 5])
@pytest.mark.parametrize("seed", range(4))
def test_every_answer_holds_every_word_even_when_the_model_would_not_write_them(model, num_beams, seed):
    generator = torch.Generator().manual_seed(seed)
    words = [[torch.randint(0, VOCAB, (length,), generator=generator).tolist() for length in (1, 3)]
             for _ in range(3)]  # three words, each with a one-token and a three-token spelling
    prompt = torch.randint(0, VOCAB, (5,), generator=generator).tolist()
    greedy, = beam_search(model, prompt, num_beams=1, max_new_tokens=12)
    results = constrained_beam_search(model, prompt, words, num_beams=num_beams, max_new_tokens=12,
                                      num_return_sequences=num_beams, eos_token_id=7)
    assert not all(holds(greedy[0], w) for w in words)  # left to itself, the model writes other things
    assert len(results) == num_beams  # each beam ends holding every word: those that could not were dropped
    for tokens, _ in results:
        assert all(holds(tokens, w) for w in words)
        assert 7 not in tokens[:-1] and len(tokens) <= 12


def test_the_shortest_spellings_must_fit_in_max_new_tokens_and_then_there_is_always_an_answer(model):
    words = [[[1, 2, 3]], [[4], [5, 6, 7]]]
    (tokens, _), = constrained_beam_search(model, [1], words, num_beams=2, max_new_tokens=4)
    assert sorted([tokens[:3], tokens[3:]]) == [[1, 2, 3], [4]] or sorted([tokens[:1], tokens[1:]]) == [[1, 2, 3], [4]]
    with pytest.raises(ValueError, match="shortest spellings take 4 tokens together, more than max_new_tokens 3"):
        constrained_beam_search(model, [1], words, num_beams=2, max_new_tokens=3)


@pytest.mark.parametrize("words, max_new_tokens", [
    ([[[1, 2, 3]], [[1, 9]]], 5),  # two words that start with the same token
    ([[[1, 2]], [[2, 3]], [[2]]], 5),  # words that could share tokens
    ([[[4, 5, 6], [7]], [[4, 8]]], 3),  # only the one-token spelling fits
])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_words_that_share_tokens_still_always_get_an_answer(model, words, max_new_tokens, num_beams):
    results = constrained_beam_search(model, [1, 2, 3], words, num_beams=num_beams, max_new_tokens=max_new_tokens)
    assert results and all(all(holds(tokens, w) for w in words) for tokens, _ in results)


def test_without_words_one_beam_is_greedy(model):
    assert constrained_beam_search(model, [1, 2, 3], [], num_beams=1, max_new_tokens=12)[0][0] == \
        beam_search(model, [1, 2, 3], num_beams=1, max_new_tokens=12)[0][0]


def test_scores_are_length_normalised_log_probabilities(model):
    (tokens, score), = constrained_beam_search(model, [1, 2, 3], [[[10, 11]]], num_beams=3, max_new_tokens=8)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, *tokens]])).logits[0].log_softmax(-1)
    assert score == pytest.approx(sum(logits[2 + i, t].item() for i, t in enumerate(tokens)) / len(tokens), abs=1e-4)


def test_words_to_force_are_read_as_a_user_lists_them():
    for typed in ("apple rocket blue", "apple, rocket, blue", " apple,rocket  and blue ", "apple, rocket And blue"):
        assert split_words(typed) == ["apple", "rocket", "blue"]
    assert split_words("") == [] and split_words(" , and ") == []


def test_a_word_is_spelled_after_a_space_as_written_and_capitalised(tokenizer):
    assert [tokenizer.decode(s) for s in word_spellings(tokenizer, "ball")] == [" ball", " Ball"]
    assert [tokenizer.decode(s) for s in word_spellings(tokenizer, "Tom")] == [" Tom"]


def test_forced_words_appear_in_the_decoded_text(model, tokenizer):
    words = ["bad", "jig", "head"]
    (tokens, _), = constrained_beam_search(model, tokenizer.encode("Once upon a time"),
                                           word_constraints(tokenizer, words), num_beams=3,
                                           max_new_tokens=30)
    text = tokenizer.decode(tokens)
    assert all(f" {w}" in text or f" {w.capitalize()}" in text for w in words)
