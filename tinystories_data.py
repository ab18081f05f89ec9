"""The one place that loads data, for every script and notebook: stories from the hub or a
local path, and the token streams pretraining reads (chat_data.py reads through it too).

The file, top to bottom:
- readers: read_story_file (.txt, in blocks), with_progress (a bar in MB and stories), local
  files and folders, the Hugging Face hub;
- loading: load_split; StorySource, one split's stories streamed (every pass reads the source
  afresh, in bounded memory, the whole TinyStories included), with seeded samples and a
  counting pass (story_sizes); load_stories, the same stories as a list for data that fits;
- held-out shares: held_out_indices (one seeded draw), hold_out for lists, split_stream for
  streams; validation_stories: a quick validation set for the notebooks;
- token streams: encoded_stories turns a stream of stories into token arrays on all cores,
  encode_stories into one array, cached_tokens writes them to disk as they come (uint16
  .bin files) so a corpus is encoded once, TokenWindows cuts a stream into (inputs, targets);
- what a story holds: story_sentences, story_names, story_words; words_line and
  add_words_lines (TinyStoriesInstruct's "Words:" metadata in front of pretraining stories);
- pretraining data: load_train_and_validation (streams of the training, validation and
  calibration stories; StoriesOfRole picks a held-out share from a source) and
  prepare_pretraining_data (their windows, cached).

Chat conversations, loaded or built from these stories, are chat_data.py's.

`dataset` is a Hugging Face hub id (default roneneldan/TinyStories) or a local path:
- a .txt file of stories separated by <|endoftext|> (TinyStories' own release format);
- a .json, .jsonl, .parquet or .csv file with a text column;
- a folder of such files: files whose names contain "train", "valid"/"validation"/"val"/
  "dev" or "test" form those splits (the Hugging Face convention; ../shared/data's
  tinystories_train.txt and tinystories_valid.txt are "train" and "validation"); if no
  name says, every file is "train";
- a folder written by datasets' save_to_disk (a Dataset, or a DatasetDict of splits).
A single file is one split, "train".

Text files are streamed here; everything else goes through `datasets` (Arrow tables on
disk, read in batches). A seeded sample is the same draw from either (datasets' shuffle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import datasets
import numpy as np
import regex
import torch
from tqdm.auto import tqdm

from bpe_tokenizer import ENDOFTEXT, BPETokenizer
from common import write_atomically
from tokenizer_workers import batched_texts, encode_arrays, token_dtype

DEFAULT_DATASET = "roneneldan/TinyStories"
LOCAL_EXAMPLE = "../shared/data/tinystories_train.txt"
T = TypeVar("T")

# File extension -> datasets builder; .txt files are read here (see read_story_file).
DATA_FILE_BUILDERS = {".txt": None, ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Words in a file name that put it in a split; asking for any alias finds the split.
SPLIT_WORDS = {
    "train": {"train", "training"},
    "validation": {"validation", "valid", "val", "dev"},
    "test": {"test", "testing"},
}


class DataError(ValueError):
    """The data set cannot be loaded: bad path, unreachable hub, missing column, no stories."""


class SplitNotFoundError(DataError):
    """The data set exists but has no such split (callers may fall back to a held-out share)."""


def read_story_file(path: str | os.PathLike, block_chars: int = 1 << 22) -> Iterator[str]:
    """Stream the stories of a text file, cut at every <|endoftext|>. The file is read in
    blocks of block_chars characters, so a file of any size takes bounded memory."""
    pieces: list[str] = []  # the text since the last separator
    tail = ""  # its last characters: a separator may straddle blocks
    with open(path, encoding="utf-8") as f:
        while block := f.read(block_chars):
            window = tail + block
            if ENDOFTEXT not in window:
                pieces.append(block)
                tail = window[1 - len(ENDOFTEXT):]
                continue
            *finished, rest = "".join([*pieces, block]).split(ENDOFTEXT)
            yield from finished
            pieces, tail = [rest], rest[1 - len(ENDOFTEXT):]
    yield "".join(pieces)


def utf8_size(text: str) -> int:
    """The length of text in UTF-8 bytes (without encoding it when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def with_progress(stories: Iterable[str], desc: str, total_bytes: int | None = None) -> Iterator[str]:
    """stories, passed through unchanged, while a tqdm bar counts them in MB and in stories,
    with an ETA when total_bytes is known (an estimate is fine: the bar ends at 100%)."""
    bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, delay=1.0)
    count = pending = 0
    try:
        for story in stories:
            yield story
            count += 1
            pending += utf8_size(story)
            if count % 2048 == 0:
                bar.set_postfix_str(f"{count:,} stories", refresh=False)
                bar.update(pending)
                pending = 0
        bar.total = bar.n + pending
        bar.set_postfix_str(f"{count:,} stories", refresh=False)
        bar.update(pending)
    finally:
        bar.close()


