"""Instruction-tune a pretrained TinyStories model into a chat model (assistant-only loss).

    python train_tinystories_chat_model.py --base_model tinystories_model/best_model.pth \\
        --output_dir tinystories_chat_model --from_stories ../shared/data
    python train_tinystories_chat_model.py --base_model pretrained/tinystories_base.pth \\
        --dataset roneneldan/TinyStoriesInstruct          # or a JSON/JSONL/parquet "messages" column

Conversations come from --dataset (a "messages" column in the hub's chat format, or
TinyStoriesInstruct text) or are built from plain stories with --from_stories (the first
epoch's are written to OUTPUT_DIR/conversations_{train,validation}.jsonl to inspect). Each
becomes one row of --block_size tokens through the chat template; only the assistant's tokens
count in the loss.

Built from stories, the training conversations are made anew every epoch (--requests fresh:
new words, names, cut points, phrasings and system prompts), weighted towards requests a
reply can be checked against (--checkable_weight); with --swapped_words, a share of the words
requests ask for words swapped into the story, which the model must copy from the request
(chat_data.swapped_words_request). --requested_weight stresses, in the loss, the reply's
tokens that show a request was followed (chat_data.requested_tokens); --balancing_weight
pushes each requested item down before its first use (chat_data.avoided_tokens), so that
stress does not teach the model to overuse the words. The best model is the
one that follows requests best (request_following.py) on --select_requests requests of each
kind, made from --select_stories training stories held out for it, asked at every evaluation.

The loop is pretraining's (training.train): AdamW, warm-up and decay, mixed precision,
accumulation, early stopping, checkpoints, exact --resume, Ctrl-C safety, TensorBoard. Three
of its hooks make it a chat run: the sample at each evaluation is a reply to --sample_prompt
sent through the chat template (reply_prompt), built conversations are written into the output
dir once it is claimed (write_conversations), and each evaluation scores request-following
(score_requests).

The program, top to bottom: the flags, the data (split_data, training_rows), the hooks,
set_dropout, and main: the base model, the rows, training.train.
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
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from bpe_tokenizer import DEFAULT_SPECIAL_TOKENS, BPETokenizer
from chat_data import ChatExamples, FreshChatExamples, conversations_from_stories, load_conversations
from common import run_script
from request_following import CHAT_MAX_NEW_TOKENS, follow_rates, follow_score
from tinystories_data import DataError, SplitNotFoundError, hold_out, load_stories
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
    built = parser.add_argument_group("conversations built from stories (--from_stories)")
    built.add_argument("--requests", choices=["fresh", "fixed"], default="fresh",
                       help="fresh: new requests every epoch (default); fixed: one set built once")
    built.add_argument("--checkable_weight", type=float, default=3.0,
                       help="how much likelier a checkable request (words, name, continuation) is than a plain one")
    built.add_argument("--swapped_words", type=float, default=1.0,
                       help="the share of words requests whose words are swapped into the story, so that the reply "
                            "cannot come from memory of a pretraining story (0 to 1)")
    built.add_argument("--requested_weight", type=float, default=20.0,
                       help="how much a reply's tokens that show its request was followed (the first use of each "
                            "requested word, name or character) weigh in the loss; every other token weighs 1")
    built.add_argument("--balancing_weight", type=float, default=0.0,
                       help="how hard the loss pushes a requested item's first token down at the reply's tokens "
                            "before its first use (chat_data.avoided_tokens); requested_weight - 1 balances the push "
                            "up, so the model does not overuse requested words (0: off)")
    built.add_argument("--select_requests", type=int, default=10,
                       help="choose the best model (and stop early) on request-following: this many requests of "
                            "each kind, asked at each evaluation (0: on the validation loss)")
    built.add_argument("--select_stories", type=int, default=100,
                       help="training stories held out to make those requests from")
    data.add_argument("--dropout", type=float, default=None, help="override the base model's dropout")
    data.add_argument("--attention_dropout", type=float, default=None,
                      help="override the base model's attention dropout (0 is twice as fast on CPU)")
    add_training_args(parser, learning_rate=1e-4)
    parser.set_defaults(output_dir="tinystories_chat_model", num_epochs=3, warmup_steps=50, eval_interval=100,
                        sample_prompt="Tell me a story about a brave little cat.")
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if args.dataset:
        args.select_requests = 0  # requests are made from stories; a conversation data set has none
    if args.select_requests < 0 or args.select_stories < 1:
        parser.error("--select_requests must be >= 0 and --select_stories >= 1")
    return args


def split_data(args: argparse.Namespace) -> dict[str, list]:
    """The conversations (--dataset) or stories (--from_stories) of each set: "train" and
    "validation" (the source's validation split when it has one, else a seeded held-out
    share), and with --select_requests the "select" stories, held out of training."""
    def load(split: str) -> list:
        if args.dataset:
            return load_conversations(args.dataset, split, seed=args.seed)
        return load_stories(args.from_stories, split)

    train = load("train")
    try:
        validation = load("validation")
    except SplitNotFoundError:
        # Held out by story: a built conversation may take the next story for its second
        # turn, and that must not reach across the split.
        train, validation = hold_out(train, float(args.val_fraction), args.seed)
    sets = {"train": train, "validation": validation}
    if args.select_requests:
        try:
            sets["train"], sets["select"] = hold_out(train, args.select_stories, args.seed + 1)
        except DataError as err:
            raise DataError(f"--select_stories {args.select_stories}: {err} (lower it, or pass --select_requests 0 "
                            "to choose on the loss)") from None
    for name, limit in (("train", args.max_train_conversations), ("validation", args.max_val_conversations)):
        if limit and limit < len(sets[name]):
            sets[name] = random.Random(args.seed).sample(sets[name], limit)
    return sets


def training_rows(args: argparse.Namespace, tokenizer: BPETokenizer,
                  sets: dict[str, list]) -> tuple[Dataset, ChatExamples, dict[str, list]]:
    """The training and validation rows, and the conversations built from stories (to write
    out). Validation conversations are built once; training ones every epoch (--requests fresh)."""
    if args.dataset:
        return (ChatExamples(sets["train"], tokenizer, args.block_size),
                ChatExamples(sets["validation"], tokenizer, args.block_size), {})
    validation = conversations_from_stories(sets["validation"], seed=args.seed + 1,
                                            checkable_weight=args.checkable_weight)
    if args.requests == "fresh":
        train_data = FreshChatExamples(sets["train"], tokenizer, args.block_size, seed=args.seed,
                                       requested_weight=args.requested_weight, balancing_weight=args.balancing_weight,
                                       checkable_weight=args.checkable_weight, swapped_words=args.swapped_words)
        train = train_data.conversations
    else:
        train = conversations_from_stories(sets["train"], seed=args.seed, checkable_weight=args.checkable_weight,
                                           swapped_words=args.swapped_words)
        train_data = ChatExamples(train, tokenizer, args.block_size, args.requested_weight, args.balancing_weight)
    return train_data, ChatExamples(validation, tokenizer, args.block_size), {"train": train, "validation": validation}


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


def score_requests(model: torch.nn.Module, tokenizer: BPETokenizer, stories: list[str],
                   args: argparse.Namespace) -> dict:
    """The score_model hook: request-following on requests made from the held-out --select
    stories (the same requests at every evaluation), as one score and per request type."""
    # Replies up to half a row: in training, a request and its reply share one --block_size row.
    rates = follow_rates(model, tokenizer, stories, per_kind=args.select_requests, seed=args.seed,
                         max_new_tokens=min(CHAT_MAX_NEW_TOKENS, args.block_size // 2))
    return {"score": follow_score(rates), **{f"follow/{label}": rate["followed"] for label, rate in rates.items()},
            **{f"follow/{label}: {key}": rate[key] for label, rate in rates.items()
               for key in ("each word", "uses per word") if key in rate}}


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
    sets = split_data(args)
    train_data, val_data, built = training_rows(args, tokenizer, sets)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, the first process reports
        tqdm.write(f"{len(train_data):,} training and {len(val_data):,} validation conversations "
                   f"({args.requests if args.from_stories else 'from ' + args.dataset}); "
                   f"{val_data.truncated_turns} oldest validation turns dropped and {val_data.cut_conversations} "
                   f"validation conversations cut to fit --block_size {args.block_size}")
    score = functools.partial(score_requests, tokenizer=tokenizer, stories=sets.get("select", []), args=args)
    return train(args, model.train(), tokenizer, train_data, val_data, kind="chat",
                 prompt_ids=functools.partial(reply_prompt, tokenizer),
                 on_output_dir_ready=functools.partial(write_conversations, conversations=built),
                 score_model=score if args.select_requests else None)

if __name__ == "__main__":
    run_script(main, user_errors=(ValueError, OSError, TrainingError))
