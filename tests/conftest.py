"""Shared test set-up: where ../shared is, and a hypothesis profile for slow CI machines."""

from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRAIN_FILE = SHARED / "data" / "tinystories_train.txt"
VALID_FILE = SHARED / "data" / "tinystories_valid.txt"
GPT2_VOCAB = SHARED / "fixtures" / "gpt2_vocab.json"
GPT2_MERGES = SHARED / "fixtures" / "gpt2_merges.txt"

settings.register_profile("project", deadline=None, max_examples=100)
settings.load_profile("project")


@pytest.fixture(scope="session")
def shared_train_file() -> Path:
    if not TRAIN_FILE.exists():
        pytest.skip(f"{TRAIN_FILE} is absent")
    return TRAIN_FILE


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    if not (GPT2_VOCAB.exists() and GPT2_MERGES.exists()):
        pytest.skip("../shared/fixtures/gpt2_vocab.json and gpt2_merges.txt are absent")
    return GPT2_VOCAB, GPT2_MERGES