# --------------------------------------------------------------------------- local

def _looks_like_path(name: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else is meant as a local path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in DATA_FILE_BUILDERS
    )


def _split_of(file: Path) -> str | None:
    words = set("".join(c if c.isalnum() else " " for c in file.name.lower()).split())
    return next((split for split, names in SPLIT_WORDS.items() if words & names), None)


def _canonical_split(split: str) -> str:
    return next((name for name, aliases in SPLIT_WORDS.items() if split in aliases), split)


def _load_files(files: list[Path], source: str) -> datasets.Dataset:
    kinds = {DATA_FILE_BUILDERS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise DataError(f"{source}: one split mixes file types ({', '.join(sorted(f.name for f in files))})")
    builder = kinds.pop()
    try:
        if builder is None:
            stories = [story for file in files for story in read_story_file(file)]
            return datasets.Dataset.from_dict({"text": stories})
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not UTF-8 text ({err})") from None
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
        raise DataError(f"{source}: cannot read as {builder}: {str(err).splitlines()[0]}") from None


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    try:
        saved = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path}: not a readable save_to_disk folder: {err}") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise SplitNotFoundError(f"{path}: no {split!r} split (it has: {list(saved)})")
        return saved[split]
    if _canonical_split(split) != "train":
        raise SplitNotFoundError(f"{path}: a saved Dataset is one split ('train'), so it has no {split!r} split")
    return saved


