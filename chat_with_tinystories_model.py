"""Chat with a TinyStories chat model in the terminal.

    python chat_with_tinystories_model.py --temperature 0.7
    python chat_with_tinystories_model.py --model_path tinystories_chat_model/final_model.pth --system "Be kind."
    printf 'Tell me a story about a dog.\\nAnother one, please.\\n' | python chat_with_tinystories_model.py

Type a message and press Enter; the reply streams as it is written. Ctrl-C stops a reply,
Ctrl-D (or /quit) leaves. When standard input is not a terminal, each line is one message and
the conversation is printed as a transcript.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import torch

from bpe_tokenizer import ENDOFTEXT, BPETokenizer
from chat_data import fit_conversation
from common import run_script, write_atomically
from decoding import LanguageModel, check_sampling, constrained_beam_search, split_words, stream, word_constraints
from request_following import CHAT_MAX_NEW_TOKENS, CHAT_SAMPLING
from speedups import filter_top_p_fast, use_few_row_linear
from transformer_model import TransformerConfig, load_checkpoint

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "pretrained" / "tinystories_chat.pth")
HELP = """commands:
  /help                 this list
  /reset                forget the conversation (the system prompt stays)
  /system TEXT          set the system prompt (empty TEXT removes it)
  /set NAME VALUE       temperature, top_k, top_p, max_new_tokens, repetition_penalty or seed
  /force WORDS          the next reply must use these words (a beam search, printed when done)
  /history              show the conversation
  /save FILE            write the conversation as JSON ({"messages": [...]}) to a new file
  /quit                 leave (Ctrl-D works too); Ctrl-C stops a reply"""
SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int,
            "repetition_penalty": float, "seed": int}
FORCE_BEAMS = 4  # beams for a /force reply


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=DEFAULT_MODEL, help="default: the released pretrained/tinystories_chat.pth")
    parser.add_argument("--system", default=None, help="a system prompt for the whole conversation")
    # The defaults are the ones request-following is measured at (request_following.py).
    for name, value in CHAT_SAMPLING.items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    parser.add_argument("--max_new_tokens", type=int, default=CHAT_MAX_NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def check_settings(settings: dict, config: TransformerConfig) -> None:
    """Raise ValueError for a setting the model cannot sample with, before a reply needs it.
    A reply may outrun the context only where the cache slides (a window, no learned table)."""
    check_sampling(settings["temperature"], settings["top_k"], settings["top_p"], settings["repetition_penalty"])
    slides = bool(config.window_size) and config.position_embedding != "learned"
    limit = None if slides else config.max_position_embeddings - 1
    if settings["max_new_tokens"] < 1 or (limit and settings["max_new_tokens"] > limit):
        raise ValueError(f"max_new_tokens must be from 1 to {limit or 'any length'}, not {settings['max_new_tokens']}")


class ChatSession:
    """A conversation with the model: the history, the sampling settings, and the rule that
    keeps the prompt inside the context (oldest turns go first, the system prompt stays)."""

    def __init__(self, model: LanguageModel, tokenizer: BPETokenizer, settings: dict, system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = dict(settings)
        self.system = system
        self.messages: list[dict] = []
        self.forced_words: list[str] = []  # for the next reply only (/force)
        self.generator = torch.Generator(next(model.parameters()).device)
        self.reseed()

    def reseed(self) -> None:
        seed = self.settings.get("seed")
        if seed is None:
            self.generator.seed()  # a fresh random seed
        else:
            self.generator.manual_seed(seed)

    def conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def prompt_ids(self) -> tuple[list[int], int]:
        """The tokens to continue, and how many old turns had to be dropped to fit."""
        context = self.model.config.max_position_embeddings
        room = max(context - self.settings["max_new_tokens"], context // 2)  # a long reply may slide past the context
        kept, dropped = fit_conversation(self.conversation(), self.tokenizer, room, add_generation_prompt=True)
        if dropped:
            self.messages = [m for m in kept if m["role"] != "system"]
        ids = self.tokenizer.apply_chat_template(kept, add_generation_prompt=True)
        return ids[-room:], dropped

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to a user message; the (possibly interrupted) reply joins the
        history when the stream ends."""
        self.messages.append({"role": "user", "content": text})
        ids, dropped = self.prompt_ids()
        if dropped:
            yield f"[{dropped} oldest messages dropped to fit the context] "
        eos = self.tokenizer.special_tokens[ENDOFTEXT]
        pieces: list[str] = []
        knobs = {k: v for k, v in self.settings.items() if k not in ("seed", "max_new_tokens")}
        try:
            for piece in (self.forced_reply(ids, eos) if self.forced_words else
                          stream(self.model, self.tokenizer, ids, self.settings["max_new_tokens"], eos_token_id=eos,
                                 generator=self.generator, top_p_filter=filter_top_p_fast, **knobs)):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def forced_reply(self, ids: list[int], eos: int) -> Iterator[str]:
        """The best beam that uses every /force word, all at once: a beam is only known to be
        best when the search ends. The words are forced for this reply only; words that
        cannot fit in max_new_tokens give a one-line note instead of a reply."""
        constraints = word_constraints(self.tokenizer, self.forced_words)
        self.forced_words = []
        try:
            (tokens, _), *_ = constrained_beam_search(self.model, ids, constraints, FORCE_BEAMS,
                                                      self.settings["max_new_tokens"], eos_token_id=eos)
        except ValueError as err:
            yield f"[/force: {err}; /set max_new_tokens higher]"
            return
        yield self.tokenizer.decode(t for t in tokens if t != eos)

    def save(self, path: str) -> str:
        """/save: the conversation as JSON in a new file; an existing file is never replaced."""
        if os.path.lexists(path):
            return f"/save: {path} exists; give a new file name"
        text = json.dumps({"messages": self.conversation()}, ensure_ascii=False, indent=1)
        try:
            write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        except OSError as err:
            return f"/save: {err}"
        return f"(saved to {path})"

    def command(self, line: str) -> str:
        """Run a /command; returns what to print."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if name == "help":
            return HELP
        if name == "reset":
            self.messages = []
            return "(conversation forgotten)"
        if name == "system":
            self.system = rest or None
            return f"(system prompt: {self.system!r})"
        if name == "history":
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.conversation()) or "(empty)"
        if name == "save":
            return self.save(rest) if rest else "usage: /save FILE"
        if name == "force":
            self.forced_words = split_words(rest)
            return f"(the next reply must use: {', '.join(self.forced_words)})" if self.forced_words else \
                "usage: /force WORDS, e.g. /force apple rocket blue"
        if name == "set":
            key, _, value = rest.partition(" ")
            if key not in SETTINGS:
                return f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}"
            try:
                parsed = SETTINGS[key](value)
            except ValueError:
                return f"/set {key}: {value!r} is not a {SETTINGS[key].__name__}"
            try:
                check_settings({**self.settings, key: parsed}, self.model.config)
            except ValueError as err:
                return f"/set {key}: {err}"
            self.settings[key] = parsed
            if key == "seed":
                self.reseed()
            return f"({key} = {self.settings[key]})"
        return f"unknown command /{name}; /help lists them"


def clean(line: str) -> str:
    """Drop control characters (a stray escape or NUL from a paste); keep tabs and all text,
    invisible format characters included (the zero-width joiner holds a family emoji together)."""
    return "".join(c for c in line if c == "\t" or unicodedata.category(c) != "Cc").strip()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model_path == DEFAULT_MODEL and not Path(DEFAULT_MODEL).exists():
        raise ValueError(f"{DEFAULT_MODEL} is not here: fine-tune one (train_tinystories_chat_model.py) and pass "
                         "--model_path tinystories_chat_model/final_model.pth")
    model, tokenizer, _ = load_checkpoint(args.model_path, device=args.device)
    use_few_row_linear(model)  # a speed path (speedups.py): the same tokens, faster
    if "<assistant>" not in tokenizer.special_tokens:
        raise ValueError(f"{args.model_path}: not a chat model (its tokenizer has no <assistant> token)")
    settings = {name: getattr(args, name) for name in SETTINGS}
    check_settings(settings, model.config)
    session = ChatSession(model, tokenizer, settings, args.system)
    interactive = sys.stdin.isatty()
    with contextlib.suppress(AttributeError):  # bytes that are not UTF-8 become U+FFFD, not an exit
        sys.stdin.reconfigure(errors="replace")
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input(), where there is readline
            import readline  # noqa: F401
        print("Chat with a TinyStories model. /help lists the commands; Ctrl-D leaves.")
    while True:
        replying = False
        try:  # Ctrl-C anywhere in a turn ends that turn, never the chat
            line = clean(input("> " if interactive else ""))
            if not line:
                continue
            if not interactive:
                print(f"> {line}")
            if line in ("/quit", "/exit"):
                return
            if line.startswith("/"):
                print(session.command(line))
                continue
            replying = True
            for piece in session.reply(line):
                print(piece, end="", flush=True)
            print()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print(" [stopped]" if replying else "\n(Ctrl-D or /quit to leave)")


if __name__ == "__main__":
    run_script(main)
