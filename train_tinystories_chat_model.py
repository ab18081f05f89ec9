"""Instruction-tune a pretrained TinyStories model into a chat model (assistant-only loss).

    python train_tinystories_chat_model.py --base_model tinystories_model/best_model.pth \\
        --output_dir tinystories_chat_model --from_stories ../shared/data
    python train_tinystories_chat_model.py --base_model pretrained/tinystories_base.pth \\
        --dataset roneneldan/TinyStoriesInstruct          # or a JSON/JSONL/parquet "messages" column

Conversations come from --dataset (a "messages" column in the hub's chat format, or
TinyStoriesInstruct text) or are built from plain stories with --from_stories (written to
OUTPUT_DIR/conversations_{train,validation}.jsonl to inspect). Each becomes one row of
--block_size tokens through the chat template; only the assistant's tokens count in the loss.
The loop is pretraining's (train_tinystories_model.Trainer): AdamW, warm-up and decay, mixed
precision, accumulation, early stopping on the assistant-only validation loss, checkpoints,
exact --resume, Ctrl-C safety, TensorBoard with a sample reply at each evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch

from tinystories_data import (
    ChatExamples,
    DataError,
    SplitNotFoundError,
    conversations_from_stories,
    load_conversations,
    load_stories,
    run_script,
)
from train_tinystories_model import Trainer, TrainingError, add_training_args, check_training_args
from transformer_model import load_checkpoint

CHAT_TOKENS = ("<|endoftext|>", "<user>", "<assistant>", "<system>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
        shuffled = random.Random(args.seed).sample(range(len(train)), len(train))
        held = max(1, int(len(train) * args.val_fraction))
        if held >= len(train):
            raise DataError(f"{len(train)} examples are too few to hold out a validation share") from None
        validation, train = [train[i] for i in shuffled[:held]], [train[i] for i in shuffled[held:]]
    if args.from_stories:
        train = conversations_from_stories(train, seed=args.seed)
        validation = conversations_from_stories(validation, seed=args.seed + 1)
    for name, limit in (("train", args.max_train_conversations), ("validation", args.max_val_conversations)):
        chosen = train if name == "train" else validation
        if limit and limit < len(chosen):
            chosen[:] = random.Random(args.seed).sample(chosen, limit)
    return train, validation


def write_jsonl(path: Path, conversations: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


class ChatTrainer(Trainer):
    """Pretraining's loop; the sample at each evaluation is a reply to a request, and built
    conversations are written out for inspection once the output dir is claimed."""

    conversations: dict[str, list] | None = None

    def prepare_output_dir(self) -> None:
        super().prepare_output_dir()
        if self.conversations and self.dist.main:
            for name, conversations in self.conversations.items():
                write_jsonl(self.out / f"conversations_{name}.jsonl", conversations)

    def sample_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)


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
    args = parse_args(argv)
    model, tokenizer, _ = load_checkpoint(args.base_model, device="cpu")
    missing = [token for token in CHAT_TOKENS if token not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"{args.base_model}: its tokenizer lacks the chat special tokens {missing}; train the base "
                         "model with a tokenizer that has them (train_bpe_tokenizer_hf.py adds them by default)")
    if args.block_size > model.config.max_position_embeddings:
        raise ValueError(f"--block_size {args.block_size} is above the base model's context "
                         f"({model.config.max_position_embeddings})")
    set_dropout(model, args.dropout, args.attention_dropout)
    train, validation = split_conversations(args)
    train_data = ChatExamples(train, tokenizer, args.block_size)
    val_data = ChatExamples(validation, tokenizer, args.block_size)
    trainer = ChatTrainer(args, model.train(), tokenizer, train_data, val_data, kind="chat")
    if args.from_stories:
        trainer.conversations = {"train": train, "validation": validation}
    trainer.log(f"{len(train):,} training and {len(validation):,} validation conversations; "
                f"{train_data.truncated_turns + val_data.truncated_turns} oldest turns dropped and "
                f"{train_data.cut_conversations + val_data.cut_conversations} conversations cut to fit "
                f"--block_size {args.block_size}")
    return trainer.run()


if __name__ == "__main__":
    run_script(main, user_errors=(ValueError, OSError, TrainingError))
