"""Decoding: turning a language model's next-token scores into text.

The file reads top to bottom:
1. sampling: what to do with the last position's logits. In the order Hugging Face applies
   them: repetition penalty, no-repeat n-grams, minimum length, then temperature, top-k,
   top-p (a sort, the textbook way), and a draw.
2. generate_without_cache: the plain loop, the one to read first. Every step runs the
   model over the whole sequence so far and keeps the last position's choice.
3. The same loop on a KV cache (generate_steps, generate, stream): the prompt goes through
   the model once, then each step feeds only the newest token. Prompts of different
   lengths decode together, left-padded.
4. beam_search, on the KV cache, with Hugging Face's stopping rules.
5. constrained_beam_search: beam search whose answers must hold given words
   (split_words reads them as typed, word_constraints turns each into the token sequences
   that spell it).

Every function takes a TransformerLM, or anything with its call and attributes (config,
new_cache: the LanguageModel protocol below), such as speedups.CompiledDecoding. speedups.filter_top_p_fast has the top-p
filter's API and is passed as generate(..., top_p_filter=...).
"""

from __future__ import annotations

import codecs
import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from bpe_tokenizer import BPETokenizer
from kv_cache import KVCache
from transformer_model import LMOutput, TransformerConfig

Prompts = list[int] | list[list[int]] | torch.Tensor  # one prompt, several, or a (batch, seq) tensor


class LanguageModel(Protocol):
    """What decoding needs of a model: TransformerLM's call, config and new_cache (and an
    nn.Module's parameters and train/eval), which speedups.CompiledDecoding has too."""

    config: TransformerConfig
    training: bool

    def __call__(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                 past_key_values: KVCache | None = None, use_cache: bool = False, output_attentions: bool = False,
                 attention_mask: torch.Tensor | None = None) -> LMOutput: ...

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def train(self, mode: bool = True) -> LanguageModel: ...

    def eval(self) -> LanguageModel: ...


# ------------------------------------------------------------------------- 1. sampling

# generate_tinystories_text.py's defaults for a story (exports record them as the model's own).
STORY_SAMPLING = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": 200}


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); -inf elsewhere."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (batch, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens whose probabilities add up to at
    least p (always at least one); -inf elsewhere.

    Sorted ascending, a token is dropped when the probability mass at or below it is at most
    1 - p. For probabilities [0.5, 0.3, 0.15, 0.05] and p = 0.9: ascending [0.05, 0.15, 0.3,
    0.5] has the mass at or below each [0.05, 0.2, 0.5, 1.0]; only 0.05 <= 0.1, so the
    0.05 token is dropped and the other three (0.95 >= 0.9) are kept."""
    if p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)  # (batch, vocab), order[i] = where ascending[i] came from
    mass_at_or_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = mass_at_or_below <= 1.0 - p
    drop[..., -1] = False  # the most probable token always stays
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # drop back in vocabulary order


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row, drawn with probability softmax(logits), by inverse transform
    sampling: the first token whose cumulative probability exceeds a uniform draw u.
    (batch, vocab) -> (batch,). Tokens at -inf have probability 0 and are never drawn.

    This is what torch.multinomial(logits.softmax(-1), 1) does, written out because on a CPU
    multinomial is much slower at this vocabulary size: 261 us against 31 us a draw at batch
    1, and 3.8 ms against 0.14 ms at batch 16 (10,000 logits; benchmarks/bench_sampling.py,
    results in benchmarks/RESULTS.md). The tests check the draws' frequencies."""
    cumulative = logits.softmax(dim=-1).cumsum(dim=-1)  # (batch, vocab)
    total = cumulative[:, -1:]
    below_total = torch.nextafter(total, torch.zeros_like(total))  # u stays strictly below the last step
    u = torch.rand(total.shape, generator=generator, device=logits.device, dtype=total.dtype) * below_total
    return torch.searchsorted(cumulative, u, right=True)[:, 0]


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None, top_p_filter: Callable = filter_top_p) -> torch.Tensor:
    """The next token of each row from its logits (batch, vocab): the largest when
    temperature is 0 (greedy), else a draw after temperature, top-k and top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shift the largest logit to 0 before dividing: a tiny temperature then sends the others
    # to -inf (greedy, in the limit) instead of the largest to +inf (NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    return sample_from_logits(top_p_filter(filter_top_k(logits, top_k), top_p), generator)


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: a token already in the sequence (seen, (batch, vocab)
    bool) has its logit divided by penalty if positive, multiplied if negative."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


class NgramBlocker:
    """Bans any token that would repeat an n-gram already in a row's sequence."""

    def __init__(self, n: int, rows: list[list[int]]):
        self.n = n
        self.rows = [list(row) for row in rows]
        # For each row: the (n-1)-token prefixes seen so far -> the tokens that followed them.
        self.followers: list[dict[tuple[int, ...], set[int]]] = [{} for _ in rows]
        for index, row in enumerate(self.rows):
            for end in range(n, len(row) + 1):
                self._remember(index, row[end - n : end])

    def _remember(self, index: int, ngram: list[int]) -> None:
        self.followers[index].setdefault(tuple(ngram[:-1]), set()).add(ngram[-1])

    def push(self, tokens: list[int]) -> None:
        """Append one new token to every row."""
        for index, token in enumerate(tokens):
            row = self.rows[index]
            row.append(token)
            if len(row) >= self.n:
                self._remember(index, row[-self.n :])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf for every token that would complete an n-gram seen before, in place."""
        for index, row in enumerate(self.rows):
            if len(row) >= self.n - 1:
                banned = self.followers[index].get(tuple(row[len(row) - self.n + 1 :]))
                if banned:
                    logits[index, list(banned)] = float("-inf")
        return logits


def check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    """Raise ValueError, with the rule, for a sampling setting outside its range (NaN and
    infinity included: every rule is written so that they fail it)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), not {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), not {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 turns it off), not {repetition_penalty}")