def _is_saved_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _local_split_files(path: Path, split: str) -> list[Path]:
    """The data files that form one split of a local file or folder (not a save_to_disk one)."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in DATA_FILE_BUILDERS)
        if not files:
            raise DataError(f"{path}: folder holds no data files ({', '.join(DATA_FILE_BUILDERS)})")
        by_split: dict[str, list[Path]] = {}
        for file in files:
            by_split.setdefault(_split_of(file) or "", []).append(file)
        if by_split.keys() == {""}:
            by_split = {"train": files}
        wanted = _canonical_split(split)
        if wanted not in by_split:
            named = sorted(s for s in by_split if s)
            raise SplitNotFoundError(f"{path}: no {split!r} split (file names give: {named})")
        return by_split[wanted]
    if path.suffix.lower() not in DATA_FILE_BUILDERS:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(DATA_FILE_BUILDERS)}")
    if _canonical_split(split) != "train":
        raise SplitNotFoundError(f"{path}: a single file is one split ('train'), so it has no {split!r} split")
    return [path]


def _load_local(path: Path, split: str) -> datasets.Dataset:
    if _is_saved_folder(path):
        return _load_saved(path, split)
    return _load_files(_local_split_files(path, split), str(path))


# ----------------------------------------------------------------------------- hub

def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the hub? Fails in seconds where load_dataset would
    retry for half a minute."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # only the proxy knows; let datasets try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_from_hub(name: str, split: str) -> datasets.Dataset:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline and not _hub_reachable():
        raise DataError(
            f"cannot reach the Hugging Face hub to load {name!r}: no network? Pass a local path instead "
            f"(e.g. --dataset {LOCAL_EXAMPLE}), or set HF_HUB_OFFLINE=1 to use a copy in the local cache"
        )
    try:
        return datasets.load_dataset(name, split=split)
    except datasets.exceptions.DatasetNotFoundError:
        raise DataError(f"{name!r}: no such data set on the hub (or it is private), and no such local path") from None
    except ConnectionError as err:
        raise DataError(f"cannot load {name!r} from the hub ({err}); pass a local path, e.g. {LOCAL_EXAMPLE}") from None
    except ValueError as err:
        if "split" in str(err).lower():
            raise SplitNotFoundError(f"{name}: {err}") from None
        raise


# ------------------------------------------------------------------- loading

def load_split(dataset: str, split: str = "train") -> datasets.Dataset:
    """One split of a hub data set or of a local path, as a datasets.Dataset."""
    path = Path(dataset).expanduser()
    if path.exists():
        return _load_local(path, split)
    if _looks_like_path(dataset):
        raise DataError(f"{dataset}: no such file or folder")
    return _load_from_hub(dataset, split)


class StorySource:
    """The stories of one split, streamed: every pass reads them afresh, in blocks of a text
    file or in batches of an Arrow table, and never holds them all (the whole TinyStories is
    1.9 GB of text, about 20 GB as Python strings).

    Stories are stripped of surrounding whitespace and empty ones dropped. sample > 0 draws
    that many rows at random, seeded, as datasets' shuffle(seed).select(range(sample)) does
    (np.random.default_rng(seed).permutation), whatever the source; only the sample is held.

        >>> source = StorySource("../shared/data/tinystories_train.txt")
        >>> sizes = source.story_sizes()     # one counting pass: 2,983 stories, 2.6 MB
        >>> next(iter(source))[:31]
        'One day, a little girl named Li'
    """

    BATCH_ROWS = 1000  # rows per Arrow batch

    def __init__(self, dataset: str = DEFAULT_DATASET, split: str = "train", text_column: str = "text",
                 sample: int = 0, seed: int = 0):
        self.dataset, self.split, self.text_column, self.sample, self.seed = dataset, split, text_column, sample, seed
        self.text_files, self.table = self._resolve()
        columns = self.table.column_names if self.table is not None else ["text"]  # a story file is one "text"
        if text_column not in columns:
            raise DataError(f"{dataset}: no column {text_column!r} (columns: {columns}); pass --text_column")
        if self.table is not None and sample and sample < len(self.table):
            self.table = self.table.shuffle(seed=seed).select(range(sample))
        self._sampled: list[str] | None = None
        self._sizes: np.ndarray | None = None

    def _resolve(self) -> tuple[list[Path], datasets.Dataset | None]:
        """(.txt files to stream, None), or ([], the Arrow table of any other source)."""
        path = Path(self.dataset).expanduser()
        if path.exists() and not _is_saved_folder(path):
            files = _local_split_files(path, self.split)
            if all(f.suffix.lower() == ".txt" for f in files):
                return files, None
        return [], load_split(self.dataset, self.split)

    def _rows(self) -> Iterator:
        """Every raw row, in order: the pieces of the text files, or the table's column."""
        if self.text_files:
            try:
                for file in self.text_files:
                    yield from read_story_file(file)
            except UnicodeDecodeError as err:
                raise DataError(f"{self.dataset}: not UTF-8 text ({err})") from None
            return
        for batch in self.table.select_columns([self.text_column]).iter(batch_size=self.BATCH_ROWS):
            yield from batch[self.text_column]

    def _sampled_rows(self) -> list:
        """The sample of a text source: the seeded permutation's first rows, in its order
        (two passes: one to count the rows, one to pick them); all rows when there are fewer."""
        if self._sampled is None:
            size = self._file_bytes()
            rows = sum(1 for _ in with_progress(self._rows(), "counting rows to sample from", size))
            shuffled = np.random.default_rng(self.seed).permutation(rows) if self.sample < rows else range(rows)
            order = shuffled[:self.sample]
            position = {int(row): i for i, row in enumerate(order)}
            picked: list = [None] * len(order)
            for row, text in enumerate(with_progress(self._rows(), f"drawing {len(order):,} stories", size)):
                if row in position:
                    picked[position[row]] = text
            self._sampled = picked
        return self._sampled

    def __iter__(self) -> Iterator[str]:
        rows = self._sampled_rows() if self.text_files and self.sample else self._rows()
        return (text.strip() for text in rows if isinstance(text, str) and text.strip())

    def story_sizes(self) -> np.ndarray:
        """The UTF-8 size in bytes of every story, in order (len() of it counts the stories):
        one pass over the source, with a progress bar, done once."""
        if self._sizes is None:
            stories = with_progress(self, f"counting {self.split} stories", self.total_bytes)
            self._sizes = np.fromiter(map(utf8_size, stories), dtype=np.int64)
            if not len(self._sizes):
                raise self.no_stories()
        return self._sizes

    def no_stories(self) -> DataError:
        """The error for a split whose stories are all empty."""
        return DataError(f"{self.dataset}: no stories in split {self.split!r}, column {self.text_column!r} (all empty)")

    def _file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.text_files)

    @property
    def total_bytes(self) -> int:
        """The size of the stories in bytes: exact once counted, else the files' or table's size."""
        if self._sizes is not None:
            return int(self._sizes.sum())
        if self.text_files:
            return self._file_bytes()
        return self.table.data.nbytes * len(self.table) // max(1, len(self.table.data))


