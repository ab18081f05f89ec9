"""train_tinystories_model.py and the loop it runs (training.py) on a tiny generated corpus and
a tiny model: the loop, exact resume, accumulation, caching, early stopping, DDP on CPU,
TensorBoard, and bad input."""

import argparse
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import tinystories_data
import training
from bpe_tokenizer import BPETokenizer
from conftest import REPO
from helpers import default_stop_signals, record_sample_prompts, story, story_tokenizer, write_story_corpus
from processes import EpochBatches
from speedups import ChunkedLossLMHead
from tinystories_data import TokenWindows, hold_out, load_stories, load_train_and_validation
from train_tinystories_model import main
from training import TrainingError
from transformer_model import TransformerConfig, TransformerLM, load_checkpoint, read_checkpoint

TINY_MODEL = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4",
              "--intermediate_size", "64", "--max_position_embeddings", "64", "--window_size", "16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder with a train and a validation file, and a tokenizer trained on it."""
    folder = write_story_corpus(tmp_path_factory.mktemp("corpus"), train=400, valid=60)
    story_tokenizer(300).save(folder / "tok.json")
    return folder


def train_args(corpus, output, *extra):
    return ["--dataset", str(corpus), "--tokenizer_path", str(corpus / "tok.json"), "--output_dir", str(output),
            "--batch_size", "8", "--eval_interval", "10", "--eval_batches", "4", "--sample_tokens", "8",
            "--warmup_steps", "5", "--learning_rate", "3e-3", "--num_workers", "1", "--block_size", "32", *TINY_MODEL,
            *extra]


def final_weights(output):
    model, _, _ = load_checkpoint(output / "final_model.pth")
    return model.state_dict()


def test_loss_falls_and_every_file_appears(corpus, tmp_path):
    state = main(train_args(corpus, tmp_path / "run", "--max_steps", "60"))
    history = state["history"]
    assert [h["step"] for h in history] == [10, 20, 30, 40, 50, 60]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 1.0
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for name in ("best_model.pth", "final_model.pth", "last.pth", "config.json"):
        assert (tmp_path / "run" / name).exists(), name
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["learning_rate"] == 3e-3 and config["hidden_size"] == 32
    _, _, metadata = load_checkpoint(tmp_path / "run" / "best_model.pth")
    assert metadata["history"][-1]["val_bits_per_byte"] > 0  # curves can be drawn from a checkpoint alone
    assert {"step", "tokens", "train_loss", "val_loss", "val_bits_per_byte", "lr"} <= metadata["history"][0].keys()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(corpus, tmp_path, monkeypatch, optimizer):
    args = ("--max_steps", "24", "--dropout", "0.1", "--optimizer", optimizer)
    main(train_args(corpus, tmp_path / "straight", *args))
    original_step = training.train_step

    def step_then_interrupt(run):
        result = original_step(run)
        if run.state["step"] == 13:
            run.stop_signal = signal.SIGTERM  # what the handler of Ctrl-C, SIGTERM or SIGHUP does
        return result

    monkeypatch.setattr(training, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        main(train_args(corpus, tmp_path / "interrupted", *args))
    monkeypatch.setattr(training, "train_step", original_step)
    state = main(train_args(corpus, tmp_path / "interrupted", *args, "--resume"))
    assert state["step"] == 24
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "interrupted")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_resume_refuses_a_changed_data_flag_and_names_it(corpus, tmp_path):
    main(train_args(corpus, tmp_path / "run", "--max_steps", "6"))
    args = train_args(corpus, tmp_path / "run", "--max_steps", "12", "--resume")
    args[args.index("--batch_size") + 1] = "4"
    with pytest.raises(ValueError, match=r"was trained with --batch_size 8 \(now 4\); a resumed run must read its "
                                         r"data the same way"):
        main(args)
    with pytest.raises(ValueError, match=r"--max_train_stories 0 \(now 50\), --seed 0 \(now 1\)"):
        main([*train_args(corpus, tmp_path / "run", "--max_steps", "12", "--resume"), "--seed", "1",
              "--max_train_stories", "50"])


def test_resume_says_which_allowed_flags_changed(corpus, tmp_path, capsys):
    main(train_args(corpus, tmp_path / "run", "--max_steps", "6"))
    capsys.readouterr()
    state = main(train_args(corpus, tmp_path / "run", "--max_steps", "12", "--resume", "--eval_interval", "4",
                            "--learning_rate", "1e-3"))
    assert state["step"] == 12
    assert ("--resume: continuing with changed flags: --eval_interval 4 (was 10), --learning_rate 0.001 (was 0.003), "
            "--max_steps 12 (was 6), --min_lr 0.0001 (was 0.00030000000000000003)") in capsys.readouterr().out


