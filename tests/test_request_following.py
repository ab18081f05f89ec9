"""Request-following: what each check accepts, how the held-out requests and their controls
are made, and the rates: stories follow their own requests, a reply meant for another
request passes only its control."""

import random

import pytest

import request_following
from helpers import story_tokenizer
from request_following import (
    CHECKS,
    continues_opening,
    follow_rates,
    follow_score,
    holds_words,
    names_character,
    request_tests,
    run_request_tests,
    summarize,
    uses_per_word,
    words_line_rates,
    words_share,
)
from test_transformer_model import tiny_model


def made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))


def distinct_story(rng: random.Random) -> str:
    """A story whose name and three content words no other story has (the other words are
    short or common), so a reply meant for one request cannot follow another by chance."""
    name, a, b, c = made_up_word(rng).capitalize(), made_up_word(rng), made_up_word(rng), made_up_word(rng)
    return (f"Once upon a time, {name} had a {a}. {name} saw a {b} and a {c}. The {a} was red. "
            f"{name} was sad. Then {name} ran to the {b}. It was fun.")


@pytest.fixture(scope="module")
def stories():
    rng = random.Random(5)
    return [distinct_story(rng) for _ in range(40)]


def test_words_are_held_as_whole_words_in_any_case():
    assert holds_words("The Cat saw a red ball.", ["cat", "red", "ball"])
    assert not holds_words("The cat could catch a ball.", ["catch", "red", "ball"])
    assert not holds_words("Tom liked to catch things.", ["cat"])


def test_a_name_is_a_character_only_when_it_appears_twice():
    assert names_character("Mia ran. Then Mia sat.", ["Mia"])
    assert not names_character("Mia ran home.", ["Mia"])
    assert not names_character("Miami is big. Miami is far.", ["Mia"])


def test_a_continuation_keeps_the_openings_characters_and_does_not_start_again():
    assert continues_opening("Tom ran after the ball and Sue laughed.", ["Tom", "Sue"])
    assert not continues_opening("Tom ran after the ball.", ["Tom", "Sue"])
    assert not continues_opening("  Once upon a time, Tom and Sue had a ball.", ["Tom", "Sue"])


def test_requests_come_from_the_stories_half_as_second_turns_with_anothers_content_as_control(stories):
    tests = request_tests(stories, per_kind=10, seed=0)
    labels = [test.label for test in tests]
    for kind in CHECKS:
        assert labels.count(kind) == 10 and labels.count(f"{kind}, 2nd turn") == 10
    for test in tests:
        assert test.request.content and any(test.request.reply in s for s in stories)
        assert test.control in [other.request.content for other in tests if other.request.kind == test.request.kind]
        assert test.control is not test.request.content
    assert request_tests(stories, per_kind=10, seed=0) == tests  # seeded
    assert len(request_tests(stories[:3], per_kind=10)) == 3 * 3  # fewer when the stories run out


def test_stories_follow_their_own_requests_and_a_reply_meant_for_another_passes_only_its_control(stories):
    tests = request_tests(stories, per_kind=10, seed=1)

    def conversations(replies):
        return [[{"role": "user", "content": t.request.text}, {"role": "assistant", "content": r}]
                for t, r in zip(tests, replies, strict=True)]

    own = summarize(tests, conversations([t.request.reply for t in tests]))
    assert {label: rate["followed"] for label, rate in own.items()} == {label: 1.0 for label in own}
    assert follow_score(own) == 1.0
    # Each reply answers the request whose content is this request's control instead.
    by_content = {id(t.request.content): t.request.reply for t in tests}
    swapped = summarize(tests, conversations([by_content[id(t.control)] for t in tests]))
    for label in swapped:
        assert swapped[label]["control"] == 1.0 and swapped[label]["followed"] == 0.0
    assert own["words"]["each word"] == 1.0 and swapped["words"]["each word control"] == 1.0
    assert "each word" not in own["name"]


