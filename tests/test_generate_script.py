"""generate_tinystories_text.py end to end on a tiny checkpoint, as a user runs it."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from helpers import default_stop_signals, endless_model
from test_transformer_model import VOCAB, tiny_model, tokenizer_of_size
from transformer_model import save_checkpoint

SCRIPT = REPO / "generate_tinystories_text.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pth"
    save_checkpoint(path, tiny_model(window_size=8, initializer_range=0.3), tokenizer_of_size(VOCAB))
    return path


def run(*args, stdin=""):
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_a_prompt_is_continued(checkpoint):
    result = run("--model_path", str(checkpoint), "--prompt", "abc def", "--max_new_tokens", "12", "--seed", "0",
                 "--no-stream")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("abc def") and len(result.stdout) > len("abc def\n")


def test_streamed_and_printed_stories_are_the_same(checkpoint):
    common = ("--model_path", str(checkpoint), "--prompt", "abc", "--max_new_tokens", "20", "--seed", "3")
    assert run(*common, "--stream").stdout == run(*common, "--no-stream").stdout


def test_several_prompts_samples_and_stats(checkpoint):
    result = run("--model_path", str(checkpoint), "--prompt", "abc", "--prompt", "def", "--num_samples", "2",
                 "--max_new_tokens", "5", "--show_stats", "--no-stream")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample 1") == 2 and result.stdout.count("--- sample 2") == 2
    assert result.stderr.count("tokens/s]") == 4


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compile_makes_the_same_greedy_story(checkpoint):
    common = ("--model_path", str(checkpoint), "--prompt", "abc", "--max_new_tokens", "30", "--temperature", "0",
              "--no-stream")
    compiled = run(*common, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == run(*common).stdout


def test_beam_search_prints_the_best_beams(checkpoint):
    result = run("--model_path", str(checkpoint), "--prompt", "abc", "--num_beams", "3", "--num_samples", "2",
                 "--max_new_tokens", "6")
    assert result.returncode == 0, result.stderr
    assert "--- beam 1 (beam score" in result.stdout and "--- beam 2 (beam score" in result.stdout


def test_forced_words_are_in_every_story(checkpoint):
    result = run("--model_path", str(checkpoint), "--prompt", "abc", "--force_words", "bad, jig", "--num_samples", "2",
                 "--max_new_tokens", "20")
    assert result.returncode == 0, result.stderr
    stories = result.stdout.split("--- beam ")[1:]
    assert len(stories) == 2 and all(" bad" in story.lower() and " jig" in story.lower() for story in stories)


def test_prompt_from_stdin_an_empty_prompt_and_int8(checkpoint):
    piped = run("--model_path", str(checkpoint), "--max_new_tokens", "5", stdin="ghi jab\n")
    assert piped.returncode == 0 and piped.stdout.startswith("ghi jab")
    scratch = run("--model_path", str(checkpoint), "--prompt", "", "--max_new_tokens", "5", "--quantize", "int8")
    assert scratch.returncode == 0, scratch.stderr


@pytest.mark.parametrize("args, message", [
    (["--model_path", "missing.pth"], "error: missing.pth: no such file"),
    (["--model_path", str(SCRIPT)], "not a readable checkpoint"),
    (["--top_p", "0"], r"top_p must be in (0, 1]"),
    (["--num_beams", "2", "--num_samples", "3"], "--num_samples 3 is more than --num_beams 2"),
    (["--force_words", "bad jig", "--max_new_tokens", "1"], "shortest spellings take"),
])
def test_bad_input_is_one_clear_line(checkpoint, args, message):
    if "--model_path" not in args:
        args = ["--model_path", str(checkpoint), *args]
    result = run(*args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_without_a_released_model_it_says_which_flag_to_give(tmp_path, monkeypatch):
    import generate_tinystories_text

    monkeypatch.setattr(generate_tinystories_text, "DEFAULT_MODEL", str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="pass --model_path tinystories_model/best_model.pth"):
        generate_tinystories_text.main(["--prompt", "x"])


def test_ctrl_c_while_streaming_stops_cleanly(tmp_path):
    tokenizer = tokenizer_of_size(VOCAB)
    save_checkpoint(tmp_path / "endless.pth", endless_model(tokenizer), tokenizer)
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--model_path", str(tmp_path / "endless.pth"), "--prompt", "abc",
                                "--max_new_tokens", "100000", "--stream"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_stop_signals)
    process.stdout.read(20)  # it is writing
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr


def test_a_typed_special_token_in_a_prompt_is_text_as_in_the_chat(checkpoint):
    result = run("--model_path", str(checkpoint), "--prompt", "<|endoftext|>", "--max_new_tokens", "2",
                 "--show_stats", "--no-stream")
    assert result.returncode == 0, result.stderr
    assert "[13 prompt tokens" in result.stderr  # its 13 characters, each a byte token: not the one special id
