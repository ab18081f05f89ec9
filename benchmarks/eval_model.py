"""A checkpoint's loss, perplexity and bits per byte on a whole split, as training measures them.

    python benchmarks/eval_model.py pretrained/tinystories_base.pth --dataset ../shared/data

The split's stories are encoded with the checkpoint's own tokenizer, joined with <|endoftext|>
and cut into windows of --block_size tokens (the training length by default), exactly like the
validation set of train_tinystories_model.py, and scored by the same function
(evaluation.windowed_metrics). Bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted
tokens, so models with different tokenizers compare fairly. --temperatures 1 1.1 1.2 scores
the logits divided by each: a model that scores better above 1 is overconfident (see
calibration.py for choosing one without the validation text).
"""

from __future__ import annotations

import argparse

import torch

from bench_utils import SHARED_DATA
from common import run_script
from evaluation import token_byte_lengths, windowed_metrics
from tinystories_data import encode_stories, load_stories
from transformer_model import load_checkpoint


def evaluate_checkpoint(path: str, dataset: str, split: str = "validation", block_size: int = 0,
                        batch_size: int = 16, bf16: bool = False, temperature: float = 1.0) -> dict:
    """{val_loss, val_perplexity, val_bits_per_byte, val_tokens} of the checkpoint on the split,
    its logits divided by temperature."""
    model, tokenizer, metadata = load_checkpoint(path, device="cpu")
    block_size = block_size or metadata.get("args", {}).get("block_size") or model.config.max_position_embeddings
    tokens = encode_stories(load_stories(dataset, split), tokenizer, desc=f"encoding {split}")
    return windowed_metrics(model, tokens, block_size, batch_size, torch.device("cpu"),
                            torch.bfloat16 if bf16 else None, token_byte_lengths(tokenizer), temperature)


def main(argv: list[str] | None = None) -> None:
    """One table row per checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files (.pth)")
    parser.add_argument("--dataset", default=str(SHARED_DATA), help="hub id or local path (tinystories_data)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--block_size", type=int, default=0, help="window length (default: the training length)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="evaluate under bf16 autocast (default float32)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0],
                        help="divide the logits by each of these in turn: how over- or underconfident a model is "
                             "(a diagnosis only: a temperature chosen on the validation text fits the test)")
    args = parser.parse_args(argv)
    if not all(0 < t < float("inf") for t in args.temperatures):
        parser.error(f"--temperatures must be positive finite numbers, not {args.temperatures}")
    print(f"| checkpoint | temperature | {args.split} loss | perplexity | bits per byte | tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for path in args.checkpoints:
        for temperature in args.temperatures:
            m = evaluate_checkpoint(path, args.dataset, args.split, args.block_size, args.batch_size, args.bf16,
                                    temperature)
            print(f"| {path} | {temperature:g} | {m['val_loss']:.4f} | {m['val_perplexity']:.2f} | "
                  f"{m['val_bits_per_byte']:.4f} | {m['val_tokens']:,.0f} |", flush=True)


if __name__ == "__main__":
    run_script(main)
