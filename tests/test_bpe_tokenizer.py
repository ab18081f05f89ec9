"""BPETokenizer: byte-level BPE checked against the plain trainer learn_merges_simple, GPT-2's published
files, Hugging Face `tokenizers` and `tiktoken`."""

import json
import pickle
import random
import signal
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bpe_tokenizer
import tokenizer_workers
from bpe_tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    BPETokenizer,
    TokenizerFileError,
    bytes_to_text,
    count_pre_tokens,
    learn_merges,
    learn_merges_simple,
    text_to_bytes,
)
from hf_interop import save_hf_tokenizer, tokenizer_from_gpt2_files

CORPUS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "One day, Lily's mom said: \"Don't go far!\" Lily smiled. \"I won't, Mom.\"",
    "Tom had 3 red balls and 12 blue ones. He gave 2 to his friend Sam.",
    "The cat sat on the mat.\nThe dog sat on the log.\n\nThey were happy.",
    "Ben ran and ran — faster than the wind! 🐶 “Wow,” said Ben’s dad.",
]
TRICKY_TEXTS = [
    "",
    " ",
    "\n\n\n",
    "hello   world  ",
    "it's they're we've I'm you'll he'd IT'S",
    "1234567 3.14159 -42",
    "naïve café 東京 Привет مرحبا 🙂👍🏽 e\u0301",
    "\t tabs\tand\r\nwindows\r\nlines",
    "<|endoftext|>",
    "a<|endoftext|>b<user>c<assistant><system>d",
    "<|endoftext|><|endoftext|>",
    " <user> hi </user> <|endof text|> <|endoftext",
    "\x00\x01\x7f\u200b\ufeff",
]


@pytest.fixture(scope="module")
def small_tokenizer() -> BPETokenizer:
    return BPETokenizer.train(CORPUS * 3, vocab_size=400)


def simple_merges(texts, vocab_size, special_tokens):
    """The merges train must learn: learn_merges_simple, the plain trainer that recounts every
    pair at every step, on the corpus's pre-token counts (counted once, on one process)."""
    word_counts = count_pre_tokens(texts, special_tokens=special_tokens, num_workers=1)
    return learn_merges_simple(word_counts, vocab_size - 256 - len(special_tokens))


# ------------------------------------------------------------------------ round trip

@given(st.text())
def test_decode_inverts_encode_for_any_unicode(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TRICKY_TEXTS + CORPUS)
def test_round_trip_on_tricky_text(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_base_vocabulary_is_all_256_bytes_so_nothing_is_out_of_vocabulary(small_tokenizer):
    assert all(small_tokenizer.vocab[b] == bytes([b]) for b in range(256))
    unseen = "Zyzzyva 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x07"
    ids = small_tokenizer.encode(unseen)
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)
    assert small_tokenizer.decode(ids) == unseen


def test_empty_text_gives_no_tokens(small_tokenizer):
    assert small_tokenizer.encode("") == []
    assert small_tokenizer.decode([]) == ""
    assert list(small_tokenizer.encode_iterable([])) == []
    assert small_tokenizer.encode_batch([]) == []


def test_decode_of_a_partial_character_gives_replacement_not_an_error(small_tokenizer):
    ids = small_tokenizer.encode("🦒")  # not in CORPUS, so four byte tokens
    assert len(ids) > 1
    assert small_tokenizer.decode(ids[:1]) == "\ufffd"
    assert small_tokenizer.decode_bytes(ids) == "🦒".encode()


def test_decode_accepts_tensors_and_rejects_unknown_ids(small_tokenizer):
    ids = small_tokenizer.encode("The cat sat.")
    assert small_tokenizer.decode(torch.tensor(ids)) == "The cat sat."
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small_tokenizer.decode([small_tokenizer.vocab_size])


def test_encode_rejects_non_strings(small_tokenizer):
    with pytest.raises(TypeError, match="takes a str"):
        small_tokenizer.encode(b"bytes")


# ---------------------------------------------------------------- special tokens