def load_stories(
    dataset: str = DEFAULT_DATASET, split: str = "train", text_column: str = "text", sample: int = 0, seed: int = 0
) -> list[str]:
    """The stories of one split as a list, stripped of surrounding whitespace, empty ones
    dropped: StorySource's stories, for data that fits in memory (validation sets, chat data,
    notebooks). sample > 0 returns that many stories drawn at random (seeded; the same seed
    gives the same stories); 0 returns all of them, in order.
    """
    source = StorySource(dataset, split, text_column, sample, seed)
    stories = list(source)
    if not stories:
        raise source.no_stories()
    return stories


def held_out_indices(count: int, held: int | float, seed: int) -> np.ndarray:
    """The sorted indices of a seeded random share of count items: hold_out's draw, for
    streams that cannot be indexed (see hold_out for held and the errors)."""
    chosen = max(1, int(count * held)) if isinstance(held, float) else held
    if chosen and chosen >= count:
        raise DataError(f"{count} stories or conversations are too few to hold out {chosen} of them "
                        "and keep the rest")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return np.sort(np.array(order[:chosen], dtype=np.int64))


def hold_out(items: Sequence[T], held: int | float, seed: int) -> tuple[list[T], list[T]]:
    """(kept, held_out): a seeded random share of items set aside, for validation or to
    measure a tokenizer on text it has not seen. held is a count (int) or a fraction (float
    in (0, 1), rounded down but at least one item), as in scikit-learn's train_test_split.
    Both lists keep the items' order; the same items and seed give the same split.

    The draw is random.Random(seed).shuffle of the indices: the generator behind the
    tokenizer's held-out compression figure, so that figure stays reproducible. A fraction
    that leaves nothing to keep is a DataError."""
    chosen = set(held_out_indices(len(items), held, seed).tolist())
    kept = [item for i, item in enumerate(items) if i not in chosen]
    return kept, [items[i] for i in sorted(chosen)]


def split_stream(stories: Iterable[str], held: np.ndarray, held_out: list[str]) -> Iterator[str]:
    """The stories whose flag in held is False, streamed; the others are appended to held_out
    as the stream passes them (so held_out is complete once the stream is)."""
    for story, is_held in zip(stories, held, strict=True):
        if is_held:
            held_out.append(story)
        else:
            yield story


def validation_stories(dataset: str = DEFAULT_DATASET, held_out: int = 200) -> list[str]:
    """The validation split's stories, or, for data with no such split, the last held_out
    training stories: a quick look for the notebooks, not a seeded random split like
    hold_out's (which training and the tokenizer script use)."""
    try:
        return load_stories(dataset, "validation")
    except SplitNotFoundError:
        return load_stories(dataset)[-held_out:]


# ------------------------------------------------------- token streams for training

