"""load_stories: every kind of source gives the same list of stories, and every failure
gives one clear DataError; StorySource streams them in bounded memory, with the same seeded
samples; hold_out: the one seeded held-out split; token streams are encoded in parallel and
cached on disk with the ids of encoding them whole."""

import json
import random

import datasets
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import chat_data
import tinystories_data
import tokenizer_workers
from helpers import story_tokenizer, write_story_corpus
from tinystories_data import (
    DataError,
    SplitNotFoundError,
    StorySource,
    cached_tokens,
    encode_stories,
    hold_out,
    load_stories,
    read_story_file,
)

STORIES = ["Once upon a time there was a cat.", "Tom saw a big dog.\nHe ran home.", "The end."]


def write_story_txt(path, stories):
    path.write_text("".join(f"{story}\n<|endoftext|>\n" for story in stories), encoding="utf-8")
    return path


def test_txt_file_is_cut_at_every_endoftext(tmp_path):
    path = write_story_txt(tmp_path / "stories.txt", STORIES)
    assert load_stories(str(path)) == STORIES


def test_separators_inside_lines_blank_stories_and_no_final_separator_are_handled(tmp_path):
    path = tmp_path / "odd.txt"
    path.write_text("  first story \n<|endoftext|>second<|endoftext|>\n\n<|endoftext|>third\n", encoding="utf-8")
    assert list(read_story_file(path)) == ["  first story \n", "second", "\n\n", "third\n"]
    assert load_stories(str(path)) == ["first story", "second", "third"]


@given(st.lists(st.sampled_from(["a", "b\n", " ", "<|endoftext|>", "<|endof", "text|>", "<", "é"]), max_size=30),
       st.integers(1, 7))
def test_a_story_file_read_in_small_blocks_is_cut_as_the_whole_text_is(tmp_path_factory, pieces, block_chars):
    path = tmp_path_factory.mktemp("blocks") / "stories.txt"
    path.write_text("".join(pieces), encoding="utf-8")
    assert list(read_story_file(path, block_chars)) == "".join(pieces).split("<|endoftext|>")


def test_a_sample_of_a_streamed_file_is_the_one_datasets_draws(tmp_path):
    stories = [f"Story number {i}." for i in range(100)]
    path = write_story_txt(tmp_path / "many.txt", stories)
    table = datasets.Dataset.from_dict({"text": list(read_story_file(path))})
    drawn = [text.strip() for text in table.shuffle(seed=4).select(range(10))["text"] if text.strip()]
    assert list(StorySource(str(path), sample=10, seed=4)) == drawn
    jsonl = tmp_path / "many.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories), encoding="utf-8")
    rows = datasets.Dataset.from_dict({"text": stories})  # no trailing empty piece: 100 rows, not 101
    assert list(StorySource(str(jsonl), sample=10, seed=4)) == rows.shuffle(seed=4).select(range(10))["text"]


def test_a_story_source_counts_its_stories_in_bytes_and_can_be_read_again(tmp_path):
    stories = ["Once upon a time.", "A café by the sea.", "The end."]
    source = StorySource(str(write_story_txt(tmp_path / "s.txt", stories)))
    assert source.story_sizes().tolist() == [len(s.encode("utf-8")) for s in stories]
    assert source.total_bytes == sum(len(s.encode("utf-8")) for s in stories)
    assert list(source) == list(source) == stories


def test_folder_files_form_splits_by_name(tmp_path):
    write_story_txt(tmp_path / "tinystories_train.txt", STORIES)
    write_story_txt(tmp_path / "tinystories_valid.txt", ["A valid story."])
    (tmp_path / "README.md").write_text("not data")
    assert load_stories(str(tmp_path)) == STORIES
    for alias in ("validation", "valid", "val"):
        assert load_stories(str(tmp_path), split=alias) == ["A valid story."]
    with pytest.raises(SplitNotFoundError, match="'test'"):
        load_stories(str(tmp_path), split="test")


def test_folder_without_split_names_is_all_train(tmp_path):
    write_story_txt(tmp_path / "a.txt", STORIES[:2])
    write_story_txt(tmp_path / "b.txt", STORIES[2:])
    assert load_stories(str(tmp_path)) == STORIES


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_table_files_are_read_through_datasets(tmp_path, suffix):
    table = datasets.Dataset.from_dict({"story": STORIES, "id": [1, 2, 3]})
    path = tmp_path / f"stories{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps([{"story": s, "id": i} for i, s in enumerate(STORIES)]), encoding="utf-8")
    elif suffix == ".jsonl":
        table.to_json(str(path))
    elif suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        table.to_csv(str(path), index=False)
    assert load_stories(str(path), text_column="story") == STORIES
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['story', 'id'\]\)"):
        load_stories(str(path))


