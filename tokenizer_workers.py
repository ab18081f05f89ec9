"""A tokenizer's worker processes: counting and encoding a corpus on all cores, in order, in
bounded memory. bpe_tokenizer.py counts pre-tokens and encodes batches through it;
tinystories_data.py encodes whole corpora into token files with encode_arrays.

The file, top to bottom:
- the pool: worker processes that each receive the tokenizer once (pool), and the functions
  they run;
- map_batches: a function over a stream of batches, on the pool, at most two batches per
  worker in flight;
- corpora: batched_texts (a stream of texts cut into batches of a few MB), token_dtype,
  encode_to_array (texts -> one flat uint16 array), encode_arrays (the same on all cores).

    >>> arrays = encode_arrays(tokenizer, batched_texts(stories), separator=eot_id)
    >>> tokens = np.concatenate(list(arrays))    # every story, each followed by eot_id
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import chain, islice
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # (bpe_tokenizer imports this module; the tokenizer only reaches it as an argument)
    from bpe_tokenizer import BPETokenizer

# Streams are counted and encoded in batches of about this many characters (a few MB); from
# two batches on, on several processes.
BATCH_CHARS = 2_000_000


# ---------------------------------------------------------------------------- the pool

_worker_tokenizer: BPETokenizer | None = None


def _init_worker(tokenizer: BPETokenizer | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it (its
    # pool terminates the workers), so the user sees one message, not a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def encode_in_worker(text: str, allowed_special: str | Iterable[str]) -> list[int]:
    """tokenizer.encode in a worker of pool(): BPETokenizer.encode_batch's task."""
    return _worker_tokenizer.encode(text, allowed_special)


def _encode_array_in_worker(texts: list[str], separator: int | None) -> np.ndarray:
    return encode_to_array(_worker_tokenizer, texts, separator)


def pool(workers: int, tokenizer: BPETokenizer | None = None) -> multiprocessing.pool.Pool:
    """A process pool; each worker receives the tokenizer once, not with every task."""
    return multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer,))


def map_batches(local: Callable, in_worker: Callable, batches: Iterable, num_workers: int | None = None,
                tokenizer: BPETokenizer | None = None) -> Iterator:
    """[local(batch) for batch in batches], lazily and in order: in this process when there
    is one batch or one worker, else on worker processes running in_worker (a module-level
    function, as pickle needs; it finds the tokenizer in _worker_tokenizer).

    At most two batches per worker are in flight, so a stream of any length is read only as
    fast as the workers use it. (Pool.imap would read the whole stream into its task queue.)"""
    batches = iter(batches)
    first = list(islice(batches, 2))
    workers = num_workers or os.cpu_count() or 1
    if len(first) < 2 or workers == 1:
        yield from map(local, chain(first, batches))
        return
    with pool(workers, tokenizer) as workers_pool:
        pending: deque = deque()
        for batch in chain(first, batches):
            pending.append(workers_pool.apply_async(in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- corpora

def batched_texts(texts: Iterable[str], max_chars: int | None = None) -> Iterator[list[str]]:
    """Group texts into lists of about max_chars (default BATCH_CHARS) characters."""
    max_chars = max_chars or BATCH_CHARS
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def token_dtype(tokenizer: BPETokenizer) -> type[np.unsignedinteger]:
    """The smallest NumPy integer that holds every id: uint16 for up to 65,536 tokens (this
    project's 10k, GPT-2's 50k), else uint32."""
    return np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32


def encode_to_array(tokenizer: BPETokenizer, texts: Iterable[str], separator: int | None = None) -> np.ndarray:
    """Texts encoded as ordinary text (special-token look-alikes stay text), one after the
    other in one flat array of token_dtype, with the id `separator` after each if given.

        >>> encode_to_array(tokenizer, ["Hi.", "Bye."], separator=tokenizer.special_tokens["<|endoftext|>"])
        array([1704,   46, 9996, 3852,   46, 9996], dtype=uint16)   # the released tokenizer
    """
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, allowed_special="none")
        if separator is not None:
            ids.append(separator)
    return np.array(ids, dtype=token_dtype(tokenizer))


def encode_arrays(tokenizer: BPETokenizer, batches: Iterable[list[str]], separator: int | None = None,
                  num_workers: int | None = None) -> Iterator[np.ndarray]:
    """encode_to_array of each batch of texts, in order, on num_workers processes (default:
    all cores). Workers send back compact arrays, not lists of Python ints, and only a few
    batches are in flight, so a stream of any size encodes in bounded memory."""
    local = partial(encode_to_array, tokenizer, separator=separator)
    in_worker = partial(_encode_array_in_worker, separator=separator)
    return map_batches(local, in_worker, batches, num_workers, tokenizer)
