"""benchmarks/sweep_base.py: a ladder of two tiny runs at a fixed wall time, end to end, then
a second call that trains nothing and reports every finished run."""

import argparse
import json

import pytest

import sweep_base
from helpers import story_tokenizer, write_story_corpus

TINY_MODEL = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4",
              "--intermediate_size", "64", "--max_position_embeddings", "64", "--window_size", "16",
              "--block_size", "32", "--batch_size", "8", "--num_workers", "1"]


@pytest.fixture
def sweep_args(tmp_path, monkeypatch):
    corpus = write_story_corpus(tmp_path, train=300, valid=40)
    story_tokenizer(300).save(tmp_path / "tok.json")
    monkeypatch.setattr(sweep_base, "BASE", [*sweep_base.BASE, *TINY_MODEL])
    return ["--minutes", "0.03", "--eval_interval", "5", "--dataset", str(corpus), "--tokenizer_path",
            str(tmp_path / "tok.json"), "--work_dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]


def test_a_ladder_of_two_runs_then_a_call_that_redoes_nothing(sweep_args, tmp_path, monkeypatch):
    sweep_base.main([*sweep_args, "--runs", "baseline"])
    results = sweep_base.main([*sweep_args, "--runs", "muon"])  # the report holds both runs
    assert list(results) == ["baseline", "muon"]
    assert results["muon"]["flags"] == [*sweep_base.BASE, "--optimizer", "muon"]
    table = (tmp_path / "out" / "results.md").read_text()
    change = results["muon"]["val_bits_per_byte"] - results["baseline"]["val_bits_per_byte"]
    assert f"| {results['muon']['val_bits_per_byte']:.4f} | {change:+.4f} |" in table
    assert f" | {results['muon']['history'][-1]['val_bits_per_byte']:.4f} | {results['muon']['tokens']:,} |" in table
    for result in results.values():
        assert result["minutes"] >= 0.03 and result["history"][-1]["minutes"] <= result["minutes"]
        assert result["val_bits_per_byte"] == min(h["val_bits_per_byte"] for h in result["history"])
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0

    def must_not_train(argv):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep_base, "train", must_not_train)
    assert sweep_base.main([*sweep_args, "--runs", "baseline,muon"]) == results


def test_every_run_builds_on_a_run_of_the_ladder():
    for name, (parent, _) in sweep_base.RUNS.items():
        assert parent is None or parent in sweep_base.RUNS, name
        assert sweep_base.flags_of(name)[: len(sweep_base.BASE)] == sweep_base.BASE


def test_a_sample_of_the_stories_is_a_setting_of_its_own_and_results_without_one_still_count():
    plain = sweep_base.settings_of(argparse.Namespace(minutes=8, eval_interval=60, patience=3, dataset="d",
                                                      max_train_stories=0, seed=0))
    sampled = sweep_base.settings_of(argparse.Namespace(minutes=8, eval_interval=60, patience=3, dataset="d",
                                                        max_train_stories=746, seed=0))
    assert plain == {"minutes": 8, "eval_interval": 60, "patience": 3, "dataset": "d", "seed": 0}
    assert sampled == {**plain, "max_train_stories": 746}
