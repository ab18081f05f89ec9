"""Byte-level BPE tokenizer, written from scratch (the scheme of GPT-2).

Three ideas make the whole tokenizer:

1. Bytes. Text is UTF-8 encoded and every byte starts as its own token, so the base
   vocabulary is the 256 byte values. Nothing is ever out of vocabulary: a word never seen
   in training, an emoji or a stray control character falls back to (possibly several)
   byte tokens.
2. Pre-tokenization. A regular expression first splits text into chunks: a word with its
   leading space, a run of digits, a run of punctuation, whitespace. Merges never cross a
   chunk boundary, so " dog" is learned once and reused in " dog." and " dogs".
3. Merges. Training repeatedly takes the most frequent adjacent pair of tokens, over all
   chunks of the corpus, and makes it a new token. Encoding replays those merges on each
   chunk, earliest-learned first.

Special tokens (``<|endoftext|>``, the chat roles) are cut out of the text before step 2:
they map straight to their own id and never take part in merges.

The file, top to bottom:

- constants: GPT-2's split pattern and the patterns a tokenizer may use (KNOWN_SPLIT_PATTERNS),
  their ASCII twins for Python's faster `re` (ASCII_SPLIT_PATTERNS), the special tokens, the
  file format, size limits;
- helpers: GPT-2's byte <-> printable character map (bytes_to_unicode, bytes_to_text,
  text_to_bytes), merge_pair (one merge applied to a list of ids), the special-token regex,
  the cache of encoded pre-tokens, check_split_pattern, and pre_tokenizer (the split itself);
- reading files (writes go through common.write_atomically); worker processes, for counting
  and encoding on all cores, are tokenizer_workers.py's;
- training, the functions BPETokenizer.train calls: count_pre_tokens (the one pass over
  the text, streamed in batches on all cores), then two trainers side by side that learn the same
  merges: learn_merges_simple, the plain one that recounts every pair at every step (read it
  first), and learn_merges, the incremental one that train uses, with its helpers;
- BPETokenizer: basic facts, encoding (encode, encode_batch, encode_iterable; whole corpora
  into flat uint16 arrays are tokenizer_workers.encode_arrays), the chat
  template, decoding, train, and persistence (its own JSON file). GPT-2's files and Hugging
  Face's tokenizer.json are read and written by hf_interop.py.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache, partial
from itertools import chain, pairwise
from pathlib import Path

import regex
from tqdm.auto import tqdm

from common import write_atomically
from tokenizer_workers import batched_texts, encode_in_worker, map_batches, pool

# GPT-2's pre-tokenizer: English contractions, letters with an optional leading space,
# digits with an optional leading space, other symbols with an optional leading space,
# whitespace not followed by a non-space (so a space is left to start the next word),
# and any other whitespace.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The split patterns a tokenizer may use. A tokenizer file's pattern runs on every text encoded,
# and a crafted one (say `(a|aa)+b|.`) backtracks for hours on a short prompt, so any other is
# refused, in a file or in code. Researchers with a pattern of their own add it here.
KNOWN_SPLIT_PATTERNS = {"GPT-2": GPT2_SPLIT_PATTERN}

# The same split for text that is all ASCII, written for Python's own `re`, which runs it
# about twice as fast as `regex` runs the Unicode pattern (\p{L} is [A-Za-z] there, \p{N}
# [0-9], and both modules' \s is [ \t\n\v\f\r]). Nearly every TinyStories story is ASCII,
# so this halves the time to count or encode a corpus; the tests check both give the same
# chunks on every ASCII string.
ASCII_SPLIT_PATTERNS = {
    GPT2_SPLIT_PATTERN: r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""",
}

ENDOFTEXT = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = [ENDOFTEXT, "<user>", "<assistant>", "<system>"]
CHAT_ROLES = ("system", "user", "assistant")

FILE_FORMAT = "tinystories-transformer/bpe-tokenizer"
FILE_VERSION = 1