# ------------------------------------------------------------ 2. the plain loop, no cache

@torch.no_grad()
def generate_without_cache(model: LanguageModel, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                           top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                           generator: torch.Generator | None = None) -> list[int]:
    """The simplest decoding loop: at every step, run the model over the whole sequence so
    far and choose a next token from the last position's logits. Returns the new tokens
    (ending with eos_token_id if it came). Each step costs a whole forward, so the time
    grows with the square of the length; generate, on a KV cache, gives the same tokens
    (the same draws from the same generator) with one token's work per step."""
    check_sampling(temperature, top_k, top_p, 1.0)
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt], device=next(model.parameters()).device)  # (1, seq)
    try:
        for _ in range(max_new_tokens):
            logits = model(ids).logits  # (1, seq, vocab)
            token = next_tokens(logits[:, -1].float(), temperature, top_k, top_p, generator)  # (1,)
            ids = torch.cat((ids, token[:, None]), dim=1)  # (1, seq + 1)
            if eos_token_id is not None and token.item() == eos_token_id:
                break
    finally:
        model.train(was_training)
    return ids[0, len(prompt) :].tolist()


# ------------------------------------------------------------------- 3. on a KV cache

def _prompt_rows(prompts: Prompts) -> list:
    """One prompt (token ids), a list of them or a (batch, seq) tensor -> a list of prompts."""
    if torch.is_tensor(prompts):
        return prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not prompts or isinstance(prompts[0], int):
        return [prompts]  # one prompt (possibly empty)
    return list(prompts)


def _prompt_batch(model: LanguageModel, prompts: Prompts, bos_token_id: int | None,
                  max_new_tokens: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor | None]:
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
    device = next(model.parameters()).device
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=device)  # (batch, longest)
    if all(len(r) == longest for r in rows):
        return rows, ids, None
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)
    return rows, ids, mask


def _apply_logit_rules(logits: torch.Tensor, step: int, seen: torch.Tensor | None, blocker: NgramBlocker | None,
                  repetition_penalty: float, min_new_tokens: int, eos_token_id: int | None) -> torch.Tensor:
    """The rules that come before temperature: repetition penalty, n-gram ban, minimum length."""
    if seen is not None:
        logits = penalize_repetition(logits, seen, repetition_penalty)
    if blocker is not None:
        logits = blocker.apply(logits)
    if eos_token_id is not None and step < min_new_tokens:
        logits[:, eos_token_id] = float("-inf")
    return logits


