"""Does fine-tuning make the model do what it is asked? Base against chat model, held-out stories.

    python benchmarks/eval_chat.py --base pretrained/tinystories_base.pth --chat pretrained/tinystories_chat.pth
    python benchmarks/eval_chat.py --chat pretrained/tinystories_chat.pth tinystories_chat_model/best_model.pth
    python benchmarks/eval_chat.py --per_kind 20 --json out.json     # a quick look, kept as JSON
    python benchmarks/eval_chat.py --forced 50    # and forced words (constrained beam search), apart
    python benchmarks/eval_chat.py --words_line pretrained/tinystories_base.pth tinystories_model/best_model.pth

For each model (the base, then each --chat model: "chat", or "chat 1", "chat 2", ...):
request-following per request type (request_following.follow_rates) on requests made from the
validation stories of --data, with the replies sampled at the chat REPL's defaults, and the
assistant-only validation loss on conversations built from the same stories as
train_tinystories_chat_model.py --from_stories builds them. Every "followed" share
sits beside its control: the same check against another request's content. Each words row is
followed by an "each word" row: the mean share of the three words a reply holds (and of the
control's), which shows progress before all three words do, and by a "uses per word" row,
which asks whether a model overuses the words: how often a reply uses each requested word it
holds, on average, and in the control column how often the story the request was made from
uses them. The last rows, "words line", ask for the words without the chat, in front of a
story ("Words: a, b, c\nStory:"): what a base model pretrained with --words_lines has learned.

--forced N measures lexically constrained decoding on its own, never as part of the model's
request-following: the first N word requests answered by constrained_beam_search with the
words forced (4 beams), the share of replies that hold all three as words (a forced " cat"
may still grow into "cats"), and the time a reply takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_utils import SHARED_DATA, machine_line
from bpe_tokenizer import ENDOFTEXT
from chat_data import ChatExamples, conversations_from_stories
from common import run_script
from decoding import constrained_beam_search, word_constraints
from evaluation import loss_totals, sequential_batches, summarize_losses, token_byte_lengths
from request_following import (
    CHAT_MAX_NEW_TOKENS,
    CHAT_SAMPLING,
    follow_rates,
    holds_words,
    request_tests,
    words_line_rates,
)
from speedups import use_few_row_linear
from tinystories_data import load_stories
from transformer_model import load_checkpoint


def assistant_loss(model: torch.nn.Module, tokenizer, stories: list[str], seed: int, block_size: int) -> dict:
    """The assistant-only loss on the validation conversations the fine-tuning run builds."""
    examples = ChatExamples(conversations_from_stories(stories, seed=seed + 1), tokenizer, block_size)
    return summarize_losses(*loss_totals(model, examples, sequential_batches(len(examples), 16), torch.device("cpu"),
                                         None, token_byte_lengths(tokenizer)))


def forced_words(model: torch.nn.Module, tokenizer, stories: list[str], args: argparse.Namespace) -> dict:
    """Constrained beam search on the first --forced word requests: the share of replies
    holding all three words as words, and the median seconds a reply takes."""
    eos = tokenizer.special_tokens[ENDOFTEXT]
    requests = [t.request for t in request_tests(stories, args.forced, args.seed) if t.label == "words"]
    held, seconds = 0, []
    for request in requests:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": request.text}], add_generation_prompt=True)
        start = time.perf_counter()
        (tokens, _), *_ = constrained_beam_search(model, prompt, word_constraints(tokenizer, request.content), 4,
                                                  args.max_new_tokens, eos_token_id=eos)
        seconds.append(time.perf_counter() - start)
        held += holds_words(tokenizer.decode(t for t in tokens if t != eos), request.content)
    return {"requests": len(requests), "held": held / max(len(requests), 1),
            "median_seconds": statistics.median(seconds) if seconds else 0.0}


def evaluate(path: str, stories: list[str], args: argparse.Namespace) -> dict:
    model, tokenizer, _ = load_checkpoint(path, device="cpu")
    use_few_row_linear(model)  # a speed path (speedups.py): the same tokens, faster
    rates = {**follow_rates(model, tokenizer, stories, args.per_kind, args.seed, args.max_new_tokens),
             **words_line_rates(model, tokenizer, stories, args.per_kind, args.seed, args.max_new_tokens)}
    result = {"path": path, "rates": rates, "loss": assistant_loss(model, tokenizer, stories, args.seed, args.block_size)}
    if args.forced:
        result["forced"] = forced_words(model, tokenizer, stories, args)
    return result


def words_line_only(paths: list[str], stories: list[str], args: argparse.Namespace) -> dict:
    """The words-line row alone for each model: does a base model pretrained with
    --words_lines write the words it is given in front of a story?"""
    results = {}
    for path in paths:
        model, tokenizer, _ = load_checkpoint(path, device="cpu")
        use_few_row_linear(model)
        results[path] = words_line_rates(model, tokenizer, stories, args.per_kind, args.seed,
                                         args.max_new_tokens)["words line"]
    print(f"Words lines at the chat REPL's sampling {CHAT_SAMPLING}, up to {args.max_new_tokens} new tokens; "
          f"{machine_line()}\n\n| model | requests | followed | control |\n| --- | ---: | ---: | ---: |")
    for path, rate in results.items():
        print(f"| {path} | {rate['requests']} | {rate['followed']:.0%} | {rate['control']:.0%} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def table(results: dict[str, dict]) -> str:
    """One row per request type, a followed and a control column per model; the loss last."""
    names = list(results)

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [row(["request", "requests", *(f"{n} {c}" for n in names for c in ("followed", "control"))]),
             row(["---", "---:", *(["---:"] * 2 * len(names))])]
    for label, entry in results[names[0]]["rates"].items():
        rates = [results[n]["rates"][label] for n in names]
        lines.append(row([label, str(entry["requests"]),
                          *(f"{rate[c]:.0%}" for rate in rates for c in ("followed", "control"))]))
        if "each word" in entry:  # words requests: the share of the words used, as well as all three
            lines.append(row([f"{label}: each word", str(entry["requests"]),
                              *(f"{rate[c]:.0%}" for rate in rates for c in ("each word", "each word control"))]))
            lines.append(row([f"{label}: uses per word (story's own)", str(entry["requests"]),
                              *(f"{rate[c]:.1f}" if c in rate else "-" for rate in rates
                                for c in ("uses per word", "uses per word in the story"))]))
    losses = [results[n]["loss"] for n in names]
    lines.append(row(["assistant-only val loss (bits/byte)", "",
                      *(cell for loss in losses for cell in (f"{loss['val_loss']:.4f} ({loss['val_bits_per_byte']:.4f})",
                                                             ""))]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="pretrained/tinystories_base.pth")
    parser.add_argument("--chat", nargs="+", default=["pretrained/tinystories_chat.pth"], help="one or more")
    parser.add_argument("--data", default=str(SHARED_DATA), help="its validation stories make the requests")
    parser.add_argument("--per_kind", type=int, default=100, help="requests of each kind, as first and as second turn")
    parser.add_argument("--seed", type=int, default=0, help="the requests' and the sampling's (and the fine-tuning run's)")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--max_new_tokens", type=int, default=CHAT_MAX_NEW_TOKENS)
    parser.add_argument("--forced", type=int, default=0, help="also try forced words on this many word requests")
    parser.add_argument("--words_line", nargs="+", metavar="MODEL",
                        help="only the words-line row, for these (base) models, in place of everything else")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    models = {"--words_line": args.words_line} if args.words_line else {"--base": [args.base], "--chat": args.chat}
    for flag, paths in models.items():
        for path in paths:
            if not Path(path).is_file():  # refused before any model is evaluated
                parser.error(f"{flag} {path}: no such file")
    torch.manual_seed(args.seed)
    stories = load_stories(args.data, "validation")
    if args.words_line:
        return words_line_only(args.words_line, stories, args)
    chats = {"chat": args.chat[0]} if len(args.chat) == 1 else {f"chat {i}": p for i, p in enumerate(args.chat, 1)}
    results = {name: evaluate(path, stories, args) for name, path in {"base": args.base, **chats}.items()}
    print(f"Request-following at the chat REPL's sampling {CHAT_SAMPLING}, up to {args.max_new_tokens} new tokens, "
          f"requests from {len(stories)} validation stories of {args.data}; {machine_line()}\n")
    print(table(results))
    print("\n" + "; ".join(f"{name}: {result['path']}" for name, result in results.items()))
    for name, result in results.items():
        if "forced" in result:
            forced = result["forced"]
            print(f"\n{name}, words forced by constrained_beam_search (4 beams), not part of the table above: "
                  f"{forced['held']:.0%} of {forced['requests']} replies hold all three as words; "
                  f"median {forced['median_seconds']:.1f} s a reply")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    run_script(main)
