"""Write stories with a trained model: sampling (temperature, top-k, top-p), beam search, or
beam search that must use given words (--force_words).

    python generate_tinystories_text.py --prompt "Once upon a time"
    python generate_tinystories_text.py --model_path tinystories_model/best_model.pth \\
        --prompt "Once upon a time" --temperature 0.8
    echo "Tom found a box" | python generate_tinystories_text.py --num_samples 3 --seed 1
    python generate_tinystories_text.py --force_words "apple, rocket, blue"

The prompt comes from --prompt (repeatable), --prompt_file, or standard input; an empty
prompt starts a story from scratch. A prompt is text: a typed `<|endoftext|>` or `<user>` is
encoded as those characters, not as the special token, as in the chat. On a terminal the text
streams as it is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bpe_tokenizer import ENDOFTEXT, BPETokenizer
from common import run_script
from decoding import (
    STORY_SAMPLING,
    LanguageModel,
    beam_search,
    check_length_penalty,
    check_sampling,
    constrained_beam_search,
    generate,
    split_words,
    stream,
    word_constraints,
)
from speedups import compile_decoding, filter_top_p_fast, quantize_int8, use_few_row_linear
from transformer_model import load_checkpoint

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "pretrained" / "tinystories_base.pth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=DEFAULT_MODEL, help="a checkpoint (default: the released pretrained/tinystories_base.pth)")
    parser.add_argument("--prompt", action="append", help="the start of a story; repeat for several")
    parser.add_argument("--prompt_file", help="read one prompt from this file")
    parser.add_argument("--max_new_tokens", type=int, default=STORY_SAMPLING["max_new_tokens"])
    parser.add_argument("--temperature", type=float, default=STORY_SAMPLING["temperature"], help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=STORY_SAMPLING["top_k"],
                        help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top_p", type=float, default=STORY_SAMPLING["top_p"], help="nucleus sampling mass (1 = off)")
    parser.add_argument("--num_beams", type=int, default=None,
                        help="> 1: beam search instead of sampling (default 1, or 4 with --force_words)")
    parser.add_argument("--force_words", default="",
                        help="words every story must use (commas, spaces or \"and\" between them): a constrained beam search")
    parser.add_argument("--length_penalty", type=float, default=1.0, help="beam search: score / length ** this")
    parser.add_argument("--repetition_penalty", type=float, default=STORY_SAMPLING["repetition_penalty"])
    parser.add_argument("--no_repeat_ngram_size", type=int, default=0)
    parser.add_argument("--num_samples", type=int, default=1, help="stories per prompt")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="print tokens as they come (default: on a terminal)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoding step on the first new token: about twice as fast afterwards, "
                             "for some seconds of compiling (CUDA graphs on a GPU); see benchmarks/RESULTS.md")
    parser.add_argument("--quantize", choices=["int8"], help="CPU: dynamic int8 quantisation of the linear layers")
    parser.add_argument("--show_stats", action="store_true", help="prompt tokens, new tokens and tokens/second")
    args = parser.parse_args(argv)
    args.force_words = split_words(args.force_words)
    if args.num_beams is None:
        args.num_beams = 4 if args.force_words else 1
    for name in ("max_new_tokens", "num_samples", "num_beams"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if (args.num_beams > 1 or args.force_words) and args.num_samples > args.num_beams:
        parser.error(f"--num_samples {args.num_samples} is more than --num_beams {args.num_beams} can return")
    if args.prompt and args.prompt_file:
        parser.error("give --prompt or --prompt_file, not both")
    try:  # the sampling and beam settings, checked before the model is loaded
        check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
        check_length_penalty(args.length_penalty)
    except ValueError as err:
        parser.error(f"--{err}")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return [f.read().rstrip("\n")]
        except OSError as err:
            raise ValueError(f"--prompt_file {args.prompt_file}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--prompt_file {args.prompt_file}: not UTF-8 text; save it as UTF-8") from None
    if not sys.stdin.isatty():
        return [sys.stdin.read().rstrip("\n")]
    return ["Once upon a time"]


def print_stream(pieces: Iterator[str]) -> int:
    """Print text pieces as they arrive; returns how many tokens the stream made."""
    while True:
        try:
            print(next(pieces), end="", flush=True)
        except StopIteration as finished:
            print()
            return len(finished.value)


def print_story(prompt: str, body: str, index: int | None, note: str = "", end: str = "\n") -> None:
    if index is not None:
        print(f"--- {'beam' if note else 'sample'} {index + 1}{f' ({note})' if note else ''}")
    print(prompt + body, end=end, flush=True)


def report(args: argparse.Namespace, prompt_ids: list[int], new_tokens: int, seconds: float, compiling: bool) -> None:
    if args.show_stats:
        print(f"[{len(prompt_ids)} prompt tokens, {new_tokens} new tokens, {new_tokens / seconds:.1f} tokens/s"
              f"{', compiling included' if compiling else ''}]", file=sys.stderr)


def search_beams(args: argparse.Namespace, model: LanguageModel, tokenizer: BPETokenizer, prompt_ids: list[int],
                 settings: dict) -> list[tuple[list[int], float]]:
    """The best beams for one prompt: a plain beam search, or one that must use --force_words."""
    common = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty,
                  num_return_sequences=args.num_samples, **settings)
    if not args.force_words:
        return beam_search(model, prompt_ids, **common)
    return constrained_beam_search(model, prompt_ids, word_constraints(tokenizer, args.force_words), **common)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.path.exists(args.model_path) and args.model_path == DEFAULT_MODEL:
        raise ValueError(f"{args.model_path} is not here: train a model (train_tinystories_model.py) and pass "
                         "--model_path tinystories_model/best_model.pth")
    model, tokenizer, _ = load_checkpoint(args.model_path, device=args.device)
    # The speed paths (speedups.py): the same tokens, faster.
    model = quantize_int8(model) if args.quantize else use_few_row_linear(model)
    if args.compile:
        model = compile_decoding(model)
    eos = tokenizer.special_tokens.get(ENDOFTEXT)
    settings = dict(eos_token_id=eos, bos_token_id=eos)
    sampling = dict(settings, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                    top_p_filter=filter_top_p_fast)
    streaming = sys.stdout.isatty() if args.stream is None else args.stream
    if args.seed is not None:
        torch.manual_seed(args.seed)

    compiling = args.compile  # the first story's time includes compiling the decoding step
    for prompt in read_prompts(args):
        prompt_ids = tokenizer.encode(prompt, allowed_special="none")
        if args.num_beams > 1 or args.force_words:
            start = time.perf_counter()
            results = search_beams(args, model, tokenizer, prompt_ids, settings)
            for index, (tokens, score) in enumerate(results):
                body = tokenizer.decode(t for t in tokens if t != eos)
                print_story(prompt, body, index, f"beam score {score:.3f}")
            report(args, prompt_ids, sum(len(t) for t, _ in results), time.perf_counter() - start, compiling)
            compiling = False
            continue
        for index in range(args.num_samples):
            start = time.perf_counter()
            label = index if args.num_samples > 1 else None
            if streaming:
                print_story(prompt, "", label, end="")
                new_tokens = print_stream(stream(model, tokenizer, prompt_ids, args.max_new_tokens, **sampling))
            else:
                (tokens,) = generate(model, prompt_ids, args.max_new_tokens, **sampling)
                print_story(prompt, tokenizer.decode(t for t in tokens if t != eos), label)
                new_tokens = len(tokens)
            report(args, prompt_ids, new_tokens, time.perf_counter() - start, compiling)
            compiling = False


if __name__ == "__main__":
    run_script(main)
