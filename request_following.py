"""Does a chat model do what it is asked? Request-following, measured per request type.

    from request_following import follow_rates
    rates = follow_rates(model, tokenizer, validation_stories, per_kind=100)
    rates["name"]  # {"requests": 100, "followed": 0.89, "control": 0.22}
    rates["words"]["uses per word"]  # and rates["words"]["uses per word in the story"]

The requests are made from held-out stories by chat_data.REQUEST_MAKERS, the makers
training uses. The model replies through the chat template at the REPL's default sampling
(CHAT_SAMPLING), and one check per type (CHECKS) says whether a reply did what was asked:
- words: the reply holds all three requested words, as words, in any case;
- name: the requested name is a character of the reply: it appears at least twice;
- continuation: the reply keeps every character named in the opening and does not start a
  new story ("Once upon a time").
Each rate comes with its control: the same check of the same reply against the content of
another request of its type, which is what a model that ignores requests scores (a story
often holds "Lily" or "happy" anyway). Words requests are also asked how often a reply uses
each word it holds, beside how often the story the request was made from uses it: a model
that makes every noun "rain" follows the request but overuses it. Each type is also asked as
the second request of a conversation ("words, 2nd turn"), after the model's own reply to a
plain first request.
words_line_rates asks for the words without the chat, in front of a story ("Words: a, b,
c\nStory:"), as a base model pretrained with --words_lines has seen them.

The file reads top to bottom: the checks, the tests (request_tests), the replies, the rates
(follow_rates, words_line_rates, follow_score).
"""

from __future__ import annotations

import dataclasses
import random

import regex

from bpe_tokenizer import ENDOFTEXT, BPETokenizer
from chat_data import PLAIN_PHRASINGS, REQUEST_MAKERS, Request
from decoding import LanguageModel, generate
from tinystories_data import words_line

# The chat REPL's default sampling (chat_with_tinystories_model.py takes its defaults from here).
CHAT_SAMPLING = {"temperature": 0.7, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.0}
CHAT_MAX_NEW_TOKENS = 300


# ------------------------------------------------------------------------- the checks

def _count(word: str, text: str, ignore_case: bool = False) -> int:
    """How often word occurs in text as a whole word."""
    return len(regex.findall(rf"\b{regex.escape(word)}\b", text, flags=regex.IGNORECASE if ignore_case else 0))


def holds_words(reply: str, words: list[str]) -> bool:
    """Every requested word is in the reply, as a word ("cat" is not in "catch"), in any case."""
    return all(_count(word, reply, ignore_case=True) for word in words)


def names_character(reply: str, names: list[str]) -> bool:
    """The requested name is a character: it appears at least twice."""
    return all(_count(name, reply) >= 2 for name in names)


def continues_opening(reply: str, characters: list[str]) -> bool:
    """The reply carries on the opening: it keeps the opening's characters and does not
    start again with "Once upon a time"."""
    restarts = reply.lstrip().lower().startswith("once upon a time")
    return not restarts and all(_count(name, reply) for name in characters)


CHECKS = {"words": holds_words, "name": names_character, "continuation": continues_opening}


# -------------------------------------------------------------------------- the tests

@dataclasses.dataclass
class RequestTest:
    request: Request
    control: list[str]  # the content of another request of the same kind
    second_turn: bool  # asked after a plain first request and the model's reply to it

    @property
    def label(self) -> str:
        return self.request.kind + (", 2nd turn" if self.second_turn else "")


def request_tests(stories: list[str], per_kind: int = 100, seed: int = 0) -> list[RequestTest]:
    """per_kind requests of each kind as a first turn and per_kind more as a second turn
    (fewer if the stories run out), each from its own story, with a checkable content
    (a continuation needs a named character in its opening). Seeded."""
    rng = random.Random(seed)
    order = rng.sample(range(len(stories)), len(stories))
    tests = []
    for make in REQUEST_MAKERS.values():
        made = []
        for index in order:
            request = make(stories[index], rng)
            if request is not None and request.content:
                made.append(request)
            if len(made) == 2 * per_kind:
                break
        half = (len(made) + 1) // 2
        for index, request in enumerate(made):
            control = made[(index + 1) % len(made)].content
            tests.append(RequestTest(request, control, second_turn=index >= half))
    return tests


# ------------------------------------------------------------------------ the replies

def sample_continuations(model: LanguageModel, tokenizer: BPETokenizer, prompts: list[list[int]],
                         max_new_tokens: int = CHAT_MAX_NEW_TOKENS, sampling: dict | None = None, seed: int = 0,
                         batch_size: int = 16) -> list[str]:
    """Each prompt's continuation as text, sampled in batches; seeded."""
    eos = tokenizer.special_tokens[ENDOFTEXT]
    texts = []
    for start in range(0, len(prompts), batch_size):
        rows = generate(model, prompts[start:start + batch_size], max_new_tokens, eos_token_id=eos, seed=seed + start,
                        **(CHAT_SAMPLING if sampling is None else sampling))
        texts += [tokenizer.decode(t for t in row if t != eos) for row in rows]
    return texts


def sample_replies(model: LanguageModel, tokenizer: BPETokenizer, conversations: list[list[dict]],
                   max_new_tokens: int = CHAT_MAX_NEW_TOKENS, sampling: dict | None = None, seed: int = 0,
                   batch_size: int = 16) -> list[str]:
    """The model's reply to each conversation (which ends with a user turn), through the chat
    template; seeded."""
    prompts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    return sample_continuations(model, tokenizer, prompts, max_new_tokens, sampling, seed, batch_size)