@torch.no_grad()
def generate_steps(
    model: LanguageModel,
    prompts: Prompts,
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
    top_p_filter: Callable[[torch.Tensor, float], torch.Tensor] = filter_top_p,
) -> Iterator[list[int]]:
    """The decoding loop on a KV cache, one step at a time: yields a list with the next token
    of every row. It does not stop by itself before max_new_tokens; generate() and stream() do.
    prompts: token ids, a list of token-id lists (any lengths), or a (batch, seq) tensor."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    rows, ids, mask = _prompt_batch(model, prompts, bos_token_id, max_new_tokens)
    temperature = temperature if do_sample else 0.0  # temperature 0 is greedy
    if generator is None and seed is not None:
        generator = torch.Generator(ids.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        # The whole prompt in one forward; the cache keeps its keys and values.
        cache = model.new_cache(len(rows), ids.size(1) + max_new_tokens)
        logits = model(ids, past_key_values=cache, attention_mask=mask).logits[:, -1].float()  # (batch, vocab)
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            for index, row in enumerate(rows):
                seen[index, row] = True
        blocker = NgramBlocker(no_repeat_ngram_size, rows) if no_repeat_ngram_size > 0 else None
        for step in range(max_new_tokens):
            logits = _apply_logit_rules(logits, step, seen, blocker, repetition_penalty, min_new_tokens, eos_token_id)
            tokens = next_tokens(logits, temperature, top_k, top_p, generator, top_p_filter)  # (batch,)
            token_list = tokens.tolist()
            yield token_list
            if step + 1 == max_new_tokens:
                break
            if seen is not None:
                seen[torch.arange(len(rows)), tokens] = True
            if blocker is not None:
                blocker.push(token_list)
            # Only the new token goes through the model: (batch, 1) on the cache.
            logits = model(tokens[:, None], past_key_values=cache).logits[:, -1].float()
    finally:
        model.train(was_training)


def _ends_with_stop(tokenizer: BPETokenizer, tokens: list[int], stop_strings: list[str]) -> bool:
    # A stop string of n characters spans at most 4n tokens (4 UTF-8 bytes per character).
    tail = tokenizer.decode(tokens[-4 * max(map(len, stop_strings)) :])
    return any(stop in tail for stop in stop_strings)


def generate(model: LanguageModel, prompts: Prompts, max_new_tokens: int, stop_strings: list[str] | None = None,
             tokenizer: BPETokenizer | None = None, **settings) -> list[list[int]]:
    """Generate up to max_new_tokens after each prompt; returns each row's new tokens.

    A row stops at eos_token_id (kept as its last token) or when its text ends with one of
    stop_strings (which needs the tokenizer). Settings are those of generate_steps:
    do_sample (False: greedy; temperature 0 is greedy too), temperature, top_k, top_p,
    repetition_penalty, no_repeat_ngram_size, min_new_tokens, eos_token_id, bos_token_id
    (starts an empty prompt), seed or generator (reproducible sampling), top_p_filter.
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


def stream(model: LanguageModel, tokenizer: BPETokenizer, prompt: list[int], max_new_tokens: int,
           stop_strings: list[str] | None = None, **settings) -> Iterator[str]:
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


# ----------------------------------------------------------------------- 4. beam search

def check_length_penalty(length_penalty: float) -> None:
    """Raise ValueError for a length_penalty that is NaN or infinite (any finite one is a rule)."""
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, not {length_penalty}")


