"""benchmarks/ablations.py: two tiny runs end to end, resumed without redoing them."""

import json

import pytest

import ablations
from helpers import write_story_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_story_corpus(tmp_path, train=300, valid=40)


def test_two_tiny_runs_end_to_end_then_a_resume_that_redoes_nothing(corpus, tmp_path, monkeypatch):
    argv = ["--size", "tiny", "--max_tokens", "4000", "--runs", "baseline,pos_learned", "--dataset", str(corpus),
            "--work_dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    results = ablations.main(argv)
    assert set(results) == {"baseline", "pos_learned"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    table = (tmp_path / "out" / "results.md").read_text()
    for name, result in saved.items():
        assert result["val_bits_per_byte"] > 0 and result["tokens"] >= 4000 - 8 * 32
        assert f"| {name} | {result['val_bits_per_byte']:.4f} |" in table  # the table prints the JSON's figures
    assert saved["pos_learned"]["val_bits_per_byte_2x"] is None and "| n/a |" in table
    assert saved["baseline"]["val_bits_per_byte_2x"] > 0
    assert (tmp_path / "out" / "bits_per_byte.png").stat().st_size > 0

    def must_not_train(argv):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablations, "train", must_not_train)
    assert ablations.main(argv) == results
    other_budget = [*argv[:argv.index("--max_tokens")], "--max_tokens", "8000", *argv[argv.index("--max_tokens") + 2:]]
    with pytest.raises(AssertionError, match="trained again"):  # a result made with other settings is redone
        ablations.main(other_budget)


def test_unknown_run_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        ablations.main(["--runs", "pos_magic"])
    assert "unknown runs ['pos_magic']" in capsys.readouterr().err