def test_special_tokens_are_single_ids_in_every_position(small_tokenizer):
    eot, user, assistant, system = (small_tokenizer.special_tokens[s] for s in DEFAULT_SPECIAL_TOKENS)
    encode = small_tokenizer.encode
    assert encode("<|endoftext|>") == [eot]
    assert encode("<|endoftext|>The cat")[0] == eot
    assert encode("The cat<|endoftext|>")[-1] == eot
    assert encode("The cat<|endoftext|>sat") == [*encode("The cat"), eot, *encode("sat")]
    assert encode("<user><assistant><system><|endoftext|>") == [user, assistant, system, eot]
    assert encode("<user>hi<assistant>") == [user, *encode("hi"), assistant]


def test_special_tokens_take_the_last_ids_of_a_trained_vocabulary(small_tokenizer):
    assert list(small_tokenizer.special_tokens.values()) == list(range(396, 400))
    assert small_tokenizer.vocab[396] == b"<|endoftext|>"


def test_special_text_is_plain_text_when_not_allowed(small_tokenizer):
    ids = small_tokenizer.encode("a<|endoftext|>b", allowed_special="none")
    assert small_tokenizer.special_tokens["<|endoftext|>"] not in ids
    assert small_tokenizer.decode(ids) == "a<|endoftext|>b"
    only_user = small_tokenizer.encode("<user><|endoftext|>", allowed_special={"<user>"})
    assert only_user[0] == small_tokenizer.special_tokens["<user>"]
    assert small_tokenizer.special_tokens["<|endoftext|>"] not in only_user
    with pytest.raises(ValueError, match="not special tokens"):
        small_tokenizer.encode("x", allowed_special={"<nope>"})


def test_longest_special_token_wins_when_one_is_a_prefix_of_another():
    tokenizer = BPETokenizer.train(CORPUS, vocab_size=300, special_tokens=["<a>", "<a>b"])
    short, long = tokenizer.special_tokens["<a>"], tokenizer.special_tokens["<a>b"]
    assert tokenizer.encode("<a>b<a>c") == [long, short, *tokenizer.encode("c")]


def test_special_token_text_never_comes_out_of_merges():
    corpus = ["x <user> y <user> z"] * 50
    tokenizer = BPETokenizer.train(corpus, vocab_size=300)
    assert b"<user>" not in {a + b for a, b in tokenizer.merges}
    plain = tokenizer.encode("<user>", allowed_special="none")
    assert len(plain) > 1


def test_tokens_and_ids_map_both_ways(small_tokenizer):
    assert small_tokenizer.token_to_id("<user>") == small_tokenizer.special_tokens["<user>"]
    the = small_tokenizer.token_to_id(" the")
    assert small_tokenizer.id_to_token(the) == b" the"
    assert small_tokenizer.token_to_id(b" the") == the
    with pytest.raises(KeyError):
        small_tokenizer.token_to_id("not one token at all")
    with pytest.raises(KeyError):
        small_tokenizer.id_to_token(10**6)


# ------------------------------------------------------------------------ training

def test_training_matches_the_slow_reference_trainer_on_real_sentences():
    tokenizer = BPETokenizer.train(CORPUS, vocab_size=400)
    assert tokenizer.merges == simple_merges(CORPUS, 400, DEFAULT_SPECIAL_TOKENS)
    assert tokenizer.vocab_size == 400


@given(st.lists(st.text(alphabet="ab c\n'1!é<>", max_size=40), max_size=12), st.integers(256, 330))
def test_training_matches_the_slow_reference_trainer_ties_included(texts, vocab_size):
    tokenizer = BPETokenizer.train(texts, vocab_size=vocab_size, special_tokens=[])
    assert tokenizer.merges == simple_merges(texts, vocab_size, [])


