"""Does fine-tuning make the model follow requests? Base against chat model, held-out data.

    python benchmarks/eval_chat.py --base pretrained/tinystories_base.pth --chat pretrained/tinystories_chat.pth

Validation conversations are built from the validation stories of --data exactly as
train_tinystories_chat_model.py builds them (--from_stories, same seed). Reported for both
models: the assistant-only validation loss and, on held-out "uses the words X, Y and Z"
requests (replies sampled at --temperature, --seed), how many replies contain all three
words and what share of the requested words appear, against the share of another request's
words in the same replies (what chance gives: a story often holds common words anyway).
"""

from __future__ import annotations

import argparse
import re

import torch

from bench_utils import SHARED_DATA
from bpe_tokenizer import ENDOFTEXT
from decoding import generate
from evaluation import loss_totals, sequential_batches, summarize_losses, token_byte_lengths
from tinystories_data import ChatExamples, conversations_from_stories, load_stories
from transformer_model import load_checkpoint

WORDS_REQUEST = re.compile(r"the words (\w+), (\w+) and (\w+)")


def words_used(reply: str, words: tuple[str, ...]) -> int:
    """How many of the requested words the reply contains (as whole words, any case)."""
    found = set(re.findall(r"\w+", reply.lower()))
    return sum(word.lower() in found for word in words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="pretrained/tinystories_base.pth")
    parser.add_argument("--chat", default="pretrained/tinystories_chat.pth")
    parser.add_argument("--data", default=str(SHARED_DATA))
    parser.add_argument("--seed", type=int, default=0, help="the fine-tuning run's --seed")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=300)
    parser.add_argument("--requests", type=int, default=100, help="word requests to try (at most)")
    args = parser.parse_args()

    conversations = conversations_from_stories(load_stories(args.data, "validation"), seed=args.seed + 1)
    word_requests = [(WORDS_REQUEST.search(c[i]["content"]).groups(), c[: i + 1])
                     for c in conversations for i in range(len(c))
                     if c[i]["role"] == "user" and WORDS_REQUEST.search(c[i]["content"])][: args.requests]
    print(f"{len(conversations)} validation conversations; {len(word_requests)} 'uses the words' requests\n")
    print("| model | assistant-only val loss | perplexity | bits per byte | replies with all 3 words "
          "| requested words used | another request's words used |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, path in (("base", args.base), ("chat", args.chat)):
        model, tokenizer, _ = load_checkpoint(path, device="cpu")
        examples = ChatExamples(conversations, tokenizer, args.block_size)
        batches = sequential_batches(len(examples), 16)
        metrics = summarize_losses(*loss_totals(model, examples, batches, torch.device("cpu"), None,
                                                token_byte_lengths(tokenizer)))
        eos = tokenizer.special_tokens[ENDOFTEXT]
        all_three = used = control = 0
        for index, (words, messages) in enumerate(word_requests):
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            (tokens,) = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, eos_token_id=eos,
                                 seed=args.seed + index)
            reply = tokenizer.decode(t for t in tokens if t != eos)
            count = words_used(reply, words)
            used, all_three = used + count, all_three + (count == len(words))
            # The control: the words of the next request, which this reply was not asked for.
            control += words_used(reply, word_requests[(index + 1) % len(word_requests)][0])
        asked = 3 * max(len(word_requests), 1)
        print(f"| {name} ({path}) | {metrics['val_loss']:.4f} | {metrics['val_perplexity']:.2f} | "
              f"{metrics['val_bits_per_byte']:.4f} | {all_three}/{len(word_requests)} | {used / asked:.0%} | "
              f"{control / asked:.0%} |", flush=True)


if __name__ == "__main__":
    main()
