"""Pretrain the TinyStories transformer.

    python train_tinystories_model.py --dataset roneneldan/TinyStories --output_dir tinystories_model \\
        --num_epochs 10 --batch_size 32
    python train_tinystories_model.py --dataset ../shared/data --output_dir tinystories_model
    python train_tinystories_model.py --dataset ../shared/data --output_dir tinystories_model --resume  # after Ctrl-C
    torchrun --nproc_per_node=4 train_tinystories_model.py --dataset ...             # several GPUs/nodes

Stories are encoded once with the tokenizer (--tokenizer_path, from train_bpe_tokenizer_hf.py)
and cached; the model trains on windows of --block_size tokens with AdamW (or --optimizer
muon), warm-up and cosine decay (or --lr_schedule warmdown, ...), gradient clipping, mixed precision and gradient accumulation; it is evaluated every
--eval_interval steps (loss, perplexity, bits per byte) and stops early when validation stops
improving. --output_dir receives best_model.pth, final_model.pth, last.pth (for --resume),
config.json and TensorBoard logs.

The program, top to bottom: the flags (one per TransformerConfig field, then the data and the
training flags), the tokenizer, the data (tinystories_data.prepare_pretraining_data), the model,
and training.train, the loop it shares with train_tinystories_chat_model.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from bpe_tokenizer import BPETokenizer
from common import run_script
from tinystories_data import DEFAULT_DATASET, prepare_pretraining_data
from training import TrainingError, add_training_args, check_training_args, train
from transformer_model import TransformerConfig, TransformerLM


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TransformerConfig field (but vocab_size, which the tokenizer sets), with
    the config's defaults: every architecture ablation is one flag."""
    group = parser.add_argument_group("model (TransformerConfig)")
    for field in dataclasses.fields(TransformerConfig):
        if field.name == "vocab_size":
            continue
        default = field.default
        if isinstance(default, bool):
            group.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=default)
        elif field.name == "window_size":
            group.add_argument("--window_size", type=int, default=default, help="0 = full causal attention")
        else:
            group.add_argument(f"--{field.name}", type=type(default), default=default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The data, model and training flags, checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=DEFAULT_DATASET, help="hub id or local path (see tinystories_data)")
    data.add_argument("--val_dataset", default=None, help="validation data (default: --dataset's validation "
                      "split, or a held-out share of its stories)")
    data.add_argument("--val_fraction", type=float, default=0.05)
    data.add_argument("--text_column", default="text")
    data.add_argument("--tokenizer_path", default="bpe_tokenizer.json")
    data.add_argument("--block_size", type=int, default=256)
    data.add_argument("--max_train_stories", type=int, default=0, help="a seeded sample (0 = all)")
    data.add_argument("--max_val_stories", type=int, default=0, help="a seeded sample (0 = all)")
    data.add_argument("--calibration_stories", type=int, default=0,
                      help="training stories held out to fit a temperature for the logits at each evaluation, "
                      "folded into the saved best model (calibration.py; 0 = none)")
    data.add_argument("--words_lines", type=float, default=0.0,
                      help="the share of training stories that start with a line 'Words: a, b, c' naming three of "
                      "their words, then 'Story:' (TinyStoriesInstruct's metadata), so that the model learns to "
                      "use words it is given (0 = none)")
    data.add_argument("--cache_dir", default=None, help="encoded data (default: OUTPUT_DIR/data_cache)")
    data.add_argument("--num_workers", type=int, default=None, help="processes that encode the data")
    add_model_args(parser)
    add_training_args(parser)
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if args.cache_dir and os.path.isfile(args.cache_dir):  # (a read-only cache that holds the streams is fine)
        parser.error(f"--cache_dir {args.cache_dir}: it is a file; give a folder")
    if args.block_size > args.max_position_embeddings:
        parser.error(f"--block_size {args.block_size} is above the model's context, --max_position_embeddings "
                     f"{args.max_position_embeddings}")
    return args


def model_config(args: argparse.Namespace, vocab_size: int) -> TransformerConfig:
    """The model the flags describe, for a tokenizer of vocab_size tokens."""
    fields = {f.name for f in dataclasses.fields(TransformerConfig)} - {"vocab_size"}
    return TransformerConfig(vocab_size=vocab_size, **{name: getattr(args, name) for name in fields})


def load_tokenizer(path: str) -> BPETokenizer:
    """The tokenizer at path, or a ValueError that says how to make one."""
    if not os.path.exists(path):
        raise ValueError(f"no tokenizer at {path}: train one first (python train_bpe_tokenizer_hf.py --dataset ...) "
                         "or pass --tokenizer_path")
    return BPETokenizer.load(path)


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, load the tokenizer and the data, build the model, train; returns the
    run's state (training.train)."""
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer_path)
    config = model_config(args, tokenizer.vocab_size)
    # Training and validation windows, encoded once and cached (OUTPUT_DIR/data_cache by default).
    data = prepare_pretraining_data(
        tokenizer, args.dataset, args.block_size, args.cache_dir or os.path.join(args.output_dir, "data_cache"),
        val_dataset=args.val_dataset, val_fraction=args.val_fraction, text_column=args.text_column,
        max_train_stories=args.max_train_stories, max_val_stories=args.max_val_stories, seed=args.seed,
        num_workers=args.num_workers, calibration_stories=args.calibration_stories, words_lines=args.words_lines)
    torch.manual_seed(args.seed)  # the same seed gives the same initial weights
    model = TransformerLM(config)
    return train(args, model, tokenizer, data["train"], data["validation"], calibration_data=data.get("calibration"))


if __name__ == "__main__":
    run_script(main, user_errors=(ValueError, OSError, TrainingError))