def test_simple_trainer_gives_the_merges_of_its_worked_example():
    merges = learn_merges_simple({"aaabdaaabac": 1}, 4)
    assert merges == [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b"), (b"d", b"aaab")]
    assert learn_merges({"aaabdaaabac": 1}, 4) == merges


def test_fast_and_simple_trainers_agree_on_the_same_counts(shared_train_file):
    text = shared_train_file.read_text(encoding="utf-8")
    stories = [s for s in text.split("<|endoftext|>") if s.strip()][:100]
    word_counts = count_pre_tokens(stories, num_workers=1)
    assert learn_merges(word_counts, 300) == learn_merges_simple(word_counts, 300)
    few_counts = count_pre_tokens(stories[:10], num_workers=1)
    assert learn_merges(few_counts, 10**6) == learn_merges_simple(few_counts, 10**6)  # until no pair is left


def test_vocab_size_counts_bytes_merges_and_special_tokens():
    tokenizer = BPETokenizer.train(CORPUS, vocab_size=300, special_tokens=["<|endoftext|>"])
    assert tokenizer.vocab_size == len(tokenizer.vocab) == 300
    assert len(tokenizer.merges) == 300 - 256 - 1
    with pytest.raises(ValueError, match="at least 256 bytes"):
        BPETokenizer.train(CORPUS, vocab_size=259)


def test_training_stops_early_when_no_pair_is_left():
    tokenizer = BPETokenizer.train(["ab ab ab"], vocab_size=1000, special_tokens=[])
    assert [a + b for a, b in tokenizer.merges] == [b"ab", b" ab"]
    assert tokenizer.vocab_size == 258


def test_training_is_deterministic_and_the_same_on_several_processes(monkeypatch):
    stories = CORPUS * 40
    serial = BPETokenizer.train(stories, vocab_size=500, num_workers=1)
    assert BPETokenizer.train(stories, vocab_size=500, num_workers=1).merges == serial.merges
    monkeypatch.setattr(bpe_tokenizer, "PARALLEL_MIN_CHARS", 4000)  # batches of 1,000 characters
    parallel = BPETokenizer.train(iter(stories), vocab_size=500, num_workers=2)
    assert parallel.merges == serial.merges


def test_training_on_real_stories_matches_the_reference(shared_train_file):
    text = shared_train_file.read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:200]
    assert BPETokenizer.train(stories, vocab_size=600).merges == simple_merges(stories, 600, DEFAULT_SPECIAL_TOKENS)


# ---------------------------------------------------------- GPT-2 and Hugging Face

def hf_gpt2_tokenizer(vocab, merges):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


@pytest.fixture(scope="module")
def gpt2_pair(gpt2_files):
    return tokenizer_from_gpt2_files(*gpt2_files), hf_gpt2_tokenizer(*gpt2_files)


def test_gpt2_files_give_gpt2s_vocabulary(gpt2_pair):
    ours, _ = gpt2_pair
    assert ours.vocab_size == 50257
    assert ours.special_tokens == {"<|endoftext|>": 50256}
    assert ours.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", TRICKY_TEXTS + CORPUS)
def test_gpt2_encoding_equals_hugging_face_on_tricky_text(gpt2_pair, text):
    ours, hf = gpt2_pair
    assert ours.encode(text) == hf.encode(text).ids


@given(st.text(max_size=200))
def test_gpt2_encoding_equals_hugging_face_on_any_text(gpt2_pair, text):
    ours, hf = gpt2_pair
    assert ours.encode(text) == hf.encode(text).ids


def test_gpt2_encoding_equals_hugging_face_on_real_stories(gpt2_pair, shared_train_file):
    ours, hf = gpt2_pair
    stories = shared_train_file.read_text(encoding="utf-8").split("<|endoftext|>")[:300]
    assert [ours.encode(s) for s in stories] == [e.ids for e in hf.encode_batch(stories)]


def test_extra_special_tokens_follow_gpt2s_vocabulary(gpt2_files):
    tokenizer = tokenizer_from_gpt2_files(*gpt2_files, special_tokens=DEFAULT_SPECIAL_TOKENS)
    assert tokenizer.special_tokens == {"<|endoftext|>": 50256, "<user>": 50257, "<assistant>": 50258, "<system>": 50259}