# encode_batch starts processes for texts of more than this many characters in all.
PARALLEL_MIN_CHARS = 4_000_000
# Pre-token cache entries kept before the cache is cleared, so memory stays bounded.
CACHE_MAX_ENTRIES = 500_000
# encode_iterable encodes its input in blocks of about this many characters.
STREAM_BLOCK_CHARS = 1 << 16


class TokenizerFileError(ValueError):
    """A tokenizer file that is missing, truncated, or not a tokenizer file."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    The 188 printable Latin-1 bytes map to themselves; the other 68 (control characters,
    space, non-breaking space, soft hyphen) map to chr(256), chr(257), ... in byte order.
    vocab.json, merges.txt and Hugging Face's tokenizer.json all write byte strings this
    way, which is why b" the" appears there as "Ġthe".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of bytes_to_unicode."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


def bytes_to_text(token: bytes) -> str:
    """b" the" -> "Ġthe" (see bytes_to_unicode)."""
    table = bytes_to_unicode()
    return "".join(table[byte] for byte in token)


def text_to_bytes(token: str) -> bytes:
    """"Ġthe" -> b" the"; the inverse of bytes_to_text."""
    table = unicode_to_bytes()
    try:
        return bytes(table[char] for char in token)
    except KeyError as err:
        raise ValueError(f"{token!r} is not a byte-level token string (character {err.args[0]!r})") from None


def merge_pair(ids: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every occurrence of the pair (a, b) in ids by new_id, left to right."""
    if a not in ids:  # cheap test that skips most words
        return ids
    merged = []
    i, n = 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


@lru_cache(maxsize=64)
def _special_regex(specials: frozenset[str], capture: bool) -> regex.Pattern | None:
    """One alternation of the special tokens, longest first, so that when one is a prefix
    of another ("<a>" and "<a>b") the longer wins. None when there are none."""
    if not specials:
        return None
    body = "|".join(regex.escape(s) for s in sorted(specials, key=lambda s: (-len(s), s)))
    return regex.compile(f"({body})" if capture else body)


class _ChunkCache(dict):
    """Pre-token text -> token ids. A hit is one C-level dict lookup; a miss (dict calls
    __missing__) runs the merges once. Cleared when full so memory stays bounded."""

    def __init__(self, encode_chunk):
        super().__init__()
        self.encode_chunk = encode_chunk

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        if len(self) >= CACHE_MAX_ENTRIES:
            self.clear()
        ids = self[chunk] = tuple(self.encode_chunk(chunk))
        return ids


def check_split_pattern(pattern: str) -> None:
    """A ValueError unless pattern is one of KNOWN_SPLIT_PATTERNS."""
    if pattern not in KNOWN_SPLIT_PATTERNS.values():
        raise ValueError(f"the split pattern is not one of KNOWN_SPLIT_PATTERNS ({', '.join(KNOWN_SPLIT_PATTERNS)}): "
                         "refused, since a crafted pattern can hang the program; add your own to bpe_tokenizer.py "
                         "to use it")


@lru_cache(maxsize=8)
def pre_tokenizer(pattern: str) -> Callable[[str], list[str]]:
    """The split of text into pre-tokens (chunks) by pattern: findall of the pattern, or of
    its ASCII twin (ASCII_SPLIT_PATTERNS) when the text is all ASCII. Both give the same chunks.

        >>> pre_tokenizer(GPT2_SPLIT_PATTERN)("Tom's dog ran.  Fast!")
        ['Tom', "'s", ' dog', ' ran', '.', ' ', ' Fast', '!']
    """
    findall = regex.compile(pattern).findall
    if pattern not in ASCII_SPLIT_PATTERNS:
        return findall
    ascii_findall = re.compile(ASCII_SPLIT_PATTERNS[pattern], re.ASCII).findall
    return lambda text: ascii_findall(text) if text.isascii() else findall(text)


# ------------------------------------------------------------------- reading files

def read_text_file(path: str | os.PathLike) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise TokenizerFileError(f"{path}: not a readable text file ({err})") from None


# ------------------------------------------------------------------------ training