def test_the_time_limit_counts_the_whole_run_resumes_included(corpus, tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 10))  # a clock on which every reading is 10 s after the last
    monkeypatch.setattr(training, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    original_step = training.train_step

    def step_then_interrupt(run):
        result = original_step(run)
        run.stop_signal = signal.SIGINT if run.state["step"] == 4 else 0
        return result

    args = train_args(corpus, tmp_path / "run", "--max_steps", "1000", "--max_time_minutes", "5")
    monkeypatch.setattr(training, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(training, "train_step", original_step)
    first_part = read_checkpoint(tmp_path / "run" / "last.pth")["metadata"]["state"]["train_seconds"]
    state = main([*args, "--resume"])
    assert 0 < first_part < 300 < state["train_seconds"]
    assert state["train_seconds"] - first_part < 300  # the resumed part had only what the first left


def test_a_run_stopped_by_its_time_limit_is_evaluated_at_its_last_step(corpus, tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 10))  # every reading 10 s after the last: about 20 s a step
    monkeypatch.setattr(training, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    state = main(train_args(corpus, tmp_path / "run", "--max_steps", "1000", "--max_time_minutes", "2",
                            "--eval_interval", "100"))
    assert 1 < state["step"] < 10
    assert [record["step"] for record in state["history"]] == [state["step"]]


def test_muon_takes_the_blocks_weight_matrices_and_adamw_the_rest():
    model = TransformerLM(TransformerConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=32, skip_weights=True))
    args = argparse.Namespace(optimizer="muon", learning_rate=1e-3, weight_decay=0.5, beta1=0.9, beta2=0.95)
    optimizer = training.make_optimizer(model, args)
    muon, adamw = optimizer.optimizers["muon"], optimizer.optimizers["adamw"]
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    assert in_muon == {name for name, p in model.blocks.named_parameters(prefix="blocks") if p.dim() == 2}
    decayed = {names[id(p)] for group in adamw.param_groups if group["weight_decay"] for p in group["params"]}
    assert decayed == set() and muon.param_groups[0]["weight_decay"] == 0.5
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert in_muon | in_adamw == set(names.values()) and not in_muon & in_adamw
    assert len(optimizer.param_groups) == 3  # the schedule sets the learning rate of all of them


def test_schedules_warm_up_then_decay_by_steps_or_by_the_clock():
    args = argparse.Namespace(learning_rate=1.0, min_lr=0.0, warmup_steps=10, warmdown_fraction=0.4,
                              lr_schedule="warmdown", max_time_minutes=0)
    assert training.lr_at(4, args, 0.0) == 0.5
    progress = [training.schedule_progress(step, 0.0, args, 110) for step in (10, 50, 70, 90, 110)]
    assert progress == [0.0, 0.4, 0.6, 0.8, 1.0]
    assert [training.lr_at(10, args, p) for p in progress] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])
    args.lr_schedule = "cosine"
    assert [training.lr_at(10, args, p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5, 0.0])
    args.max_time_minutes = 10  # a time budget: the decay ends with it if that comes first
    assert training.schedule_progress(20, 300.0, args, 110) == 0.5
    assert training.schedule_progress(100, 300.0, args, 110) == 0.9


def test_resuming_with_another_optimizer_is_refused(corpus, tmp_path):
    main(train_args(corpus, tmp_path / "run", "--max_steps", "2", "--optimizer", "muon"))
    with pytest.raises(ValueError, match="--optimizer muon"):
        main(train_args(corpus, tmp_path / "run", "--max_steps", "4", "--resume"))


def test_gradient_accumulation_equals_one_big_batch(corpus, tmp_path):
    common = ("--max_steps", "1", "--dropout", "0", "--grad_clip", "0", "--warmup_steps", "0",
              "--lr_schedule", "constant", "--no-amp", "--eval_interval", "1000")
    main([*train_args(corpus, tmp_path / "big", *common), "--batch_size", "8"])
    main([*train_args(corpus, tmp_path / "small", *common), "--batch_size", "4", "--gradient_accumulation_steps", "2"])
    big, small = final_weights(tmp_path / "big"), final_weights(tmp_path / "small")
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=1e-6, rtol=1e-5)