def encoded_stories(stories: Iterable[str], tokenizer: BPETokenizer, num_workers: int | None = None,
                    desc: str = "encoding", total_bytes: int | None = None) -> Iterator[np.ndarray]:
    """Stories -> their token stream, in order, as a series of arrays of token_dtype(tokenizer)
    (uint16 for 10k or GPT-2's 50k tokens): each story followed by <|endoftext|>, encoded as
    plain text (special-token look-alikes inside a story stay text). The stories may be a
    stream; batches of a few MB are encoded on num_workers processes (default: all cores)
    while a bar shows MB and stories done (with an ETA given total_bytes)."""
    if ENDOFTEXT not in tokenizer.special_tokens:
        raise DataError(f"the tokenizer has no {ENDOFTEXT} special token to separate stories")
    batches = batched_texts(with_progress(stories, desc, total_bytes))
    return encode_arrays(tokenizer, batches, tokenizer.special_tokens[ENDOFTEXT], num_workers)


def encode_stories(stories: Iterable[str], tokenizer: BPETokenizer, num_workers: int | None = None,
                   desc: str = "encoding") -> np.ndarray:
    """encoded_stories as one array in memory: for a validation set or a notebook. (Training
    streams its data to disk instead, with cached_tokens.)"""
    arrays = list(encoded_stories(stories, tokenizer, num_workers, desc))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=token_dtype(tokenizer))


def cached_tokens(cache_dir: str | os.PathLike, key: dict, dtype: type[np.unsignedinteger],
                  build: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
    """A token stream written once to cache_dir as raw `dtype` integers (llama2.c's .bin
    layout), array by array as build() yields them, then memory-mapped. key (dataset, split,
    tokenizer fingerprint, sample size, ...) names the file, so a change to any of them builds
    a new one. The .json beside it records the key and the token count, and is written last:
    a stream without it was cut short, and is built again."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tokens-{name}.bin"
    record = path.with_suffix(".json")
    itemsize = np.dtype(dtype).itemsize
    if not record.exists():

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                for array in build():
                    f.write(array.astype(dtype, copy=False).tobytes())

        write_atomically(path, write, suffix=".bin")
        text = json.dumps({**key, "tokens": path.stat().st_size // itemsize}, indent=1, sort_keys=True) + "\n"
        write_atomically(record, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    try:
        tokens = json.loads(record.read_text(encoding="utf-8"))["tokens"]
        if path.stat().st_size != tokens * itemsize:
            raise ValueError(f"{path.stat().st_size} bytes, not {tokens} tokens of {np.dtype(dtype).name}")
        return np.memmap(path, dtype=dtype, mode="r") if tokens else np.zeros(0, dtype=dtype)
    except (ValueError, KeyError, TypeError, OSError) as err:  # written atomically, so damaged afterwards
        raise DataError(f"the token cache {path} is damaged ({err}); delete it, and it is built again") from None


class TokenWindows(torch.utils.data.Dataset):
    """Causal language modelling over a flat token stream: item i is the window
    tokens[shift + i * block_size : shift + (i + 1) * block_size + 1], returned as (inputs,
    targets), the targets being the inputs shifted by one token. Windows do not overlap, and
    the stream runs across story boundaries (stories are separated by <|endoftext|>).

    With shift_seed, set_epoch(epoch) moves every window by a seeded shift in
    [0, block_size): each epoch cuts the stream at new places, so a token is seen with a
    different context every time. On a small corpus read for dozens of epochs this matters:
    fixed windows are memorised (with them, validation loss on ../shared/data turned up
    after 11 epochs). Without shift_seed (validation) the windows stay put and cover the
    whole stream.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, shift_seed: int | None = None):
        room = block_size if shift_seed is not None else 0
        if len(tokens) < block_size + 1 + room:
            raise DataError(f"{len(tokens)} tokens are too few for a window of block_size {block_size} + 1"
                            + (" and room to shift it" if room else ""))
        self.tokens, self.block_size, self.shift_seed = tokens, block_size, shift_seed
        self.windows = (len(tokens) - 1 - room) // block_size
        self.shift = 0

    def set_epoch(self, epoch: int) -> None:
        if self.shift_seed is not None:
            generator = torch.Generator().manual_seed(self.shift_seed * 1_000_003 + epoch)
            self.shift = int(torch.randint(0, self.block_size, (1,), generator=generator))

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.shift + index * self.block_size
        window = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


# ------------------------------------------------------------ what a story holds
#
# Its sentences, its characters and its content words: what the chat requests below ask for,
# what request_following.py checks, and what a words line (TinyStoriesInstruct's "Words:"
# metadata) names in front of a pretraining story.