def _progress(iterable, show: bool | None, **kwargs) -> tqdm:
    """A tqdm bar: always (True), never (False), or once it has run a second (None)."""
    return tqdm(iterable, disable=show is False, delay=1.0 if show is None else 0.0, **kwargs)


def _count_batch(texts: list[str], pattern: str, special_tokens: Sequence[str]) -> Counter:
    """Pre-token counts of some texts, with special-token text cut out first."""
    findall = pre_tokenizer(pattern)
    special_regex = _special_regex(frozenset(special_tokens), capture=False)
    counts: Counter = Counter()
    for text in texts:
        for part in special_regex.split(text) if special_regex else (text,):
            counts.update(findall(part))
    return counts


def count_pre_tokens(
    texts: Iterable[str],
    pattern: str = GPT2_SPLIT_PATTERN,
    special_tokens: Sequence[str] = (),
    num_workers: int | None = None,
) -> Counter:
    """How often each pre-token occurs in the corpus: the only pass over the raw text.

    texts may be a stream (a generator reading a file): it is read in batches of BATCH_CHARS
    characters, counted on num_workers processes (default: all cores; one batch is counted
    here), and the counts summed, so memory holds a few batches and the counts, never the corpus.
    (To watch it, pass texts through a progress bar: tinystories_data.with_progress.)"""
    count = partial(_count_batch, pattern=pattern, special_tokens=list(special_tokens))
    counts = Counter()
    for batch_counts in map_batches(count, count, batched_texts(texts), num_workers):
        counts.update(batch_counts)
    return counts


def learn_merges_simple(word_counts: dict[str, int], num_new_tokens: int) -> list[tuple[bytes, bytes]]:
    """The plain BPE trainer: recount every pair of every word at every step.

    Takes the same inputs as learn_merges (pre-token counts, the number of new tokens to
    make) and gives exactly the same merges, ties included; it is just slower, because each
    step rereads the whole corpus. Read this one first: learn_merges below is the same
    algorithm with the counting made incremental.

    A worked example on one pre-token, "aaabdaaabac"; each line is the word before a step,
    then the pair that step merges and how often it occurs:

        a a a b d a a a b a c     (a, a) 4 times: the most frequent pair
        aa a b d aa a b a c       (aa, a) 2 and (a, b) 2 tie; b"aa" > b"a", so (aa, a)
        aaa b d aaa b a c         (aaa, b) 2
        aaab d aaab a c           four pairs tie at 1; b"d" is the greatest left part

    >>> learn_merges_simple({"aaabdaaabac": 1}, 4)
    [(b'a', b'a'), (b'aa', b'a'), (b'aaa', b'b'), (b'd', b'aaab')]
    """
    # Every word starts as its UTF-8 bytes; token ids 0..255 are those bytes.
    words = [list(word.encode("utf-8")) for word in word_counts]
    freqs = list(word_counts.values())
    token_bytes = [bytes([b]) for b in range(256)]  # token id -> the bytes it stands for
    token_ids = {token: i for i, token in enumerate(token_bytes)}  # and back
    merges: list[tuple[bytes, bytes]] = []
    while len(token_bytes) - 256 < num_new_tokens:
        # 1. Count every adjacent pair; a word that occurs freq times counts freq times.
        pair_counts: Counter = Counter()
        for word, freq in zip(words, freqs, strict=True):
            for pair in pairwise(word):
                pair_counts[pair] += freq
        if not pair_counts:
            break  # every word is a single token: nothing is left to merge
        # 2. The most frequent pair. Ties go to the greatest (left bytes, right bytes), so
        #    the result never depends on dict order.
        a, b = max(pair_counts, key=lambda p: (pair_counts[p], token_bytes[p[0]], token_bytes[p[1]]))
        merges.append((token_bytes[a], token_bytes[b]))
        # 3. Its bytes become a new token, unless another pair made them already
        #    ("ab" + "c" after "a" + "bc"): then the merge reuses that token.
        new_token = token_bytes[a] + token_bytes[b]
        if new_token not in token_ids:
            token_ids[new_token] = len(token_bytes)
            token_bytes.append(new_token)
        # 4. Replace the pair by the new token in every word.
        words = [merge_pair(word, a, b, token_ids[new_token]) for word in words]
    return merges