def test_encoded_data_is_cached_and_reused(corpus, tmp_path, monkeypatch):
    args = train_args(corpus, tmp_path / "run", "--max_steps", "2", "--cache_dir", str(tmp_path / "cache"))
    main(args)
    assert len(list((tmp_path / "cache").glob("tokens-*.bin"))) == 2

    def must_not_encode(*_, **__):
        raise AssertionError("encoded again")

    monkeypatch.setattr(tinystories_data, "encoded_stories", must_not_encode)
    main([*args, "--overwrite"])


def test_overwrite_deletes_the_old_runs_checkpoints_so_an_interrupted_new_run_mixes_nothing(
        corpus, tmp_path, monkeypatch):
    output = tmp_path / "run"
    main(train_args(corpus, output, "--max_steps", "20"))
    assert {"best_model.pth", "final_model.pth"} <= {p.name for p in output.iterdir()}
    original_step = training.train_step

    def step_then_interrupt(run):
        result = original_step(run)
        run.stop_signal = signal.SIGINT if run.state["step"] == 3 else 0  # before the new run's first evaluation
        return result

    monkeypatch.setattr(training, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(train_args(corpus, output, "--max_steps", "20", "--overwrite"))
    assert not (output / "best_model.pth").exists() and not (output / "final_model.pth").exists()
    assert load_checkpoint(output / "last.pth")[2]["step"] == 3
    assert len(list((output / "runs").glob("events.out.tfevents.*"))) == 1  # the new run's alone


def test_a_single_file_holds_out_a_seeded_validation_share(corpus, tmp_path):
    args = train_args(corpus, tmp_path / "run", "--max_steps", "10", "--val_fraction", "0.1")
    args[args.index("--dataset") + 1] = str(corpus / "stories_train.txt")
    state = main(args)
    assert state["history"][-1]["val_tokens"] > 0


def test_the_held_out_validation_share_is_hold_out_of_the_training_file(corpus):
    single = str(corpus / "stories_train.txt")
    stories = load_stories(single)
    split = {role: list(stories) for role, stories in load_train_and_validation(single, val_fraction=0.1, seed=3).items()}
    assert (split["train"], split["validation"]) == hold_out(stories, 0.1, seed=3)
    assert len(split["validation"]) == len(stories) // 10 and len(split["train"]) + len(split["validation"]) == len(stories)
    assert list(load_train_and_validation(single, val_fraction=0.1, seed=3, max_val_stories=5)["validation"]) == \
        split["validation"][:5]
    folder = load_train_and_validation(str(corpus), val_fraction=0.1, seed=3)  # a validation file: nothing held out
    assert list(folder["train"]) == stories and list(folder["validation"]) == load_stories(str(corpus), "validation")


def test_calibration_stories_are_held_out_of_the_training_stories(corpus):
    single = str(corpus / "stories_train.txt")
    stories = load_stories(single)
    split = {role: list(stories) for role, stories in
             load_train_and_validation(single, val_fraction=0.1, seed=3, calibration_stories=20).items()}
    validation_split = hold_out(stories, 0.1, seed=3)
    assert split["validation"] == validation_split[1]
    assert (split["train"], split["calibration"]) == hold_out(validation_split[0], 20, seed=3)
    assert len(split["calibration"]) == 20 and len(split["train"]) + 20 == len(validation_split[0])
    assert list(load_train_and_validation(single, val_fraction=0.1, seed=3)["calibration"]) == []
    with pytest.raises(tinystories_data.DataError, match="--calibration_stories 5000"):
        load_train_and_validation(single, calibration_stories=5000)


def test_a_calibrated_run_saves_its_best_model_with_the_temperature_folded_in(corpus, tmp_path):
    """Each evaluation fits a temperature on the held-out stories and scores the validation
    windows with it; the best model's logits are the raw weights' logits over it."""
    output = tmp_path / "run"
    state = main(train_args(corpus, output, "--max_steps", "20", "--calibration_stories", "40", "--eval_batches", "0"))
    best = min(state["history"], key=lambda record: record["val_loss"])
    assert all(record["temperature"] > 0 for record in state["history"]) and best["temperature"] != 1.0
    assert all(record["val_bits_per_byte_uncalibrated"] > 0 for record in state["history"])
    calibrated, _, metadata = load_checkpoint(output / "best_model.pth")
    raw, _, _ = load_checkpoint(output / "final_model.pth")  # the last step is the best here: the same weights
    assert metadata["step"] == 20 == best["step"]
    ids = torch.randint(0, raw.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(calibrated(ids).logits, raw(ids).logits / best["temperature"], rtol=1e-4, atol=1e-4)


def test_training_switches_the_chunked_loss_on_and_saves_the_plain_model(corpus, tmp_path, monkeypatch):
    seen = []
    original_step = training.train_step

    def step_and_look(run):
        seen.append(type(run.raw_model.lm_head))
        return original_step(run)

    monkeypatch.setattr(training, "train_step", step_and_look)
    main(train_args(corpus, tmp_path / "run", "--max_steps", "2"))
    assert seen == [ChunkedLossLMHead, ChunkedLossLMHead]
    model, _, _ = load_checkpoint(tmp_path / "run" / "final_model.pth")  # the same keys: a plain model loads it
    assert type(model.lm_head) is not ChunkedLossLMHead


def test_the_pretraining_sample_is_the_prompt_encoded_as_plain_text(corpus, tmp_path, monkeypatch):
    prompts = record_sample_prompts(monkeypatch)
    main(train_args(corpus, tmp_path / "run", "--max_steps", "10", "--sample_prompt", "Once upon a time"))
    tokenizer = BPETokenizer.load(corpus / "tok.json")
    assert prompts == [tokenizer.encode("Once upon a time")]


def test_early_stopping_after_patience_evaluations_without_improvement(corpus, tmp_path):
    state = main(train_args(corpus, tmp_path / "run", "--learning_rate", "1e-12", "--warmup_steps", "0",
                            "--eval_interval", "2", "--patience", "2", "--max_steps", "100"))
    assert len(state["history"]) == 3  # the first evaluation is the best; two more without improvement
    assert state["step"] == 6


def test_tensorboard_logs_hold_the_scalars_and_a_sample(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(train_args(corpus, tmp_path / "run", "--max_steps", "20"))
    events = EventAccumulator(str(tmp_path / "run" / "runs"), size_guidance={"tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "val/loss",
            "val/perplexity", "val/bits_per_byte"} <= scalars
    assert len(events.Scalars("val/loss")) == 2
    assert any("sample" in tag for tag in events.Tags()["tensors"])


def test_plot_training_draws_the_curves_from_the_tensorboard_scalars(corpus, tmp_path, capsys):
    import plot_training

    main(train_args(corpus, tmp_path / "run", "--max_steps", "20"))
    scalars = plot_training.read_scalars(str(tmp_path / "run" / "runs"))
    steps, _ = scalars["val/bits_per_byte"]
    assert list(steps) == [10, 20]
    plot_training.main([str(tmp_path / "run" / "runs"), str(tmp_path / "curve.png")])
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit, match="holds no train/learning_rate, train/loss"):
        plot_training.main([str(tmp_path), str(tmp_path / "none.png")])


def test_eval_model_reproduces_the_validation_figures_training_logged(corpus, tmp_path):
    import eval_model

    state = main(train_args(corpus, tmp_path / "run", "--max_steps", "10", "--eval_batches", "0", "--no-amp"))
    figures = eval_model.evaluate_checkpoint(str(tmp_path / "run" / "final_model.pth"), str(corpus))
    logged = state["history"][-1]
    assert figures["val_tokens"] == logged["val_tokens"]
    for name in ("val_loss", "val_bits_per_byte"):
        assert figures[name] == pytest.approx(logged[name], rel=1e-5)


def test_eval_model_reproduces_a_calibrated_runs_figures_at_its_temperature(corpus, tmp_path):
    import eval_model

    state = main(train_args(corpus, tmp_path / "run", "--max_steps", "10", "--eval_batches", "0", "--no-amp",
                            "--calibration_stories", "40"))
    (logged,) = state["history"]  # one evaluation: the best model is the final one, calibrated

    def figures(name, temperature=1.0):
        return eval_model.evaluate_checkpoint(str(tmp_path / "run" / name), str(corpus), temperature=temperature)

    assert figures("best_model.pth")["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    assert figures("final_model.pth", logged["temperature"])["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    assert figures("final_model.pth")["val_bits_per_byte"] == pytest.approx(logged["val_bits_per_byte_uncalibrated"],
                                                                            rel=1e-5)


def test_batches_are_split_across_processes_like_one_big_batch():
    single = EpochBatches(100, 8, seed=1)
    ranks = [EpochBatches(100, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):  # across epoch boundaries
        assert single.next_indices() == ranks[0].next_indices() + ranks[1].next_indices()
    state = single.state_dict()
    replay = EpochBatches(100, 8, seed=1)
    replay.load_state_dict(state)
    assert replay.next_indices() == single.next_indices()


def test_windows_are_inputs_and_targets_shifted_by_one():
    import numpy as np

    windows = TokenWindows(np.arange(100, dtype=np.uint16), block_size=10)
    assert len(windows) == 9
    inputs, targets = windows[2]
    assert inputs.tolist() == list(range(20, 30)) and targets.tolist() == list(range(21, 31))


def test_training_windows_are_cut_afresh_each_epoch_and_the_same_on_resume():
    import numpy as np

    windows = TokenWindows(np.arange(1000, dtype=np.uint16), block_size=10, shift_seed=3)
    assert len(windows) == 98  # room for the largest shift
    starts = []
    for epoch in range(6):
        windows.set_epoch(epoch)
        starts.append(int(windows[0][0][0]))
        assert all(len(windows[i][0]) == 10 for i in (0, len(windows) - 1))
    assert len(set(starts)) > 1 and all(0 <= s < 10 for s in starts)
    windows.set_epoch(4)
    assert int(windows[0][0][0]) == starts[4]


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(corpus, tmp_path):
    common = ["--max_steps", "6", "--dropout", "0", "--no-amp", "--device", "cpu", "--eval_interval", "3"]
    single = subprocess.run([sys.executable, str(REPO / "train_tinystories_model.py"),
                             *train_args(corpus, tmp_path / "one", *common), "--batch_size", "8"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "train_tinystories_model.py"),
                          *train_args(corpus, tmp_path / "two", *common), "--batch_size", "4"],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
    _, _, one_meta = load_checkpoint(tmp_path / "one" / "final_model.pth")
    _, _, two_meta = load_checkpoint(tmp_path / "two" / "final_model.pth")
    for a, b in zip(one_meta["history"], two_meta["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)


# ------------------------------------------------------------------------ bad input

def test_a_missing_tokenizer_says_to_train_one(corpus, tmp_path):
    args = train_args(corpus, tmp_path / "run")
    args[args.index("--tokenizer_path") + 1] = str(tmp_path / "none.json")
    with pytest.raises(ValueError, match="train one first.*train_bpe_tokenizer_hf.py"):
        main(args)


def test_a_run_directory_is_not_overwritten_by_another_config(corpus, tmp_path):
    main(train_args(corpus, tmp_path / "run", "--max_steps", "2"))
    before = (tmp_path / "run" / "final_model.pth").read_bytes()
    with pytest.raises(ValueError, match="holds a run with a different config: pass --resume.*or --overwrite"):
        main(train_args(corpus, tmp_path / "run", "--max_steps", "2", "--learning_rate", "1e-3"))
    with pytest.raises(ValueError, match="holds a run already"):
        main(train_args(corpus, tmp_path / "run", "--max_steps", "2"))
    assert (tmp_path / "run" / "final_model.pth").read_bytes() == before


def test_resuming_with_another_tokenizer_is_refused_and_writes_nothing(corpus, tmp_path):
    main(train_args(corpus, tmp_path / "run", "--max_steps", "2"))
    before = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    other = BPETokenizer.train([story(random.Random(5)) for _ in range(50)], vocab_size=300)
    other.save(tmp_path / "other.json")
    args = train_args(corpus, tmp_path / "run", "--max_steps", "4", "--resume")
    args[args.index("--tokenizer_path") + 1] = str(tmp_path / "other.json")
    with pytest.raises(ValueError, match="another tokenizer"):
        main(args)
    after = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    assert {p: b for p, b in after.items() if "data_cache" not in p.parts} == \
        {p: b for p, b in before.items() if "data_cache" not in p.parts}  # config.json and logs untouched


def break_the_weights_after_step(monkeypatch, step: int) -> None:
    """From that step on, training's weights hold a NaN (as a diverging run's would)."""
    original_step = training.train_step

    def step_then_break_the_weights(run):
        result = original_step(run)
        if run.state["step"] == step:
            with torch.no_grad():
                run.raw_model.final_norm.weight.fill_(float("nan"))
        return result

    monkeypatch.setattr(training, "train_step", step_then_break_the_weights)


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    break_the_weights_after_step(monkeypatch, 7)
    with pytest.raises(TrainingError, match=r"the loss became nan at step 8; the last good checkpoint is .*last.pth"):
        main(train_args(corpus, tmp_path / "run", "--max_steps", "20", "--eval_interval", "5"))
    model, _, metadata = load_checkpoint(tmp_path / "run" / "last.pth")
    assert metadata["step"] == 5 and all(torch.isfinite(p).all() for p in model.parameters())


def test_a_loss_that_diverges_before_the_first_save_names_no_checkpoint(corpus, tmp_path, monkeypatch):
    break_the_weights_after_step(monkeypatch, 1)
    with pytest.raises(TrainingError, match=r"the loss became nan at step 2; nothing was saved yet \(try a lower"):
        main(train_args(corpus, tmp_path / "run", "--max_steps", "20", "--eval_interval", "5"))
    assert not (tmp_path / "run" / "last.pth").exists()


def test_resuming_from_a_checkpoint_without_optimizer_state_is_one_clear_line(corpus, tmp_path):
    main(train_args(corpus, tmp_path / "run", "--max_steps", "10"))
    (tmp_path / "run" / "best_model.pth").replace(tmp_path / "run" / "last.pth")  # a roll-back, as a user might
    with pytest.raises(ValueError, match=r"holds weights but no optimizer state .* put the run.s own last.pth back"):
        main(train_args(corpus, tmp_path / "run", "--max_steps", "20", "--resume"))


@pytest.mark.parametrize("allocator_message", [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes",
])
def test_a_first_batch_that_does_not_fit_says_which_flag_to_lower(corpus, tmp_path, monkeypatch, allocator_message):
    def out_of_memory(run):
        raise RuntimeError(allocator_message)

    monkeypatch.setattr(training, "train_step", out_of_memory)
    with pytest.raises(TrainingError, match="lower --batch_size"):
        main(train_args(corpus, tmp_path / "run", "--max_steps", "2"))


@pytest.mark.parametrize("extra, message", [
    (["--block_size", "128"], "--block_size 128 is above the model's context"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--resume", "--overwrite"], "not both"),
])
def test_bad_flags_are_refused_by_the_parser(corpus, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(train_args(corpus, tmp_path / "run") + extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def start_a_long_run(corpus, output, preexec_fn=default_stop_signals) -> subprocess.Popen:
    """The training script on a run far too long to finish, returned a few steps in."""
    process = subprocess.Popen([sys.executable, str(REPO / "train_tinystories_model.py"),
                                *train_args(corpus, output, "--max_steps", "100000", "--eval_interval", "50")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    deadline = time.time() + 120
    while not (output / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # a few steps in
    return process


def test_the_same_signal_again_at_once_is_its_echo_and_any_other_quits_without_saving(tmp_path, monkeypatch):
    run = argparse.Namespace(stop_signal=0, stop_time=0.0, out=tmp_path, dist=argparse.Namespace(main=False))
    clock = iter([100.0, 101.0, 103.5])
    monkeypatch.setattr(training, "time", argparse.Namespace(monotonic=lambda: next(clock)))
    training.request_stop(run, signal.SIGTERM, None)
    assert run.stop_signal == signal.SIGTERM
    training.request_stop(run, signal.SIGTERM, None)  # 1 s later: torchrun passing on what the worker already had
    with pytest.raises(KeyboardInterrupt, match="SIGTERM again: quit without saving") as stopped:
        training.request_stop(run, signal.SIGTERM, None)  # 3.5 s later: a second request
    assert stopped.value.signum == signal.SIGTERM


def test_under_nohup_a_closed_terminal_does_not_stop_the_run(corpus, tmp_path):
    def like_nohup():
        default_stop_signals()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    process = start_a_long_run(corpus, tmp_path / "run", preexec_fn=like_nohup)
    process.send_signal(signal.SIGHUP)
    time.sleep(2)
    assert process.poll() is None  # still training
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "SIGHUP" not in stdout, stderr[-2000:]


def test_empty_data_is_one_clear_line(corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("<|endoftext|>\n", encoding="utf-8")
    args = train_args(corpus, tmp_path / "run")
    args[args.index("--dataset") + 1] = str(tmp_path / "empty.txt")
    result = subprocess.run([sys.executable, str(REPO / "train_tinystories_model.py"), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no stories" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("stop, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["Ctrl-C", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_saves_says_how_to_resume_and_exits_as_a_shell_reports_it(corpus, tmp_path, stop, status):
    process = start_a_long_run(corpus, tmp_path / "run")
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-2000:]
    assert "stopping after this step" in stdout and "plus --resume" in stderr and "Traceback" not in stderr
    assert (tmp_path / "run" / "last.pth").exists()
    assert main([*train_args(corpus, tmp_path / "run", "--max_steps", "1"), "--resume"])["step"] > 0