STOPWORDS = frozenset("""the and was were had have has with that this they them then there their when
    what said very from into onto upon your you she her his him for but not are all one day time could would
    should will just like some went came saw see look looked says big little named because ever also""".split())


def story_sentences(story: str) -> list[str]:
    return [s for s in regex.split(r"(?<=[.!?][\"”’']?)\s+", story.strip()) if s]


def story_names(story: str) -> list[str]:
    """Capitalised words met at least twice other than as a sentence's first word: the
    story's characters (Lily, Tom, Max), most frequent first."""
    counts = Counter(word for sentence in story_sentences(story) for word in regex.findall(r"\b[A-Z][a-z]+\b", sentence)[1:])
    return [word for word, count in counts.most_common() if count >= 2]


def story_words(story: str) -> list[str]:
    """Distinct content words of a story (lower case, four letters or more, not common)."""
    words = dict.fromkeys(w for w in regex.findall(r"\b[a-z]{4,}\b", story) if w not in STOPWORDS)
    return list(words)


def words_line(words: list[str]) -> str:
    """The prompt for a story that uses these words: "Words: a, b, c\nStory:". It ends at the
    colon: the space after it belongs to the story's first token (" Once")."""
    return f"Words: {', '.join(words)}\nStory:"


def add_words_lines(stories: Iterable[str], share: float, seed: int) -> Iterator[str]:
    """A seeded share of the stories (those with three content words or more) start with a
    words line, as TinyStoriesInstruct's stories do:

        Words: garden, happy, ball
        Story: Once upon a time, ...

    A model pretrained on them learns to use words it is given, so that a prompt ending in
    "Story:" after such a line asks for them (and the chat's word requests have that skill to
    build on). The words are three of the story's content words, in a random order. The
    stories may be a stream: each is marked as it passes."""
    rng = random.Random(seed)
    for story in stories:
        words = story_words(story)
        if len(words) >= 3 and rng.random() < share:
            story = f"{words_line(rng.sample(words, 3))} {story}"
        yield story


# ---------------------------------------------------------- pretraining data

def source_name(dataset: str | None) -> str | None:
    """A data set's identity for cache keys: the absolute path of a local one."""
    return str(Path(dataset).expanduser().resolve()) if dataset and Path(dataset).expanduser().exists() else dataset


TRAIN, VALIDATION, CALIBRATION, UNUSED = range(4)  # what a story of a training source is for


@dataclasses.dataclass
class StoriesOfRole:
    """The stories of a training source that serve one role (TRAIN, VALIDATION or
    CALIBRATION): a stream, read afresh from the source on every pass."""

    source: StorySource
    roles: np.ndarray  # the role of each of the source's stories
    role: int

    def __iter__(self) -> Iterator[str]:
        return (story for story, role in zip(self.source, self.roles, strict=True) if role == self.role)

    @property
    def total_bytes(self) -> int:
        return int(self.source.story_sizes()[self.roles == self.role].sum())


def _validation_source(dataset: str, val_dataset: str | None, text_column: str, max_val_stories: int,
                       seed: int) -> StorySource | None:
    """val_dataset's validation split (or the whole of a single file), else dataset's
    validation split; None when there is no such split."""
    try:
        if val_dataset:
            try:
                return StorySource(val_dataset, "validation", text_column, max_val_stories, seed)
            except SplitNotFoundError:  # a single file is its own split
                return StorySource(val_dataset, "train", text_column, max_val_stories, seed)
        return StorySource(dataset, "validation", text_column, max_val_stories, seed)
    except SplitNotFoundError:
        return None