# The fast trainer. It makes the same merges as learn_merges_simple, but a step costs
# only as much as the words that hold the merged pair, not the whole corpus.

Pair = tuple[int, int]


def _descending_key(token: bytes) -> tuple[int, ...]:
    """A key whose ascending order is the descending order of byte strings: each byte b
    becomes 255 - b and a final 256 ranks a string after everything it is a prefix of."""
    return (*(255 - b for b in token), 256)


def _count_pairs(words: list[list[int]], freqs: list[int]) -> tuple[dict[Pair, int], dict[Pair, set[int]]]:
    """The one full count: how often each adjacent pair occurs (weighted by word
    frequency), and the indices of the words that hold it."""
    pair_counts: dict[Pair, int] = defaultdict(int)
    pair_words: dict[Pair, set[int]] = defaultdict(set)
    for index, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += freq
            pair_words[pair].add(index)
    return pair_counts, pair_words


def _merge_in_words(
    pair: Pair, new_id: int, words: list[list[int]], freqs: list[int], pair_words: dict[Pair, set[int]]
) -> dict[Pair, int]:
    """Merge pair into new_id in the words that hold it (changing words in place), note
    where the new token's pairs are, and return the net change of every pair count."""
    delta: dict[Pair, int] = defaultdict(int)
    for index in pair_words.pop(pair):
        word = words[index]
        merged = merge_pair(word, pair[0], pair[1], new_id)
        if len(merged) == len(word):
            continue  # the pair left this word in an earlier merge; the index is out of date
        words[index] = merged
        freq = freqs[index]
        # Take away all of the word's old pairs and add all of its new ones: the pairs
        # untouched by the merge cancel out, which is simpler than editing neighbours.
        for old in pairwise(word):
            delta[old] -= freq
        for new in pairwise(merged):
            delta[new] += freq
            if new_id in new:
                pair_words[new].add(index)
    return delta


def _update_pair_counts(
    delta: dict[Pair, int], pair_counts: dict[Pair, int], heap: list, sort_key: list[tuple[int, ...]]
) -> None:
    """Apply the changes to pair_counts. A pair whose count changed is pushed on the heap
    again with its new count; its older entry stays there, stale, until it is popped."""
    for pair, change in delta.items():
        if not change:
            continue
        count = pair_counts[pair] + change
        if count:
            pair_counts[pair] = count
            heapq.heappush(heap, (-count, sort_key[pair[0]], sort_key[pair[1]], *pair))
        else:
            del pair_counts[pair]  # the pair is gone from the corpus