def run_request_tests(model: LanguageModel, tokenizer: BPETokenizer, tests: list[RequestTest],
                      max_new_tokens: int = CHAT_MAX_NEW_TOKENS, sampling: dict | None = None, seed: int = 0,
                      batch_size: int = 16) -> list[list[dict]]:
    """Each test's whole conversation, ending with the model's reply to its request. A
    second-turn test first gets the model's own reply to a plain request."""
    def ask(conversations: list[list[dict]], seed: int) -> list[list[dict]]:
        replies = sample_replies(model, tokenizer, conversations, max_new_tokens, sampling, seed, batch_size)
        return [[*messages, {"role": "assistant", "content": reply}]
                for messages, reply in zip(conversations, replies, strict=True)]

    rng = random.Random(seed)
    first_turns = iter(ask([[{"role": "user", "content": rng.choice(PLAIN_PHRASINGS)}]
                            for test in tests if test.second_turn], seed + 1_000_000))
    conversations = [[*(next(first_turns) if test.second_turn else []), {"role": "user", "content": test.request.text}]
                     for test in tests]
    return ask(conversations, seed)


# -------------------------------------------------------------------------- the rates

def words_share(reply: str, words: list[str]) -> float:
    """The share of the requested words that the reply holds (holds_words asks for all)."""
    return sum(bool(_count(word, reply, ignore_case=True)) for word in words) / len(words)


def uses_per_word(text: str, words: list[str]) -> float | None:
    """How often the text uses each requested word it holds, on average; None if it holds
    none. A story that makes every noun "rain" scores high: compared with the story the
    request was made from, it shows whether a model overuses what it is asked for.

        uses_per_word("The kite flew. Tom held the kite.", ["kite", "tree"]) == 2.0
    """
    counts = [count for word in words if (count := _count(word, text, ignore_case=True))]
    return sum(counts) / len(counts) if counts else None


def _reply_measures(test: RequestTest, reply: str) -> dict[str, float | None]:
    """What summarize averages for one reply: its check for the request and for the control,
    and, for words requests, the share of the words it holds (and of the control's) and the
    uses of each word it holds (and in the story the request was made from)."""
    check = CHECKS[test.request.kind]
    measures = {"followed": check(reply, test.request.content), "control": check(reply, test.control)}
    if test.request.kind == "words":
        measures |= {"each word": words_share(reply, test.request.content),
                     "each word control": words_share(reply, test.control),
                     "uses per word": uses_per_word(reply, test.request.content),
                     "uses per word in the story": uses_per_word(test.request.reply, test.request.content)}
    return measures


def summarize(tests: list[RequestTest], conversations: list[list[dict]]) -> dict[str, dict]:
    """{label: {"requests", "followed", "control"}}: the share of replies that pass their
    request's check, and the share that pass it for another request's content. Words requests
    also get "each word" and "each word control": the mean share of the words a reply holds
    (words_share), which moves before all three words do; and "uses per word" (over the
    replies that hold a word) beside "uses per word in the story" (uses_per_word)."""
    samples: dict[str, dict[str, list[float]]] = {}
    for test, messages in zip(tests, conversations, strict=True):
        entry = samples.setdefault(test.label, {})
        for key, value in _reply_measures(test, messages[-1]["content"]).items():
            if value is not None:
                entry.setdefault(key, []).append(float(value))
    return {label: {"requests": len(entry["followed"]), **{key: sum(v) / len(v) for key, v in entry.items()}}
            for label, entry in samples.items()}


def follow_rates(model: LanguageModel, tokenizer: BPETokenizer, stories: list[str], per_kind: int = 100,
                 seed: int = 0, max_new_tokens: int = CHAT_MAX_NEW_TOKENS, sampling: dict | None = None,
                 batch_size: int = 16) -> dict[str, dict]:
    """Request-following per request type on requests made from stories (held-out ones):
    request_tests, run_request_tests, summarize."""
    tests = request_tests(stories, per_kind, seed)
    return summarize(tests, run_request_tests(model, tokenizer, tests, max_new_tokens, sampling, seed, batch_size))


def words_line_rates(model: LanguageModel, tokenizer: BPETokenizer, stories: list[str], count: int = 100,
                     seed: int = 0, max_new_tokens: int = CHAT_MAX_NEW_TOKENS, sampling: dict | None = None,
                     batch_size: int = 16) -> dict[str, dict]:
    """The words request asked without the chat: {"words line": {"requests", "followed",
    "control"}} for stories prompted with a words line ("Words: a, b, c\nStory:",
    tinystories_data.words_line), the metadata that train_tinystories_model.py --words_lines
    puts in front of training stories. The words are those of the first-turn word tests."""
    tests = [test for test in request_tests(stories, count, seed) if test.label == "words"]
    prompts = [tokenizer.encode(words_line(test.request.content), allowed_special="none") for test in tests]
    written = sample_continuations(model, tokenizer, prompts, max_new_tokens, sampling, seed, batch_size)
    rates = summarize(tests, [[{"role": "assistant", "content": story}] for story in written])
    return {"words line": rates["words"]} if rates else {}


def follow_score(rates: dict[str, dict]) -> float:
    """One number to choose checkpoints by: the mean followed share over all request types,
    where words requests count the share of each word they use ("each word"): on the few
    requests of a selection set, all three words moves in coarse steps, and long after the
    words begin to be read."""
    if not rates:
        raise ValueError("no requests to score: the stories gave none (too few, or too short)")
    return sum(entry.get("each word", entry["followed"]) for entry in rates.values()) / len(rates)
