"""Bad flags, as a new user types them, against every script: each is refused before any work
starts, with one line that names the flag and its rule, a non-zero exit and no traceback.
NaN and infinity count as bad wherever a number has a range."""

import subprocess
import sys

import pytest

from conftest import REPO

# Each script with the flags it needs to get as far as checking the bad one.
SCRIPTS = {
    "train_tinystories_model.py": ["--dataset", "../shared/data"],
    "train_tinystories_chat_model.py": ["--base_model", "pretrained/tinystories_base.pth",
                                        "--from_stories", "../shared/data"],
    "generate_tinystories_text.py": ["--max_new_tokens", "5"],
    "chat_with_tinystories_model.py": [],
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
    ("train_tinystories_chat_model.py", "--checkable_weight inf", "--checkable_weight must be 0 or more, not inf", 2),
    ("train_tinystories_chat_model.py", "--max_train_conversations -3", "--max_train_conversations must be 0 or", 2),
    ("train_tinystories_chat_model.py", "--val_fraction nan", "--val_fraction must be in (0, 1), not nan", 2),
    ("generate_tinystories_text.py", "--temperature nan", "--temperature must be a finite number >= 0", 2),
    ("generate_tinystories_text.py", "--temperature inf", "--temperature must be a finite number >= 0", 2),
    ("generate_tinystories_text.py", "--repetition_penalty nan", "--repetition_penalty must be a finite number", 2),
    ("generate_tinystories_text.py", "--length_penalty nan", "--length_penalty must be a finite number, not nan", 2),
    ("generate_tinystories_text.py", "--top_p nan", "--top_p must be in (0, 1], not nan", 2),
    ("chat_with_tinystories_model.py", "--temperature nan", "temperature must be a finite number >= 0", 1),
]


@pytest.mark.parametrize("script, flag, words, status", CASES, ids=[f"{case[0]} {case[1]}" for case in CASES])
def test_a_bad_flag_is_one_clear_line(script, flag, words, status, tmp_path):
    output = ["--output_dir", str(tmp_path / "out")] if script.startswith("train") else []
    result = subprocess.run([sys.executable, str(REPO / script), *SCRIPTS[script], *flag.split(), *output],
                            cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and words in errors[0], result.stderr
    if output:
        assert not (tmp_path / "out").exists()  # refused before the run began