def learn_merges(
    word_counts: dict[str, int], num_new_tokens: int, show_progress: bool | None = False
) -> list[tuple[bytes, bytes]]:
    """Learn merges from pre-token counts until they have made num_new_tokens new tokens
    (or no adjacent pair is left): learn_merges_simple, made fast.

    Each step takes the most frequent adjacent pair (ties: the greatest (left bytes,
    right bytes)) and merges it everywhere. A merge whose result is already a token, made
    from another pair ("a"+"bc" after "ab"+"c"), reuses that token, so in rare cases there
    are more merges than new tokens. Two structures keep a step cheap:
    - pair_counts, updated only for the words that contain the merged pair, instead of a
      recount over the whole corpus;
    - a heap of (-count, pair) with lazy deletion: a pair whose count changes is pushed
      again, and a popped entry whose count is out of date is skipped.
    pair_words[p] lists the words that contain (or once contained) pair p; a word that no
    longer has it is skipped when p is merged.
    """
    # Every word starts as its UTF-8 bytes; token ids 0..255 are those bytes.
    words = [list(word.encode("utf-8")) for word in word_counts]
    freqs = list(word_counts.values())
    token_bytes = [bytes([b]) for b in range(256)]
    token_ids = {token: i for i, token in enumerate(token_bytes)}
    # The heap pops the smallest entry; sort_key makes the greatest pair of bytes the smallest.
    sort_key = [_descending_key(t) for t in token_bytes]

    # Count all pairs once, and put them all on the heap, most frequent first.
    pair_counts, pair_words = _count_pairs(words, freqs)
    heap = [(-count, sort_key[a], sort_key[b], a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    bar = _progress(None, show_progress, total=num_new_tokens, desc="merging")
    while len(token_bytes) - 256 < num_new_tokens and heap:
        # 1. The most frequent pair: the top of the heap, once stale entries are skipped.
        neg_count, _, _, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b)) != -neg_count:
            continue  # stale entry: the pair's count changed since it was pushed
        merges.append((token_bytes[a], token_bytes[b]))
        # 2. Its bytes become a new token, unless another pair made them already.
        new_token = token_bytes[a] + token_bytes[b]
        new_id = token_ids.get(new_token)
        if new_id is None:
            new_id = token_ids[new_token] = len(token_bytes)
            token_bytes.append(new_token)
            sort_key.append(_descending_key(new_token))
            bar.update()
        # 3. Merge it in the words that hold it, and correct the counts of the pairs it touched.
        delta = _merge_in_words((a, b), new_id, words, freqs, pair_words)
        _update_pair_counts(delta, pair_counts, heap, sort_key)
    bar.close()
    return merges


# ------------------------------------------------------------------- the tokenizer

