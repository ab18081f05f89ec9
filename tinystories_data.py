"""The one place that loads story data, for every script and notebook.

load_stories(dataset, split, text_column, sample, seed) -> list[str]

`dataset` is a Hugging Face hub id (default roneneldan/TinyStories) or a local path:
- a .txt file of stories separated by <|endoftext|> (TinyStories' own release format);
- a .json, .jsonl, .parquet or .csv file with a text column;
- a folder of such files: files whose names contain "train", "valid"/"validation"/"val"/
  "dev" or "test" form those splits (the Hugging Face convention; ../shared/data's
  tinystories_train.txt and tinystories_valid.txt are "train" and "validation"); if no
  name says, every file is "train";
- a folder written by datasets' save_to_disk (a Dataset, or a DatasetDict of splits).
A single file is one split, "train".

Everything goes through `datasets`, so one seeded sample serves every source.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import datasets

DEFAULT_DATASET = "roneneldan/TinyStories"
STORY_SEPARATOR = "<|endoftext|>"
LOCAL_EXAMPLE = "../shared/data/tinystories_train.txt"

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


def load_stories(
    dataset: str = DEFAULT_DATASET, split: str = "train", text_column: str = "text", sample: int = 0, seed: int = 0
) -> list[str]:
    """The stories of one split, stripped of surrounding whitespace, empty ones dropped.

    sample > 0 returns that many stories drawn at random (seeded; the same seed gives the
    same stories); 0 returns all of them, in order.
    """
    table = load_split(dataset, split)
    if text_column not in table.column_names:
        raise DataError(f"{dataset}: no column {text_column!r} (columns: {table.column_names}); pass --text_column")
    if sample and sample < len(table):
        table = table.shuffle(seed=seed).select(range(sample))
    stories = [text.strip() for text in table[text_column] if isinstance(text, str) and text.strip()]
    if not stories:
        raise DataError(f"{dataset}: no stories in split {split!r}, column {text_column!r} (all empty)")
    return stories


def load_split(dataset: str, split: str = "train") -> datasets.Dataset:
    """One split of a hub data set or of a local path, as a datasets.Dataset."""
    path = Path(dataset).expanduser()
    if path.exists():
        return _load_local(path, split)
    if _looks_like_path(dataset):
        raise DataError(f"{dataset}: no such file or folder")
    return _load_from_hub(dataset, split)


def read_story_file(path: str | os.PathLike) -> Iterator[str]:
    """Stream the stories of a text file, cut at every <|endoftext|>, one line at a time."""
    story: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            *finished, rest = line.split(STORY_SEPARATOR)
            for part in finished:
                story.append(part)
                yield "".join(story)
                story = []
            story.append(rest)
    yield "".join(story)


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


def _load_local(path: Path, split: str) -> datasets.Dataset:
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _load_saved(path, split)
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
        return _load_files(by_split[wanted], str(path))
    if path.suffix.lower() not in DATA_FILE_BUILDERS:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(DATA_FILE_BUILDERS)}")
    if _canonical_split(split) != "train":
        raise SplitNotFoundError(f"{path}: a single file is one split ('train'), so it has no {split!r} split")
    return _load_files([path], str(path))


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


# ----------------------------------------------------------- command-line plumbing

def run_script(main: Callable[[], object], user_errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> None:
    """Run a script's main(). A user error (a bad path, a damaged file, data that cannot be
    used) prints one line, `error: ...`, and exits with status 1; Ctrl-C exits with 130."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
