"""Instruction-tune a pretrained TinyStories model into a chat model (assistant-only loss).

    python train_tinystories_chat_model.py --base_model tinystories_model/best_model.pth \\
        --output_dir tinystories_chat_model --from_stories ../shared/data
    python train_tinystories_chat_model.py --base_model pretrained/tinystories_base.pth \\
        --dataset roneneldan/TinyStoriesInstruct          # or a JSON/JSONL/parquet "messages" column

Conversations come from --dataset (a "messages" column in the hub's chat format, or
TinyStoriesInstruct text) or are built from plain stories with --from_stories (written to
OUTPUT_DIR/conversations_{train,validation}.jsonl to inspect). Each becomes one row of
--block_size tokens through the chat template; only the assistant's tokens count in the loss.
The loop is pretraining's (training.train): AdamW, warm-up and decay, mixed precision,
accumulation, early stopping on the assistant-only validation loss, checkpoints, exact
--resume, Ctrl-C safety, TensorBoard. Two of its hooks make it a chat run: the sample at each
evaluation is a reply to --sample_prompt sent through the chat template (reply_prompt), and
built conversations are written into the output dir once it is claimed (write_conversations).

The program, top to bottom: the flags, the conversations (split_conversations), the hooks,
set_dropout, and main: the base model, the rows (tinystories_data.ChatExamples), training.train.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bpe_tokenizer import DEFAULT_SPECIAL_TOKENS, BPETokenizer
from common import run_script
from tinystories_data import (
    ChatExamples,
    SplitNotFoundError,
    conversations_from_stories,
    hold_out,
    load_conversations,
    load_stories,
)
from training import TrainingError, add_training_args, check_training_args, train
from transformer_model import load_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The data and training flags (training's, with chat's defaults), checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--base_model", required=True, help="the pretrained checkpoint to start from")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="hub id or local file/folder with a messages column or TinyStoriesInstruct text")
    source.add_argument("--from_stories", help="build conversations from the plain stories of this hub id or path")
    data.add_argument("--val_fraction", type=float, default=0.05, help="held out when there is no validation split")
    data.add_argument("--max_train_conversations", type=int, default=0, help="a seeded sample (0 = all)")
    data.add_argument("--max_val_conversations", type=int, default=0, help="a seeded sample (0 = all)")
    data.add_argument("--block_size", type=int, default=512, help="tokens per conversation row")
    data.add_argument("--dropout", type=float, default=None, help="override the base model's dropout")
    data.add_argument("--attention_dropout", type=float, default=None,
                      help="override the base model's attention dropout (0 is twice as fast on CPU)")
    add_training_args(parser, learning_rate=1e-4)
    parser.set_defaults(output_dir="tinystories_chat_model", num_epochs=3, warmup_steps=50, eval_interval=100,
                        sample_prompt="Tell me a story about a brave little cat.")
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    return args


def split_conversations(args: argparse.Namespace) -> tuple[list, list]:
    """Training and validation conversations: the source's validation split when it has one,
    else a seeded held-out share."""
    def load(split: str) -> list:  # conversations, or the stories to build them from
        if args.dataset:
            return load_conversations(args.dataset, split, seed=args.seed)
        return load_stories(args.from_stories, split)

    train = load("train")
    try:
        validation = load("validation")
    except SplitNotFoundError:
        # Held out before conversations are built from stories: a built conversation may take
        # the next story for its second turn, and that must not reach across the split.
        train, validation = hold_out(train, float(args.val_fraction), args.seed)
    if args.from_stories:
        train = conversations_from_stories(train, seed=args.seed)
        validation = conversations_from_stories(validation, seed=args.seed + 1)
    for name, limit in (("train", args.max_train_conversations), ("validation", args.max_val_conversations)):
        chosen = train if name == "train" else validation
        if limit and limit < len(chosen):
            chosen[:] = random.Random(args.seed).sample(chosen, limit)
    return train, validation


def write_jsonl(path: Path, conversations: list) -> None:
    """One {"messages": [...]} object a line, the hub's chat format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def write_conversations(output_dir: Path, conversations: dict[str, list]) -> None:
    """The on_output_dir_ready hook: OUTPUT_DIR/conversations_{name}.jsonl for each set."""
    for name, items in conversations.items():
        write_jsonl(output_dir / f"conversations_{name}.jsonl", items)


def reply_prompt(tokenizer: BPETokenizer, request: str) -> list[int]:
    """The prompt_ids hook: the sample at each evaluation is a reply to request, so the
    request goes through the chat template and ends with <assistant>."""
    return tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True)


def set_dropout(model: torch.nn.Module, dropout: float | None, attention_dropout: float | None) -> None:
    """Change a loaded model's dropout rates in place (None keeps the base model's rate). The
    config is replaced, so the modules that read it (attention) get the new one too."""
    rates = {name: rate for name, rate in (("dropout", dropout), ("attention_dropout", attention_dropout))
             if rate is not None}
    if not rates:
        return
    model.config = dataclasses.replace(model.config, **rates)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and "dropout" in rates:
            module.p = rates["dropout"]
        elif hasattr(module, "config"):
            module.config = model.config


def main(argv: list[str] | None = None) -> dict:
    """Load the base model, build the conversation rows, train; returns the run's state."""
    args = parse_args(argv)
    model, tokenizer, _ = load_checkpoint(args.base_model, device="cpu")
    missing = [token for token in DEFAULT_SPECIAL_TOKENS if token not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"{args.base_model}: its tokenizer lacks the chat special tokens {missing}; train the base "
                         "model with a tokenizer that has them (train_bpe_tokenizer_hf.py adds them by default)")
    if args.block_size > model.config.max_position_embeddings:
        raise ValueError(f"--block_size {args.block_size} is above the base model's context "
                         f"({model.config.max_position_embeddings})")
    set_dropout(model, args.dropout, args.attention_dropout)
    # One row of --block_size tokens per conversation, the loss on the assistant's tokens only.
    train_conversations, val_conversations = split_conversations(args)
    train_data = ChatExamples(train_conversations, tokenizer, args.block_size)
    val_data = ChatExamples(val_conversations, tokenizer, args.block_size)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, the first process reports
        tqdm.write(f"{len(train_conversations):,} training and {len(val_conversations):,} validation conversations; "
                   f"{train_data.truncated_turns + val_data.truncated_turns} oldest turns dropped and "
                   f"{train_data.cut_conversations + val_data.cut_conversations} conversations cut to fit "
                   f"--block_size {args.block_size}")
    # Built conversations are written out to inspect; those read from a data set are there already.
    built = {"train": train_conversations, "validation": val_conversations} if args.from_stories else {}
    return train(args, model.train(), tokenizer, train_data, val_data, kind="chat",
                 prompt_ids=functools.partial(reply_prompt, tokenizer),
                 on_output_dir_ready=functools.partial(write_conversations, conversations=built))


if __name__ == "__main__":
    run_script(main, user_errors=(ValueError, OSError, TrainingError))