def test_save_to_disk_folders_of_one_split_or_several(tmp_path):
    table = datasets.Dataset.from_dict({"text": STORIES})
    table.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": table, "validation": table.select([0])}).save_to_disk(str(tmp_path / "many"))
    assert load_stories(str(tmp_path / "one")) == STORIES
    assert load_stories(str(tmp_path / "many"), split="validation") == STORIES[:1]
    with pytest.raises(SplitNotFoundError, match=r"it has: \['train', 'validation'\]"):
        load_stories(str(tmp_path / "many"), split="test")


def test_a_seeded_sample_is_reproducible(tmp_path):
    stories = [f"Story number {i}." for i in range(100)]
    path = write_story_txt(tmp_path / "many.txt", stories)
    first = load_stories(str(path), sample=10, seed=1)
    assert len(first) == 10 and set(first) <= set(stories)
    assert load_stories(str(path), sample=10, seed=1) == first
    assert load_stories(str(path), sample=10, seed=2) != first
    assert load_stories(str(path), sample=1000) == stories


def test_single_file_has_only_a_train_split(tmp_path):
    path = write_story_txt(tmp_path / "stories.txt", STORIES)
    with pytest.raises(SplitNotFoundError, match="single file is one split"):
        load_stories(str(path), split="validation")


@pytest.mark.parametrize("name", ["missing.txt", "./data", "/no/such/dir", "a/b/c"])
def test_missing_paths_say_so(name):
    with pytest.raises(DataError, match="no such file or folder"):
        load_stories(name)