def _check_beam_settings(num_beams: int, num_return_sequences: int, early_stopping: bool | str,
                         length_penalty: float = 1.0) -> None:
    check_length_penalty(length_penalty)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, not {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be between 1 and num_beams ({num_beams}), not {num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f'early_stopping must be True, False or "never", not {early_stopping!r}')


def _search_is_over(best_running: float, finished: list[tuple[float, list[int]]], num_beams: int, length: int,
                    max_new_tokens: int, length_penalty: float, early_stopping: bool | str) -> bool:
    """Hugging Face's stopping rule, once num_beams hypotheses are finished: can the best
    running beam still beat the worst of them?"""
    if len(finished) < num_beams:
        return False
    if early_stopping is True:
        return True
    best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else length
    return best_running / best_length**length_penalty <= finished[-1][0]


def _one_prompt(model: LanguageModel, prompt: list[int] | torch.Tensor, bos_token_id: int | None,
                max_new_tokens: int, caller: str) -> torch.Tensor:
    """The one prompt a beam search takes, as a (1, seq) tensor (see _prompt_batch)."""
    rows, ids, _ = _prompt_batch(model, [prompt] if not torch.is_tensor(prompt) else prompt, bos_token_id, max_new_tokens)
    if len(rows) != 1:
        raise ValueError(f"{caller} takes one prompt")
    return ids


def _start_beams(model: LanguageModel, ids: torch.Tensor, num_beams: int,
                 max_new_tokens: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """The prompt through the model once, its cache copied to every beam. All beams start
    as the prompt, but only the first may be extended at the first step (the others score
    -1e9). Returns the cache, the logits (beams, vocab) and the scores (beams,)."""
    cache = model.new_cache(1, ids.size(1) + max_new_tokens)
    logits = model(ids, past_key_values=cache).logits[:, -1].float()  # (1, vocab)
    cache.reorder(torch.zeros(num_beams, dtype=torch.long, device=ids.device))
    scores = torch.full((num_beams,), -1e9, device=ids.device)
    scores[0] = 0.0
    return cache, logits.expand(num_beams, -1), scores


@torch.no_grad()
def beam_search(
    model: LanguageModel,
    prompt: list[int] | torch.Tensor,
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
    _check_beam_settings(num_beams, num_return_sequences, early_stopping, length_penalty)
    ids = _one_prompt(model, prompt, bos_token_id, max_new_tokens, "beam_search")
    was_training = model.training
    model.eval()
    try:
        cache, logits, scores = _start_beams(model, ids, num_beams, max_new_tokens)
        beams: list[list[int]] = [[] for _ in range(num_beams)]
        finished: list[tuple[float, list[int]]] = []
        vocab = logits.size(-1)
        keep = min(2 * num_beams, num_beams * vocab)
        for step in range(max_new_tokens):
            # Every (beam, token) continuation, by total log-probability: (beams * vocab,).
            totals = (logits.log_softmax(dim=-1) + scores[:, None]).view(-1)
            top_scores, top_index = totals.topk(keep)
            origins, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
            length = step + 1
            ends = [token == eos_token_id or length == max_new_tokens for token in tokens]
            finished += [(top_scores[rank].item() / length**length_penalty, beams[origins[rank]] + [tokens[rank]])
                         for rank in range(num_beams) if ends[rank]]
            finished = sorted(finished, key=lambda hyp: -hyp[0])[:num_beams]
            carry_on = [rank for rank in range(keep) if not ends[rank]][:num_beams]
            if not carry_on:
                break  # every continuation ended: max_new_tokens reached
            beams = [beams[origins[rank]] + [tokens[rank]] for rank in carry_on]
            scores = top_scores[carry_on]
            if _search_is_over(scores[0].item(), finished, num_beams, length, max_new_tokens, length_penalty,
                               early_stopping):
                break
            # The cache follows the beams that carry on; each feeds its new token.
            cache.reorder(torch.tensor([origins[rank] for rank in carry_on], device=ids.device))
            new_tokens = torch.tensor([[tokens[rank]] for rank in carry_on], device=ids.device)  # (beams, 1)
            logits = model(new_tokens, past_key_values=cache).logits[:, -1].float()
    finally:
        model.train(was_training)
    return [(tokens, score) for score, tokens in finished[:num_return_sequences]]


# --------------------------------------------------- 5. beam search with forced words
#
# Lexically constrained decoding (Hokamp & Liu 2017, "grid beam search"; Post & Vilar 2018,
# "dynamic beam allocation"; Hugging Face's force_words_ids). Each forced word is a
# Constraint: the token sequences that spell it, any one of which will do. A hypothesis
# carries which words it has written; one that could no longer write them all in the tokens
# left is dropped; beams are chosen from "banks" of equal progress in turn, so the most
# advanced hypothesis always gets a beam; and an answer only counts once every word is in it.

Constraint = list[list[int]]  # one word: its spellings, as token ids


def split_words(text: str) -> list[str]:
    """The words to force, as a user types them: "apple, rocket blue" and "apple, rocket and
    blue" -> ["apple", "rocket", "blue"]. An "and" between words joins them, as in a request,
    and is not a word to force."""
    return [word for word in re.split(r"[,\s]+", text) if word and word.lower() != "and"]


def word_spellings(tokenizer: BPETokenizer, word: str) -> Constraint:
    """The ways a word is spelled after a space, as written and capitalised: "apple" -> the
    ids of " apple" and " Apple". Byte-level BPE encodes a pre-token the same wherever it
    stands, so these are the word's ids wherever it follows a space, which is almost
    everywhere in a story (not after a quote or a newline). The ids are a prefix: " apple"
    followed by "s" is the text "apples"."""
    forms = dict.fromkeys([word, word[:1].upper() + word[1:]])  # dict: unique and in order
    return [tokenizer.encode(" " + form) for form in forms]


def word_constraints(tokenizer: BPETokenizer, words: list[str]) -> list[Constraint]:
    """The constraints that force these words: each word's spellings."""
    return [word_spellings(tokenizer, word) for word in words]


@dataclass
class _Hypothesis:
    tokens: list[int]  # the new tokens so far
    met: tuple[bool, ...]  # for each forced word: has a spelling of it been written?
    score: float  # total log-probability


def _extend(hyp: _Hypothesis, token: int, log_prob: float, constraints: list[Constraint]) -> _Hypothesis:
    """hyp plus one token: a word is met once one of its spellings ends at the new token."""
    tokens = [*hyp.tokens, token]
    met = tuple(done or any(tokens[-len(s):] == s for s in spellings) for done, spellings in zip(hyp.met, constraints, strict=True))
    return _Hypothesis(tokens, met, hyp.score + log_prob)


def _progress(hyp: _Hypothesis, constraints: list[Constraint]) -> tuple[tuple[int, int], int, set[int]]:
    """(bank, tokens to go, advancing tokens).
    - bank: (words met, tokens written of the best-begun unmet word);
    - tokens to go: the length of one way to finish: go on with the begun word that saves
      most, then write each other unmet word's shortest spelling. The tokens just written
      count for one word only, since words that share them cannot all use them;
    - advancing: the tokens that take an unmet word one token further (or start it). One of
      them always brings tokens to go down by one."""
    begun, shortest, saving, advancing = 0, 0, 0, set()
    for done, spellings in zip(hyp.met, constraints, strict=True):
        if done:
            continue
        # How many first tokens of each spelling the hypothesis ends with (0: none).
        written = [max((j for j in range(1, len(s)) if hyp.tokens[-j:] == s[:j]), default=0) for s in spellings]
        begun = max(begun, *written)
        fewest = min(map(len, spellings))
        shortest += fewest
        saving = max(saving, fewest - min(len(s) - w for s, w in zip(spellings, written, strict=True)))
        advancing.update(s[w] for s, w in zip(spellings, written, strict=True))
        advancing.update(s[0] for s in spellings)
    return (sum(hyp.met), begun), shortest - saving, advancing


def _candidates(beams: list[_Hypothesis], log_probs: torch.Tensor, num_beams: int,
                constraints: list[Constraint]) -> list[tuple[int, _Hypothesis]]:
    """(beam index, extended hypothesis) for the 2 * num_beams best continuations overall,
    plus each beam's own best one and its continuations that advance a forced word, however
    unlikely: every beam keeps a way on."""
    vocab = log_probs.size(-1)
    totals = log_probs + torch.tensor([hyp.score for hyp in beams], device=log_probs.device)[:, None]
    top = totals.view(-1).topk(min(2 * num_beams, totals.numel())).indices.tolist()
    pairs = dict.fromkeys((index // vocab, index % vocab) for index in top)
    for origin, (hyp, best) in enumerate(zip(beams, log_probs.argmax(dim=-1).tolist(), strict=True)):
        pairs.update(dict.fromkeys((origin, token) for token in [best, *sorted(_progress(hyp, constraints)[2])]))
    return [(origin, _extend(beams[origin], token, log_probs[origin, token].item(), constraints))
            for origin, token in pairs]


def _allocate(candidates: list[tuple[int, _Hypothesis]], num_beams: int,
              constraints: list[Constraint]) -> list[tuple[int, _Hypothesis]]:
    """num_beams candidates, taken in turn from each bank (most progress first), best score
    first within a bank: likely text and forced words both keep a share of the beams."""
    banks: dict[tuple[int, int], list] = {}
    for candidate in sorted(candidates, key=lambda c: -c[1].score):
        banks.setdefault(_progress(candidate[1], constraints)[0], []).append(candidate)
    queues = [banks[bank] for bank in sorted(banks, reverse=True)]
    chosen = []
    while len(chosen) < num_beams and any(queues):
        for queue in queues:
            if queue and len(chosen) < num_beams:
                chosen.append(queue.pop(0))
    return chosen


@torch.no_grad()
def constrained_beam_search(
    model: LanguageModel,
    prompt: list[int] | torch.Tensor,
    constraints: list[Constraint],
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
) -> list[tuple[list[int], float]]:
    """Beam search whose every answer holds each forced word; returns up to
    num_return_sequences best (new tokens, score), at least one, best first, scored as
    beam_search does.

    Each step extends the beams by their best tokens and by the tokens that advance an unmet
    word (_candidates). A continuation that could no longer write every word in the tokens
    left is dropped; _allocate shares the beams between banks of equal progress among the
    rest. A hypothesis that ends (eos_token_id, or max_new_tokens) is finished only if every
    word is met. A beam that can still make it always has a continuation that can (_progress),
    so from a start that fits (the words' shortest spellings together within max_new_tokens)
    the search always ends with an answer.
    """
    _check_beam_settings(num_beams, num_return_sequences, False, length_penalty)
    needed = sum(min(map(len, spellings)) for spellings in constraints)
    if needed > max_new_tokens:
        raise ValueError(f"the forced words' shortest spellings take {needed} tokens together, more than "
                         f"max_new_tokens {max_new_tokens}")
    ids = _one_prompt(model, prompt, bos_token_id, max_new_tokens, "constrained_beam_search")
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(1, ids.size(1) + max_new_tokens)
        logits = model(ids, past_key_values=cache).logits[:, -1].float()  # (1, vocab)
        beams = [_Hypothesis([], (False,) * len(constraints), 0.0)]
        finished: list[tuple[float, list[int]]] = []
        for step in range(max_new_tokens):
            length = step + 1
            running = []
            for origin, hyp in _candidates(beams, logits.log_softmax(dim=-1), num_beams, constraints):
                if hyp.tokens[-1] != eos_token_id and length < max_new_tokens:
                    if _progress(hyp, constraints)[1] <= max_new_tokens - length:  # it can still make it
                        running.append((origin, hyp))
                elif all(hyp.met):
                    finished.append((hyp.score / length**length_penalty, hyp.tokens))
            finished = sorted(finished, key=lambda done: -done[0])[:num_beams]
            chosen = _allocate(running, num_beams, constraints)
            best_running = max((hyp.score for _, hyp in chosen), default=None)
            if best_running is None or _search_is_over(best_running, finished, num_beams, length, max_new_tokens,
                                                       length_penalty, False):
                break
            # The cache follows the chosen beams; each feeds its new token.
            cache.reorder(torch.tensor([origin for origin, _ in chosen], device=ids.device))
            beams = [hyp for _, hyp in chosen]
            new_tokens = torch.tensor([[hyp.tokens[-1]] for hyp in beams], device=ids.device)  # (beams, 1)
            logits = model(new_tokens, past_key_values=cache).logits[:, -1].float()
    finally:
        model.train(was_training)
    return [(tokens, score) for score, tokens in finished[:num_return_sequences]]