class BPETokenizer:
    """A byte-level BPE tokenizer: a vocabulary, ordered merges and special tokens.

    vocab:  token id -> the bytes it stands for; ids run 0..N-1 and include all 256 bytes.
    merges: (left, right) byte strings in the order they were learned; left + right must
            be in the vocabulary.
    special_tokens: texts matched whole before pre-tokenization. A special token whose
            bytes are already in vocab keeps that id (GPT-2's <|endoftext|> is 50256);
            any other is appended after the last id.
    pattern: the pre-tokenization regular expression (``regex`` syntax), one of
            KNOWN_SPLIT_PATTERNS.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
    ):
        check_split_pattern(pattern)
        self.vocab: dict[int, bytes] = {int(i): bytes(t) for i, t in vocab.items()}
        if sorted(self.vocab) != list(range(len(self.vocab))):
            raise ValueError("vocab ids must be 0, 1, ..., N-1 with no gaps")
        ids_by_bytes: dict[bytes, int] = {}
        for token_id, token in self.vocab.items():
            if token in ids_by_bytes:
                raise ValueError(f"vocab has {token!r} twice (ids {ids_by_bytes[token]} and {token_id})")
            ids_by_bytes[token] = token_id

        self.special_tokens: dict[str, int] = {}
        for special in special_tokens or []:
            token = special.encode("utf-8")
            if token not in ids_by_bytes:
                ids_by_bytes[token] = len(self.vocab)
                self.vocab[len(self.vocab)] = token
            self.special_tokens[special] = ids_by_bytes[token]

        try:
            self._byte_ids = [ids_by_bytes[bytes([b])] for b in range(256)]
        except KeyError as err:
            raise ValueError(f"vocab lacks the single byte {err.args[0]!r}; all 256 bytes are required") from None
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        # (left id, right id) -> (rank, merged id): the rank orders merges at encode time.
        # A pair listed twice keeps its last rank, as in Hugging Face tokenizers.
        self._merge_ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            if a not in ids_by_bytes or b not in ids_by_bytes or a + b not in ids_by_bytes:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}): a part or the result is not in the vocabulary")
            self._merge_ranks[ids_by_bytes[a], ids_by_bytes[b]] = (rank, ids_by_bytes[a + b])
        self._ids_by_bytes = ids_by_bytes

        self.pattern = pattern
        self._chunk_regex = regex.compile(pattern)
        self._pre_tokenize = pre_tokenizer(pattern)
        self._all_special_regex = _special_regex(frozenset(self.special_tokens), capture=True)
        self._cache = _ChunkCache(self._encode_chunk)

    # ----------------------------------------------------------------- basic facts

    @property
    def vocab_size(self) -> int:
        """Number of token ids: 256 bytes + merges + special tokens (for a trained tokenizer)."""
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, special_tokens={list(self.special_tokens)})"

    def token_to_id(self, token: str | bytes) -> int:
        """Id of a special token's text, or of a token given as its text or bytes."""
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        key = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        if key not in self._ids_by_bytes:
            raise KeyError(f"{token!r} is not a single token of this vocabulary")
        return self._ids_by_bytes[key]

    def id_to_token(self, token_id: int) -> bytes:
        """The bytes a token id stands for (a special token's UTF-8 text for special ids)."""
        if token_id not in self.vocab:
            raise KeyError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.vocab[token_id]

    # -------------------------------------------------------------------- encoding

    def _encode_chunk(self, chunk: str) -> list[int]:
        """BPE on one pre-token: start from its bytes, apply the earliest-learned merge
        among adjacent pairs until no adjacent pair has a merge."""
        ids = [self._byte_ids[b] for b in chunk.encode("utf-8")]
        ranks = self._merge_ranks
        no_merge = (len(ranks), -1)
        while len(ids) > 1:
            pair = min(pairwise(ids), key=lambda p: ranks.get(p, no_merge))
            if pair not in ranks:
                break
            ids = merge_pair(ids, pair[0], pair[1], ranks[pair][1])
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode text that holds no special tokens: pre-tokenize, then a cache lookup per chunk."""
        return list(chain.from_iterable(map(self._cache.__getitem__, self._pre_tokenize(text))))

    def _special_matcher(self, allowed_special: str | Iterable[str]) -> tuple[regex.Pattern | None, int]:
        """The regex that finds the allowed special tokens (None if none), and the length
        of the longest of them."""
        if allowed_special == "all":
            allowed = self.special_tokens.keys()
        elif allowed_special == "none":
            allowed = set()
        elif isinstance(allowed_special, str):
            raise ValueError(f'allowed_special must be "all", "none" or a set of special tokens, not {allowed_special!r}')
        else:
            allowed = set(allowed_special)
            unknown = allowed - self.special_tokens.keys()
            if unknown:
                raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}; known: {list(self.special_tokens)}")
        return _special_regex(frozenset(allowed), capture=True), max(map(len, allowed), default=0)

    def encode(self, text: str, allowed_special: str | Iterable[str] = "all") -> list[int]:
        """Text -> token ids.

        allowed_special: "all" (special-token text becomes its special id), "none" (it is
        encoded as ordinary text, byte by byte if need be), or a set of the special tokens
        to recognise.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        special_regex = self._all_special_regex if allowed_special == "all" else self._special_matcher(allowed_special)[0]
        if special_regex is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        # With a capturing group, split() alternates: text, special, text, special, ..., text.
        for i, part in enumerate(special_regex.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self._encode_ordinary(part)
        return ids

    def encode_batch(
        self, texts: Iterable[str], num_workers: int | None = None, allowed_special: str | Iterable[str] = "all"
    ) -> list[list[int]]:
        """Encode many texts; on several processes (num_workers, default all cores) when
        the batch is large enough to repay starting them."""
        texts = list(texts)
        workers = min(num_workers or os.cpu_count() or 1, len(texts))
        if workers <= 1 or sum(map(len, texts)) < PARALLEL_MIN_CHARS:
            return [self.encode(text, allowed_special) for text in texts]
        encode = partial(encode_in_worker, allowed_special=allowed_special)
        with pool(workers, self) as workers_pool:
            return workers_pool.map(encode, texts, chunksize=max(1, len(texts) // (8 * workers)))

    def encode_iterable(self, iterable: Iterable[str], allowed_special: str | Iterable[str] = "all") -> Iterator[int]:
        """Encode a stream of strings (an open file, a generator of lines) lazily.

        Yields exactly the ids of encode("".join(iterable)) while holding only about
        STREAM_BLOCK_CHARS characters at a time. The tail of each block is held back until
        more text arrives, because it could still change: a special token may be cut in
        half, and a pre-token at the end may grow ("  " + "x" pre-tokenizes as " ", " x").
        """
        special_regex, longest_special = self._special_matcher(allowed_special)
        # Enough characters to hold a partial special token, a 3-character contraction
        # ("'ll") and the one character of lookahead in "\s+(?!\S)".
        keep = max(longest_special, 3) + 1
        pieces: list[str] = []
        size = 0
        for piece in iterable:
            pieces.append(piece)
            size += len(piece)
            if size < STREAM_BLOCK_CHARS:
                continue
            text = "".join(pieces)
            cut = self._stable_cut(text, special_regex, keep)
            yield from self.encode(text[:cut], allowed_special)
            pieces, size = [text[cut:]], len(text) - cut
        yield from self.encode("".join(pieces), allowed_special)

    def _stable_cut(self, text: str, special_regex: regex.Pattern | None, keep: int) -> int:
        """A position p, as late as is safe, such that text[:p] encodes the same whatever
        is appended to text: the end of a special token, or of a pre-token that ends at least
        `keep` characters before the end of text (so its lookahead and any partial special
        token lie after it)."""
        limit = len(text) - keep
        start, end = 0, len(text)
        for match in special_regex.finditer(text) if special_regex else ():
            if match.end() <= limit:
                start = match.end()
            else:
                end = match.start()  # text[start:end] is a complete segment
                break
        if end <= limit:
            return end
        cut = start
        for match in self._chunk_regex.finditer(text, start, end):
            if match.end() > limit:
                break
            cut = match.end()
        return cut

    # ------------------------------------------------------------------- chat

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, return_mask: bool = False
    ) -> list[int] | tuple[list[int], list[bool]]:
        """Token ids of a conversation, Hugging Face style: messages are
        {"role": "system" | "user" | "assistant", "content": str}. Each turn is its role's
        special token followed by its content; an assistant turn ends with <|endoftext|>:

            <system>Be kind.<user>Tell me a story.<assistant>Once upon a time...<|endoftext|>

        add_generation_prompt appends <assistant> so that a model continues with a reply.
        Content is always plain text: "<user>" typed inside a message stays text and can
        never start a turn. With return_mask, also returns which tokens are assistant
        content or its closing <|endoftext|>: the only tokens a chat model is trained on.
        """
        ids: list[int] = []
        mask: list[bool] = []
        for index, message in enumerate(messages):
            role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
            if role not in CHAT_ROLES:
                raise ValueError(f"message {index}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"message {index}: content must be a str, not {type(content).__name__}")
            role_token = f"<{role}>"
            if role_token not in self.special_tokens or ENDOFTEXT not in self.special_tokens:
                raise ValueError(f"this tokenizer lacks the chat special tokens ({role_token}, {ENDOFTEXT})")
            body = self.encode(content, allowed_special="none")
            is_reply = role == "assistant"
            if is_reply:
                body.append(self.special_tokens[ENDOFTEXT])
            ids += [self.special_tokens[role_token], *body]
            mask += [False] + [is_reply] * len(body)
        if add_generation_prompt:
            if "<assistant>" not in self.special_tokens:
                raise ValueError("this tokenizer lacks the <assistant> special token")
            ids.append(self.special_tokens["<assistant>"])
            mask.append(False)
        return (ids, mask) if return_mask else ids

    # -------------------------------------------------------------------- decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Token ids -> the raw bytes they stand for."""
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array
            ids = ids.tolist()
        try:
            return b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]!r} is outside the vocabulary (0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text. Bytes that are not valid UTF-8 (say, the first half of an
        emoji at the end of a partial sequence) become U+FFFD instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -------------------------------------------------------------------- training

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: list[str] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
        num_workers: int | None = None,
        show_progress: bool | None = None,
    ) -> BPETokenizer:
        """Learn a tokenizer of vocab_size tokens (256 bytes + merges + special tokens).

        special_tokens: None means DEFAULT_SPECIAL_TOKENS; [] means none. Their text is cut
        out of the corpus before anything is counted. Ties in pair frequency go to the
        lexicographically greatest pair of byte strings, so training is deterministic.
        show_progress: a tqdm bar for merging; None shows it once merging has run for more
        than a second. (To watch the counting, pass texts through a bar of your own.)
        """
        check_split_pattern(pattern)  # before the counting, not after
        special_tokens = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        num_new_tokens = vocab_size - 256 - len(special_tokens)
        if num_new_tokens < 0:
            raise ValueError(
                f"vocab_size {vocab_size} is too small: it must be at least 256 bytes + {len(special_tokens)} special tokens"
            )
        word_counts = count_pre_tokens(texts, pattern, special_tokens, num_workers)
        merges = learn_merges(word_counts, num_new_tokens, show_progress)
        tokens = [bytes([byte]) for byte in range(256)]
        tokens += dict.fromkeys(a + b for a, b in merges)  # in order of creation, no repeats
        return cls(dict(enumerate(tokens)), merges, special_tokens, pattern)

    # ----------------------------------------------------------------- persistence

    def to_dict(self) -> dict:
        """The tokenizer as plain JSON-able data. Byte strings are written in GPT-2's
        printable form (bytes_to_text), so merges read as text: ["Ġt", "he"]."""
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab": [bytes_to_text(self.vocab[i]) for i in range(self.vocab_size)],
            "merges": [[bytes_to_text(a), bytes_to_text(b)] for a, b in self.merges],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer data") -> BPETokenizer:
        """Inverse of to_dict; anything malformed raises TokenizerFileError naming `source`."""
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise TokenizerFileError(f"{source}: not a tokenizer file of this project (no \"format\": \"{FILE_FORMAT}\")")
        if data.get("version") != FILE_VERSION:
            raise TokenizerFileError(f"{source}: tokenizer file version {data.get('version')!r}, this code reads {FILE_VERSION}")
        try:
            vocab = {i: text_to_bytes(token) for i, token in enumerate(data["vocab"])}
            merges = [(text_to_bytes(a), text_to_bytes(b)) for a, b in data["merges"]]
            specials = data["special_tokens"]
            tokenizer = cls(vocab, merges, list(specials), data["pattern"])
        except (KeyError, TypeError, ValueError, regex.error) as err:
            raise TokenizerFileError(f"{source}: malformed tokenizer file: {err}") from None
        if tokenizer.special_tokens != specials:
            raise TokenizerFileError(f"{source}: special token ids {specials} do not match the vocabulary")
        return tokenizer

    def to_json(self) -> str:
        """to_dict as JSON with one token and one merge per line, easy to read and diff."""
        data = self.to_dict()
        lines = [f" {json.dumps(key)}: {json.dumps(data[key], ensure_ascii=False)}," for key in data if key not in ("vocab", "merges")]
        for key in ("vocab", "merges"):
            items = ",\n".join(f"  {json.dumps(item, ensure_ascii=False)}" for item in data[key])
            lines.append(f' {json.dumps(key)}: [\n{items}\n ]' + ("," if key == "vocab" else ""))
        return "{\n" + "\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer JSON") -> BPETokenizer:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TokenizerFileError(f"{source}: not valid JSON (truncated?): {err}") from None
        return cls.from_dict(data, source)

    def fingerprint(self) -> str:
        """A short hash of the vocabulary, merges, special tokens and pattern: equal
        fingerprints encode every text alike (used to key caches of encoded data)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one human-readable JSON file (atomically)."""
        text = self.to_json()
        write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a file written by save(); a missing or damaged file raises TokenizerFileError."""
        return cls.from_json(read_text_file(path), source=str(path))

    def __getstate__(self) -> dict:
        # Pickled only to hand the tokenizer to worker processes; the cache stays behind.
        return {"vocab": self.vocab, "merges": self.merges, "special_tokens": list(self.special_tokens), "pattern": self.pattern}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
