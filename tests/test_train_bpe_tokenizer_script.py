"""train_bpe_tokenizer_hf.py end to end, as a user runs it."""

import subprocess
import sys

import pytest

import tinystories_data
import train_bpe_tokenizer_hf
from bpe_tokenizer import BPETokenizer
from common import run_script
from conftest import REPO

STORIES = [f"Once upon a time, a little {animal} named {name} found {n} shiny stones." for n, (animal, name) in
           enumerate([("cat", "Mia"), ("dog", "Rex"), ("bird", "Tweet"), ("fox", "Red"), ("frog", "Hop")] * 12)]


def run(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "train_bpe_tokenizer_hf.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def story_file(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES), encoding="utf-8")
    return path


def test_trains_saves_into_new_folders_and_reports(story_file, tmp_path):
    result = run("--dataset", str(story_file), "--vocab_size", "300", "--heldout", "5",
                 "--output", "new/tok.json", "--hf_output", "hf.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "training on 55 stories" in out
    assert "vocab_size 300 (40 merges, 4 special tokens)" in out
    assert "compression on 5 held-out stories:" in out and "bytes per token" in out
    assert "first merges:" in out
    tokenizer = BPETokenizer.load(tmp_path / "new" / "tok.json")
    assert tokenizer.vocab_size == 300

    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tmp_path / "hf.json"))
    assert hf.encode(STORIES[3] + "<|endoftext|>").ids == tokenizer.encode(STORIES[3] + "<|endoftext|>")


@pytest.mark.parametrize("heldout, held", [("2", 2), ("500", 40)])  # 500: more than the file has beyond the sample
def test_sample_trains_on_that_many_stories_and_holds_out_what_it_can(story_file, tmp_path, heldout, held):
    result = run("--dataset", str(story_file), "--vocab_size", "280", "--sample", "20", "--heldout", heldout,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "training on 20 stories" in result.stdout and f"compression on {held} held-out stories" in result.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--dataset", "missing.txt"], 1, "error: missing.txt: no such file or folder"),
        (["--vocab_size", "100"], 2, "--vocab_size 100 is below 256 bytes + 4 special tokens = 260"),
        (["--special_tokens", "<a>", "<a>"], 2, "--special_tokens must be distinct"),
    ],
)
def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(tmp_path, args, code, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bpe_tokenizer.json").exists()


def test_unreachable_hub_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(tinystories_data, "_hub_reachable", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train_bpe_tokenizer_hf.main(["--sample", "100"]))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: cannot reach the Hugging Face hub") and "\n" not in error


def test_the_held_out_stories_are_the_draw_the_training_script_holds_out(story_file, tmp_path, monkeypatch):
    """On data without a validation split, --heldout 6 sets aside the 6 stories that the
    training script's --val_fraction 0.1 takes for validation: one seeded draw, streamed."""
    measured = []
    monkeypatch.setattr(train_bpe_tokenizer_hf, "bytes_per_token", lambda tokenizer, texts: measured.append(texts) or 1.0)
    train_bpe_tokenizer_hf.main(["--dataset", str(story_file), "--vocab_size", "280", "--heldout", "6", "--seed", "3",
                                 "--output", str(tmp_path / "tok.json")])
    validation = tinystories_data.load_train_and_validation(str(story_file), val_fraction=0.1, seed=3)["validation"]
    assert measured == [list(validation)]
    assert measured[0] == tinystories_data.hold_out(tinystories_data.load_stories(str(story_file)), 6, seed=3)[1]