@pytest.fixture(scope="module")
def hf_copy_of_small(small_tokenizer, tmp_path_factory):
    """small_tokenizer written with save_hf_tokenizer and read back by Hugging Face tokenizers."""
    from tokenizers import Tokenizer

    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    save_hf_tokenizer(small_tokenizer, path)
    return Tokenizer.from_file(str(path))


def test_hugging_face_tokenizer_json_encodes_identically(small_tokenizer, hf_copy_of_small):
    for text in TRICKY_TEXTS + CORPUS:
        assert hf_copy_of_small.encode(text).ids == small_tokenizer.encode(text), text
        assert hf_copy_of_small.decode(small_tokenizer.encode(text), skip_special_tokens=False) == text


@given(st.text(max_size=200))
def test_hugging_face_tokenizer_json_encodes_identically_on_any_text(small_tokenizer, hf_copy_of_small, text):
    assert hf_copy_of_small.encode(text).ids == small_tokenizer.encode(text)


def test_tiktoken_built_from_our_merges_encodes_identically(small_tokenizer, shared_train_file):
    tiktoken = pytest.importorskip("tiktoken")
    special_ids = set(small_tokenizer.special_tokens.values())
    encoding = tiktoken.Encoding(
        name="ours",
        pat_str=small_tokenizer.pattern,
        mergeable_ranks={t: i for i, t in small_tokenizer.vocab.items() if i not in special_ids},
        special_tokens=small_tokenizer.special_tokens,
    )
    stories = shared_train_file.read_text(encoding="utf-8").split("<|endoftext|>")[:200]
    for text in TRICKY_TEXTS + CORPUS + stories:
        assert encoding.encode(text, allowed_special="all") == small_tokenizer.encode(text)


# ----------------------------------------------------------------- save and load

def test_save_then_load_is_the_same_tokenizer(small_tokenizer, tmp_path):
    path = tmp_path / "tok.json"
    small_tokenizer.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.vocab == small_tokenizer.vocab
    assert loaded.merges == small_tokenizer.merges
    assert loaded.special_tokens == small_tokenizer.special_tokens
    assert loaded.pattern == small_tokenizer.pattern
    for text in TRICKY_TEXTS + CORPUS:
        assert loaded.encode(text) == small_tokenizer.encode(text)


def test_saved_file_is_readable_json_with_merges_as_text(small_tokenizer, tmp_path):
    path = tmp_path / "tok.json"
    small_tokenizer.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert ["Ġ", "t"] in data["merges"]  # b" " + b"t": GPT-2's printable form of a space
    assert '  ["Ġ", "t"],\n' in path.read_text(encoding="utf-8")  # one merge per line


def test_gpt2_tokenizer_survives_save_and_load(gpt2_pair, tmp_path):
    ours, _ = gpt2_pair
    ours.save(tmp_path / "gpt2.json")
    loaded = BPETokenizer.load(tmp_path / "gpt2.json")
    assert loaded.vocab == ours.vocab and loaded.special_tokens == ours.special_tokens
    assert loaded.encode(CORPUS[1]) == ours.encode(CORPUS[1])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "tinystories-transformer/bpe-tokenizer", "vers', "not valid JSON"),
        ('{"model": {"type": "BPE"}}', "not a tokenizer file"),
        ('{"format": "tinystories-transformer/bpe-tokenizer", "version": 99}', "version 99"),
        ('{"format": "tinystories-transformer/bpe-tokenizer", "version": 1, "vocab": ["a"]}', "malformed"),
    ],
)
def test_bad_tokenizer_files_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=message) as err:
        BPETokenizer.load(path)
    assert str(path) in str(err.value)


