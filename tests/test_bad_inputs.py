"""Bad flags, paths and files, as a new user gives them, against every script: each is refused
before any work starts, with one line that names the flag or the file and its rule, a non-zero
exit and no traceback. NaN and infinity count as bad wherever a number has a range; an output
path that cannot be written is refused before the work that would end in it."""

import subprocess
import sys

import pytest

from conftest import REPO
from helpers import write_story_corpus

# Each script with the flags it needs to get as far as checking the bad one.
SCRIPTS = {
    "train_tinystories_model.py": ["--dataset", "../shared/data"],
    "train_tinystories_chat_model.py": ["--base_model", "pretrained/tinystories_base.pth",
                                        "--from_stories", "../shared/data"],
    "generate_tinystories_text.py": ["--max_new_tokens", "5"],
    "chat_with_tinystories_model.py": [],
    "train_bpe_tokenizer_hf.py": ["--dataset", "../shared/data"],
}
CASES = [  # (script, the bad flag, the words of its line, exit status: 2 for argparse's usage errors, 1 for others)
    ("train_tinystories_model.py", "--seed -1", "--seed must be 0 or more, not -1", 2),
    ("train_tinystories_model.py", "--val_fraction 1.5", "--val_fraction must be in (0, 1), not 1.5", 2),
    ("train_tinystories_model.py", "--max_train_stories -1", "--max_train_stories must be 0 or more", 2),
    ("train_tinystories_model.py", "--sample_tokens -1", "--sample_tokens must be 0 or more", 2),
    ("train_tinystories_model.py", "--max_steps -5", "--max_steps must be 0 or more", 2),
    ("train_tinystories_model.py", "--patience -1", "--patience must be 0 or more", 2),
    ("train_tinystories_model.py", "--eval_batches -1", "--eval_batches must be 0 or more", 2),
    ("train_tinystories_model.py", "--max_time_minutes -1", "--max_time_minutes must be 0 or more", 2),
    ("train_tinystories_model.py", "--warmup_steps -10", "--warmup_steps must be 0 or more", 2),
    ("train_tinystories_model.py", "--learning_rate nan", "--learning_rate must be a positive number, not nan", 2),
    ("train_tinystories_model.py", "--weight_decay inf", "--weight_decay must be 0 or more, not inf", 2),
    ("train_tinystories_model.py", "--beta2 1.0", "--beta2 must be in [0, 1)", 2),
    ("train_tinystories_model.py", "--grad_clip nan", "--grad_clip must be 0 or more", 2),
    ("train_tinystories_model.py", "--warmdown_fraction nan", "--warmdown_fraction must be in (0, 1]", 2),
    ("train_tinystories_model.py", "--calibration_stories -1", "--calibration_stories must be 0 or more", 2),
    ("train_tinystories_model.py", "--words_lines 1.5", "--words_lines must be in [0, 1], not 1.5", 2),
    ("train_tinystories_chat_model.py", "--checkable_weight inf", "--checkable_weight must be 0 or more, not inf", 2),
    ("train_tinystories_chat_model.py", "--swapped_words 1.5", "--swapped_words must be in [0, 1], not 1.5", 2),
    ("train_tinystories_chat_model.py", "--requested_weight -1", "--requested_weight must be 0 or more, not -1", 2),
    ("train_tinystories_chat_model.py", "--max_train_conversations -3", "--max_train_conversations must be 0 or", 2),
    ("train_tinystories_chat_model.py", "--val_fraction nan", "--val_fraction must be in (0, 1), not nan", 2),
    ("generate_tinystories_text.py", "--temperature nan", "--temperature must be a finite number >= 0", 2),
    ("generate_tinystories_text.py", "--temperature inf", "--temperature must be a finite number >= 0", 2),
    ("generate_tinystories_text.py", "--repetition_penalty nan", "--repetition_penalty must be a finite number", 2),
    ("generate_tinystories_text.py", "--length_penalty nan", "--length_penalty must be a finite number, not nan", 2),
    ("generate_tinystories_text.py", "--top_p nan", "--top_p must be in (0, 1], not nan", 2),
    ("chat_with_tinystories_model.py", "--temperature nan", "temperature must be a finite number >= 0", 1),
]