def test_empty_data_and_unknown_file_types_say_so(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("<|endoftext|>\n  \n<|endoftext|>\n", encoding="utf-8")
    with pytest.raises(DataError, match="no stories"):
        load_stories(str(empty))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unknown file type '\.xml'"):
        load_stories(str(tmp_path / "data.xml"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(DataError, match="not UTF-8"):
        load_stories(str(tmp_path / "bad.txt"))


def test_unreachable_hub_fails_fast_and_points_to_a_local_path(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(tinystories_data, "_hub_reachable", lambda: False)
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face hub.*local path"):
        load_stories("roneneldan/TinyStories")


def test_shared_data_folder_has_its_train_and_validation_stories(shared_train_file):
    folder = str(shared_train_file.parent)
    assert len(load_stories(folder)) == 2983
    assert len(load_stories(folder, split="validation")) == 686


# ------------------------------------------------------------------------ hold_out

ITEMS = [f"story {i}" for i in range(103)]


@pytest.mark.parametrize("held, count", [(10, 10), (0.1, 10), (0.001, 1), (0, 0)])
def test_hold_out_splits_disjointly_covers_everything_and_keeps_the_order(held, count):
    kept, held_out = hold_out(ITEMS, held, seed=7)
    assert len(held_out) == count and len(kept) == len(ITEMS) - count
    assert sorted(kept + held_out, key=ITEMS.index) == ITEMS  # together, every item exactly once
    assert not set(kept) & set(held_out)
    assert kept == sorted(kept, key=ITEMS.index) and held_out == sorted(held_out, key=ITEMS.index)


def test_hold_out_is_deterministic_for_a_seed_and_differs_across_seeds():
    assert hold_out(ITEMS, 20, seed=1) == hold_out(ITEMS, 20, seed=1)
    assert hold_out(ITEMS, 20, seed=1)[1] != hold_out(ITEMS, 20, seed=2)[1]


def test_hold_out_draws_as_the_tokenizer_script_always_has():
    """random.Random(seed).shuffle of the indices: the draw behind the tokenizer's held-out
    compression figure in README and RESULTS, so that figure stays reproducible."""
    order = list(range(len(ITEMS)))
    random.Random(0).shuffle(order)
    expected = {ITEMS[i] for i in order[:10]}
    kept, held_out = hold_out(ITEMS, 10, seed=0)
    assert set(held_out) == expected and set(kept) == set(ITEMS) - expected


def test_holding_out_everything_is_refused():
    with pytest.raises(DataError, match="too few to hold out"):
        hold_out(ITEMS[:1], 0.05, seed=0)  # a share is at least one item, and one item leaves none
    with pytest.raises(DataError, match="too few to hold out"):
        hold_out(ITEMS[:3], 3, seed=0)


# ------------------------------------------------------------------ words lines

STORIES = [
    "Once upon a time, Lily found a shiny shell on the beach. She gave the shell to her brother.",
    "Tom had a red kite. The kite flew over the garden and the happy dog barked.",
    "It was sunny.",  # fewer than three content words: stays plain
]


def test_a_words_line_names_three_of_the_storys_words_and_parses_back_as_instruct_metadata():
    marked = list(tinystories_data.add_words_lines(STORIES, share=1.0, seed=0))
    assert marked[2] == STORIES[2]
    for story, text in zip(STORIES[:2], marked[:2], strict=True):
        entry = chat_data.parse_instruct_entry(text)  # TinyStoriesInstruct's own reader
        assert entry.story == story
        assert len(set(entry.words)) == 3 and set(entry.words) <= set(tinystories_data.story_words(story))
        assert text == f"{tinystories_data.words_line(entry.words)} {story}"


def test_words_lines_mark_a_seeded_share_of_the_stories():
    stories = [f"{STORIES[0]} {i}" for i in range(400)]
    marked = list(tinystories_data.add_words_lines(stories, share=0.25, seed=3))
    share = sum(text.startswith("Words: ") for text in marked) / len(stories)
    assert 0.18 < share < 0.32
    assert marked == list(tinystories_data.add_words_lines(stories, share=0.25, seed=3))
    assert marked != list(tinystories_data.add_words_lines(stories, share=0.25, seed=4))
    assert list(tinystories_data.add_words_lines(stories, share=0.0, seed=3)) == stories


def test_words_lines_go_into_the_training_stream_only(tmp_path):
    (tmp_path / "data").mkdir()
    corpus, tokenizer = write_story_corpus(tmp_path / "data", train=60, valid=20), story_tokenizer(400)
    plain = tinystories_data.prepare_pretraining_data(tokenizer, str(corpus), 16, tmp_path / "cache")
    marked = tinystories_data.prepare_pretraining_data(tokenizer, str(corpus), 16, tmp_path / "cache", words_lines=0.5)
    assert "Words: " in tokenizer.decode(marked["train"].tokens.tolist())
    assert "Words: " not in tokenizer.decode(plain["train"].tokens.tolist())
    assert (marked["validation"].tokens == plain["validation"].tokens).all()  # validation stays plain
    assert len(list((tmp_path / "cache").glob("tokens-*.bin"))) == 3  # a stream of its own, the validation one shared


# ------------------------------------------------------------------- token streams

def test_encoding_a_streamed_corpus_on_processes_gives_the_ids_of_encoding_it_whole(tmp_path, monkeypatch):
    corpus, tokenizer = write_story_corpus(tmp_path, train=300, valid=1), story_tokenizer(400)
    monkeypatch.setattr(tinystories_data, "batched_texts", lambda texts: tokenizer_workers.batched_texts(texts, 2000))
    stream = StorySource(str(corpus / "stories_train.txt"))
    whole = []
    for story in load_stories(str(corpus / "stories_train.txt")):
        whole += [*tokenizer.encode(story, allowed_special="none"), tokenizer.special_tokens["<|endoftext|>"]]
    for workers in (1, 2):
        tokens = encode_stories(iter(stream), tokenizer, num_workers=workers)
        assert tokens.dtype == np.uint16 and tokens.tolist() == whole


def test_a_token_cache_is_written_as_it_is_encoded_and_a_cut_short_one_is_built_again(tmp_path):
    arrays = [np.arange(5, dtype=np.uint16), np.arange(3, dtype=np.uint16)]
    tokens = cached_tokens(tmp_path, {"k": 1}, np.uint16, lambda: iter(arrays))
    assert tokens.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    (record,) = tmp_path.glob("tokens-*.json")
    assert json.loads(record.read_text())["tokens"] == 8
    record.unlink()  # as if the run died after the tokens, before the record: built again
    assert cached_tokens(tmp_path, {"k": 1}, np.uint16, lambda: iter(arrays[:1])).tolist() == [0, 1, 2, 3, 4]
    (cache,) = tmp_path.glob("tokens-*.bin")
    cache.write_bytes(cache.read_bytes()[:3])
    with pytest.raises(DataError, match=r"tokens-.*\.bin is damaged .*3 bytes, not 5 tokens of uint16.*delete it"):
        cached_tokens(tmp_path, {"k": 1}, np.uint16, lambda: iter(arrays))