def test_an_unknown_split_pattern_is_refused_before_it_runs(small_tokenizer, tmp_path):
    data = small_tokenizer.to_dict()
    data["pattern"] = "(a|aa)+b|."  # backtracks for minutes on "aaaa...a"
    path = tmp_path / "crafted.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"crafted.json: malformed tokenizer file: the split pattern is not one "
                                                 r"of KNOWN_SPLIT_PATTERNS \(GPT-2\): refused"):
        BPETokenizer.load(path)
    with pytest.raises(ValueError, match="KNOWN_SPLIT_PATTERNS"):  # nor in code, before any counting
        BPETokenizer.train(["aaaa"] * 10**6, vocab_size=300, pattern=data["pattern"])


def test_worker_processes_leave_ctrl_c_to_the_parent():
    """The parent's pool ends the workers; a worker that took Ctrl-C too would print its own traceback."""
    with tokenizer_workers.pool(1) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN


def test_truncated_and_missing_files_get_a_clear_error(small_tokenizer, tmp_path):
    path = tmp_path / "tok.json"
    small_tokenizer.save(path)
    path.write_text(path.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="truncated"):
        BPETokenizer.load(path)
    with pytest.raises(TokenizerFileError, match="no such file"):
        BPETokenizer.load(tmp_path / "missing.json")


def test_constructor_rejects_inconsistent_vocabularies():
    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ValueError, match="not in the vocabulary"):
        BPETokenizer(vocab, [(b"a", b"b")])
    with pytest.raises(ValueError, match="all 256 bytes"):
        BPETokenizer({i: bytes([i]) for i in range(255)}, [])
    with pytest.raises(ValueError, match="twice"):
        BPETokenizer({**vocab, 256: b"a"}, [])


def test_byte_to_text_map_is_reversible():
    every_byte = bytes(range(256))
    assert text_to_bytes(bytes_to_text(every_byte)) == every_byte
    assert bytes_to_text(b" the") == "Ġthe"


def test_pickling_keeps_the_tokenizer_but_not_its_cache(small_tokenizer):
    small_tokenizer.encode("warm the cache")
    clone = pickle.loads(pickle.dumps(small_tokenizer))
    assert len(clone._cache) == 0
    assert clone.encode(CORPUS[0]) == small_tokenizer.encode(CORPUS[0])


# ------------------------------------------------------------- batches and streams

def test_encode_batch_on_processes_equals_encode(small_tokenizer, monkeypatch):
    texts = CORPUS * 20 + TRICKY_TEXTS
    monkeypatch.setattr(bpe_tokenizer, "PARALLEL_MIN_CHARS", 0)
    assert small_tokenizer.encode_batch(texts, num_workers=2) == [small_tokenizer.encode(t) for t in texts]
    assert small_tokenizer.encode_batch(texts, num_workers=2, allowed_special="none") == [
        small_tokenizer.encode(t, allowed_special="none") for t in texts
    ]


STREAM_PIECES = ["a", "b", " ", "  ", "\n", "'", "ll", "1", "!", "é", "🙂", "<|endoftext|>", "<user>", "<|end", "oftext|>", "<"]
stream_text = st.lists(st.sampled_from(STREAM_PIECES)).map("".join)


@given(stream_text, st.lists(st.integers(0, 60), max_size=8), st.sampled_from(["all", "none"]))
def test_encode_iterable_equals_encode_whatever_the_pieces(small_tokenizer, monkeypatch_stream, text, cuts, allowed):
    cuts = sorted(c for c in cuts if c <= len(text))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=False)]
    assert list(small_tokenizer.encode_iterable(pieces, allowed)) == small_tokenizer.encode(text, allowed)


@pytest.fixture(scope="module")
def monkeypatch_stream():
    """Tiny stream blocks, so that the hypothesis texts above cross many block edges."""
    old = bpe_tokenizer.STREAM_BLOCK_CHARS
    bpe_tokenizer.STREAM_BLOCK_CHARS = 5
    yield
    bpe_tokenizer.STREAM_BLOCK_CHARS = old