def run_cli(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def assert_one_error_line(result: subprocess.CompletedProcess, status: int, words: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and words in errors[0], result.stderr


@pytest.mark.parametrize("script, flag, words, status", CASES, ids=[f"{case[0]} {case[1]}" for case in CASES])
def test_a_bad_flag_is_one_clear_line(script, flag, words, status, tmp_path):
    output = ["--output_dir", str(tmp_path / "out")] if script.startswith("train_tiny") else []
    assert_one_error_line(run_cli(script, *SCRIPTS[script], *flag.split(), *output), status, words)
    assert not (tmp_path / "out").exists()  # refused before the run began


# (script, the bad path flag with {file} for an existing file and {folder} for an existing folder,
# the words of its line). Each is refused by argparse (exit 2).
PATH_CASES = [
    ("train_tinystories_model.py", "--output_dir {file}", "--output_dir {file}: it is a file; give a folder"),
    ("train_tinystories_model.py", "--release_to {folder}", "--release_to {folder}: it is a folder; give a file name"),
    ("train_tinystories_model.py", "--release_to {file}/model.pth", "{file} is a file, not a folder"),
    ("train_tinystories_model.py", "--log_dir {file}/runs", "--log_dir {file}/runs: {file} is a file, not a folder"),
    ("train_tinystories_model.py", "--cache_dir {file}", "--cache_dir {file}: it is a file; give a folder"),
    ("train_tinystories_chat_model.py", "--release_to {folder}", "--release_to {folder}: it is a folder"),
    ("train_bpe_tokenizer_hf.py", "--output {folder}", "--output {folder}: it is a folder; give a file name"),
    ("train_bpe_tokenizer_hf.py", "--hf_output {file}/tokenizer.json", "{file} is a file, not a folder"),
]


@pytest.mark.parametrize("script, flag, words", PATH_CASES, ids=[f"{case[0]} {case[1]}" for case in PATH_CASES])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(script, flag, words, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    names = {"file": tmp_path / "a_file", "folder": tmp_path / "a_folder"}
    output = [] if "--output_dir" in flag or not script.startswith("train_tiny") else ["--output_dir", str(tmp_path / "out")]
    result = run_cli(script, *SCRIPTS[script], *output, *flag.format(**names).split())
    assert_one_error_line(result, 2, words.format(**names))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]  # nothing written
    assert list((tmp_path / "a_folder").iterdir()) == []


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "prompt.txt").write_bytes("Once upon a time, Zoë".encode("latin-1"))
    result = run_cli("generate_tinystories_text.py", "--prompt_file", str(tmp_path / "prompt.txt"))
    assert_one_error_line(result, 1, f"--prompt_file {tmp_path / 'prompt.txt'}: not UTF-8 text; save it as UTF-8")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished two-step run of the base script on a small corpus, with its data cache."""
    folder = tmp_path_factory.mktemp("run")
    corpus, tokenizer = write_story_corpus(folder, train=200, valid=30), folder / "tokenizer.json"
    assert run_cli("train_bpe_tokenizer_hf.py", "--dataset", str(corpus), "--vocab_size", "400", "--output",
                      str(tokenizer)).returncode == 0
    flags = ["--dataset", str(corpus), "--tokenizer_path", str(tokenizer), "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
             "--intermediate_size", "64", "--block_size", "32", "--max_steps", "2", "--eval_batches", "1",
             "--output_dir", str(folder / "out")]
    result = run_cli("train_tinystories_model.py", *flags)
    assert result.returncode == 0, result.stderr
    return folder / "out", flags


def test_a_damaged_config_json_is_named(tiny_run):
    out, flags = tiny_run
    config = out / "config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    try:
        result = run_cli("train_tinystories_model.py", *flags)
    finally:
        config.write_text(text)
    assert_one_error_line(result, 1, f"{out} holds a run whose config.json is damaged: pass --resume")


def test_a_damaged_token_cache_is_named_with_the_fix(tiny_run, tmp_path):
    out, flags = tiny_run
    cache = sorted((out / "data_cache").glob("tokens-*.bin"))[0]
    saved = cache.read_bytes()
    cache.write_bytes(saved[: len(saved) // 2])
    try:
        result = run_cli("train_tinystories_model.py", *flags[:-1], str(tmp_path / "new"), "--cache_dir",
                            str(out / "data_cache"))
    finally:
        cache.write_bytes(saved)
    assert_one_error_line(result, 1, f"the token cache {cache} is damaged")
    assert "delete it, and it is built again" in result.stderr