def load_train_and_validation(dataset: str, val_dataset: str | None = None, val_fraction: float = 0.05,
                              text_column: str = "text", max_train_stories: int = 0, max_val_stories: int = 0,
                              seed: int = 0, calibration_stories: int = 0) -> dict[str, Iterable[str]]:
    """{"train": stories, "validation": stories, "calibration": stories}, each a stream
    (StorySource or StoriesOfRole) that reads its source afresh on every pass. Validation is
    val_dataset (its validation split, or the whole of a single file), else dataset's
    validation split, else a seeded val_fraction of dataset's training stories (hold_out's
    draw, the first max_val_stories of it if set). Calibration is a seeded calibration_stories
    of the remaining training stories, held out to fit a temperature (calibration.py); none
    by default. max_*_stories > 0: a seeded sample. Holding out counts the training stories
    first (one pass)."""
    train = StorySource(dataset, "train", text_column, max_train_stories, seed)
    validation = _validation_source(dataset, val_dataset, text_column, max_val_stories, seed)
    if validation is not None and not calibration_stories:
        return {"train": train, "validation": validation, "calibration": []}
    roles = np.full(len(train.story_sizes()), TRAIN, dtype=np.uint8)
    if validation is None:
        try:
            held = held_out_indices(len(roles), float(val_fraction), seed)
        except DataError as err:
            raise DataError(f"{dataset}: {err}") from None
        roles[held] = UNUSED
        roles[held[:max_val_stories or None]] = VALIDATION
        validation = StoriesOfRole(train, roles, VALIDATION)
    calibration: Iterable[str] = []
    if calibration_stories:
        kept = np.flatnonzero(roles == TRAIN)
        try:
            roles[kept[held_out_indices(len(kept), calibration_stories, seed)]] = CALIBRATION
        except DataError as err:
            raise DataError(f"--calibration_stories {calibration_stories}: {err}") from None
        calibration = StoriesOfRole(train, roles, CALIBRATION)
    return {"train": StoriesOfRole(train, roles, TRAIN), "validation": validation, "calibration": calibration}


def prepare_pretraining_data(tokenizer: BPETokenizer, dataset: str, block_size: int, cache_dir: str | os.PathLike,
                             val_dataset: str | None = None, val_fraction: float = 0.05, text_column: str = "text",
                             max_train_stories: int = 0, max_val_stories: int = 0, seed: int = 0,
                             num_workers: int | None = None, calibration_stories: int = 0,
                             words_lines: float = 0.0) -> dict[str, TokenWindows]:
    """{"train", "validation"} windows of block_size tokens, and "calibration" windows with
    calibration_stories (see load_train_and_validation for where each comes from). Every
    token stream is encoded once, streamed to disk and cached under cache_dir; the stories are
    read only when a stream is not cached yet. The training windows move each epoch
    (shift_seed), the others stay put. words_lines: the share of training stories that start
    with a words line (add_words_lines); the validation and calibration stories stay plain."""
    loaded: dict[str, Iterable[str]] = {}

    def encoded(role: str) -> Iterator[np.ndarray]:
        if not loaded:
            loaded.update(load_train_and_validation(dataset, val_dataset, val_fraction, text_column,
                                                    max_train_stories, max_val_stories, seed, calibration_stories))
        stories = loaded[role]
        marked = add_words_lines(stories, words_lines, seed) if words_lines and role == "train" else stories
        return encoded_stories(marked, tokenizer, num_workers, f"encoding {role} stories", stories.total_bytes)

    # The key names everything the stream depends on: change any of it and it is encoded anew.
    # held_out_by: caches made before hold_out (which draws another share) are not reused.
    base_key = {"tokenizer": tokenizer.fingerprint(), "column": text_column, "seed": seed,
                "val_dataset": source_name(val_dataset), "val_fraction": val_fraction, "held_out_by": "hold_out"}
    roles = [("train", dataset, max_train_stories), ("validation", val_dataset or dataset, max_val_stories)]
    if calibration_stories:
        roles.append(("calibration", dataset, max_train_stories))
    windows = {}
    for role, source, max_stories in roles:
        key = {**base_key, "dataset": source_name(source), "role": role, "max_stories": max_stories}
        if calibration_stories and role != "validation":  # (only when set: the caches made before it stay valid)
            key["calibration_stories"] = calibration_stories
        if words_lines and role == "train":
            key["words_lines"] = words_lines
        tokens = cached_tokens(cache_dir, key, token_dtype(tokenizer), lambda role=role: encoded(role))
        try:
            windows[role] = TokenWindows(tokens, block_size, shift_seed=seed if role == "train" else None)
        except DataError as err:
            raise DataError(f"the {role} stories: {err}") from None
    return windows