@pytest.mark.parametrize("with_separators", [True, False])
def test_encode_iterable_streams_a_large_file_in_bounded_memory(small_tokenizer, tmp_path, monkeypatch, with_separators):
    monkeypatch.setattr(bpe_tokenizer, "STREAM_BLOCK_CHARS", 8192)
    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "ran", "happy", "Lily", "Tom", "said", "big", "small", "tree", "42", '"yes"', "—", "🙂"]
    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < 2_000_000:
            story = " ".join(rng.choice(words) for _ in range(120)) + ".\n"
            f.write(story + ("<|endoftext|>\n" if with_separators else "  \n"))
    tracemalloc.start()
    count, checksum = 0, 0
    with open(path, encoding="utf-8") as f:
        for token in small_tokenizer.encode_iterable(f):
            count += 1
            checksum = (checksum * 31 + token) % 1_000_000_007
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 500_000, f"peak {peak:,} bytes while streaming a 2 MB file"
    expected = small_tokenizer.encode(path.read_text(encoding="utf-8"))
    assert count == len(expected)
    reference = 0
    for token in expected:
        reference = (reference * 31 + token) % 1_000_000_007
    assert checksum == reference


# ------------------------------------------------- streams of batches on processes

ASCII = "".join(map(chr, range(128)))


@given(st.lists(st.sampled_from([*ASCII, "aa", "  ", "'ll", "12", "!?"]), max_size=40).map("".join))
def test_the_ascii_pre_tokenizer_splits_ascii_text_as_the_unicode_pattern_does(text):
    unicode_split = bpe_tokenizer.regex.compile(bpe_tokenizer.GPT2_SPLIT_PATTERN).findall
    assert bpe_tokenizer.pre_tokenizer(bpe_tokenizer.GPT2_SPLIT_PATTERN)(text) == unicode_split(text)


def test_the_ascii_pre_tokenizer_agrees_on_every_pair_of_ascii_characters_in_context():
    split = bpe_tokenizer.pre_tokenizer(bpe_tokenizer.GPT2_SPLIT_PATTERN)
    unicode_split = bpe_tokenizer.regex.compile(bpe_tokenizer.GPT2_SPLIT_PATTERN).findall
    for a in ASCII:
        text = " ".join(a + b + "x" for b in ASCII)
        assert split(text) == unicode_split(text)
    assert split("café 12") == unicode_split("café 12")  # not ASCII: the Unicode pattern itself


def test_encode_arrays_on_processes_equal_encode_with_a_separator(small_tokenizer):
    texts = CORPUS * 30 + TRICKY_TEXTS
    batches = list(tokenizer_workers.batched_texts(texts, max_chars=500))
    expected = [token for text in texts for token in [*small_tokenizer.encode(text, "none"), 7]]
    for workers in (1, 2):
        arrays = list(tokenizer_workers.encode_arrays(small_tokenizer, iter(batches), separator=7, num_workers=workers))
        assert len(arrays) == len(batches) and all(a.dtype == np.uint16 for a in arrays)
        assert [int(t) for a in arrays for t in a] == expected
    assert tokenizer_workers.encode_to_array(small_tokenizer, []).tolist() == []


def test_counting_a_stream_on_processes_equals_counting_it_here(small_tokenizer):
    texts = CORPUS * 40 + TRICKY_TEXTS
    here = count_pre_tokens(texts, special_tokens=DEFAULT_SPECIAL_TOKENS, num_workers=1)
    old = tokenizer_workers.BATCH_CHARS
    try:
        tokenizer_workers.BATCH_CHARS = 300  # many batches, so the workers really share them
        streamed = count_pre_tokens(iter(texts), special_tokens=DEFAULT_SPECIAL_TOKENS, num_workers=2)
    finally:
        tokenizer_workers.BATCH_CHARS = old
    assert streamed == here


def test_map_batches_reads_a_stream_only_as_fast_as_the_workers_use_it():
    pulled = []

    def stream():
        for i in range(1000):
            pulled.append(i)
            yield [str(i)]

    results = tokenizer_workers.map_batches(len, len, stream(), num_workers=2)
    assert next(results) == 1
    assert len(pulled) <= 2 * 2 + 1  # two batches per worker in flight, not the whole stream
    assert sum(results) == 999 and len(pulled) == 1000