def test_each_word_counts_the_share_of_the_requested_words_a_reply_holds():
    assert words_share("The Kite flew over the tree.", ["kite", "tree", "apple"]) == 2 / 3
    assert words_share("A kitten.", ["kite"]) == 0.0  # as words only


def test_uses_per_word_is_how_often_a_text_uses_each_requested_word_it_holds():
    assert uses_per_word("The kite flew. Tom held the Kite near a tree.", ["kite", "tree", "apple"]) == 1.5
    assert uses_per_word("Rain, rain and more rain.", ["rain"]) == 3.0
    assert uses_per_word("A kitten.", ["kite"]) is None  # holds none: no figure


def test_overused_words_show_against_the_story_the_request_was_made_from(stories):
    tests = [test for test in request_tests(stories, per_kind=10, seed=1) if test.label == "words"]

    def rates(replies):
        return summarize(tests, [[{"role": "assistant", "content": reply}] for reply in replies])["words"]

    own = rates([test.request.reply for test in tests])
    assert own["uses per word"] == own["uses per word in the story"] >= 1.0
    overused = rates([" ".join(test.request.content * 5) for test in tests])
    assert overused["followed"] == 1.0 and overused["uses per word"] == 5.0
    assert "uses per word" not in rates(["Nothing asked for." for _ in tests])  # no reply holds a word


def test_the_score_is_the_mean_followed_share_with_each_word_standing_for_words_requests():
    rates = {"words": {"requests": 10, "followed": 0.1, "control": 0.0, "each word": 0.7, "each word control": 0.2},
             "name": {"requests": 10, "followed": 0.8, "control": 0.3},
             "continuation": {"requests": 10, "followed": 0.9, "control": 0.2}}
    assert follow_score(rates) == pytest.approx((0.7 + 0.8 + 0.9) / 3)


def test_stories_that_give_no_requests_cannot_be_scored():
    with pytest.raises(ValueError, match="no requests to score"):
        follow_score({})


def test_a_second_turn_comes_after_the_models_own_reply_to_a_plain_request(stories):
    tokenizer = story_tokenizer(320)
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=256, initializer_range=0.3)
    tests = request_tests(stories, per_kind=2, seed=0)
    conversations = run_request_tests(model, tokenizer, tests, max_new_tokens=8, seed=0, batch_size=5)
    for test, messages in zip(tests, conversations, strict=True):
        roles = [m["role"] for m in messages]
        assert roles == (["user", "assistant"] * (2 if test.second_turn else 1))
        assert messages[-2]["content"] == test.request.text
    assert run_request_tests(model, tokenizer, tests, max_new_tokens=8, seed=0, batch_size=5) == conversations
    rates = follow_rates(model, tokenizer, stories, per_kind=2, max_new_tokens=8)
    assert set(rates) == {test.label for test in tests}
    assert all(0 <= rate["followed"] <= 1 and 0 <= rate["control"] <= 1 for rate in rates.values())


def test_a_words_line_names_the_requested_words_and_is_scored_like_a_words_request(stories, monkeypatch):
    tokenizer, prompted = story_tokenizer(320), []

    def write_with_the_words(model, tokenizer, prompts, *args):
        texts = [tokenizer.decode(prompt) for prompt in prompts]
        prompted.extend(texts)
        return [" Once upon a time, there was a " + " and a ".join(text.splitlines()[0][len("Words: "):].split(", "))
                for text in texts]

    monkeypatch.setattr(request_following, "sample_continuations", write_with_the_words)
    requests = [test.request for test in request_tests(stories, 10, seed=1) if test.label == "words"]
    in_stories = sum(uses_per_word(request.reply, request.content) for request in requests) / len(requests)
    assert words_line_rates(None, tokenizer, stories, count=10, seed=1) == {
        "words line": {"requests": 10, "followed": 1.0, "control": 0.0, "each word": 1.0, "each word control": 0.0,
                       "uses per word": 1.0, "uses per word in the story": pytest.approx(in_stories)}}
    assert prompted == [f"Words: {', '.join(request.content)}\nStory:" for request in requests]
