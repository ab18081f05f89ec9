"""benchmarks/eval_chat.py end to end on tiny checkpoints: a row per request type with a
followed and a control column for each model, the loss, and forced words measured apart."""

import json
import random

import pytest

import eval_chat
from helpers import story_tokenizer
from test_bad_inputs import assert_one_error_line, run_cli
from test_request_following import distinct_story
from test_transformer_model import tiny_model
from transformer_model import save_checkpoint


def test_a_table_per_request_type_for_every_model_and_forced_words_apart(tmp_path, capsys):
    rng = random.Random(0)
    (tmp_path / "stories_valid.txt").write_text("".join(distinct_story(rng) + "\n<|endoftext|>\n" for _ in range(30)))
    corpus = tmp_path
    tokenizer = story_tokenizer(320)
    for name, seed in (("base", 0), ("chat", 1)):
        model = tiny_model(vocab_size=tokenizer.vocab_size, position_embedding="rope", window_size=16,
                           initializer_range=0.3 + 0.1 * seed)
        save_checkpoint(tmp_path / f"{name}.pth", model, tokenizer)
    results = eval_chat.main(["--base", str(tmp_path / "base.pth"), "--chat", str(tmp_path / "chat.pth"),
                              str(tmp_path / "base.pth"),
                              "--data", str(corpus), "--per_kind", "2", "--max_new_tokens", "30", "--block_size",
                              "64", "--forced", "2", "--json", str(tmp_path / "out.json")])
    printed = capsys.readouterr().out
    labels = ["words", "name", "continuation", "words, 2nd turn", "name, 2nd turn", "continuation, 2nd turn",
              "words line"]
    assert ("| request | requests | base followed | base control | chat 1 followed | chat 1 control | "
            "chat 2 followed | chat 2 control |") in printed
    words_rows = [f"{label}: {row}" for label in ("words", "words, 2nd turn", "words line")
                  for row in ("each word", "uses per word (story's own)")]
    for label in [*labels, *words_rows]:
        assert f"\n| {label} | 2 |" in printed
    assert sorted(results["chat 1"]["rates"]) == sorted(labels)
    assert results["chat 2"]["rates"] == results["base"]["rates"]  # the same model, the same seeded replies
    assert results["base"]["forced"]["requests"] == 2 and "hold all three as words" in printed
    assert json.loads((tmp_path / "out.json").read_text())["chat 1"]["loss"]["val_loss"] > 0


def test_words_line_alone_gives_one_row_per_model_and_the_same_rates_as_the_full_table(tmp_path, capsys):
    rng = random.Random(0)
    (tmp_path / "stories_valid.txt").write_text("".join(distinct_story(rng) + "\n<|endoftext|>\n" for _ in range(30)))
    tokenizer = story_tokenizer(320)
    model = tiny_model(vocab_size=tokenizer.vocab_size, position_embedding="rope", window_size=16, initializer_range=0.3)
    save_checkpoint(tmp_path / "base.pth", model, tokenizer)
    flags = ["--data", str(tmp_path), "--per_kind", "2", "--max_new_tokens", "30"]
    alone = eval_chat.main(["--words_line", str(tmp_path / "base.pth"), *flags])
    printed = capsys.readouterr().out
    assert printed.count(f"| {tmp_path / 'base.pth'} | 2 |") == 1 and "| request |" not in printed
    full = eval_chat.main(["--base", str(tmp_path / "base.pth"), "--chat", str(tmp_path / "base.pth"), *flags,
                           "--block_size", "64"])
    assert alone[str(tmp_path / "base.pth")] == full["base"]["rates"]["words line"]


@pytest.mark.parametrize("flags", [["--chat", "pretrained/tinystories_chat.pth", "missing.pth"],
                                   ["--base", "missing.pth"], ["--words_line", "missing.pth"]])
def test_a_missing_model_is_one_clear_line_before_any_model_is_evaluated(flags):
    flag = flags[0]
    assert_one_error_line(run_cli("benchmarks/eval_chat.py", *flags), 2, f"error: {flag} missing.pth: no such file")
