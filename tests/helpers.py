"""Small models and data that several test files build."""

import random
import signal
from pathlib import Path

import torch

from bpe_tokenizer import BPETokenizer
from transformer_model import TransformerConfig, TransformerLM


def record_sample_prompts(monkeypatch) -> list[list[int]]:
    """Make training's sample at each evaluation record its prompt ids in the returned list
    (and then generate as usual)."""
    import training

    prompts: list[list[int]] = []
    original_generate = training.generate

    def generate_and_record(model, prompt, *args, **kwargs):
        prompts.append(list(prompt))
        return original_generate(model, prompt, *args, **kwargs)

    monkeypatch.setattr(training, "generate", generate_and_record)
    return prompts


def default_stop_signals() -> None:
    """preexec_fn for a child process that a test interrupts: give it Ctrl-C's and a hang-up's
    default actions, even when the suite runs as a background job or under nohup (a shell
    starts those with SIGINT, and nohup with SIGHUP, ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def endless_model(tokenizer: BPETokenizer) -> TransformerLM:
    """A model that never ends a reply: its final hidden state is a fixed vector u
    (LayerNorm gain 0, bias u) and its head scores <|endoftext|> at -10 u.u, the other tokens
    near 0. Good for interrupting a long stream."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                            window_size=8, tie_word_embeddings=False, dropout=0.0))
    with torch.no_grad():
        u = torch.ones(16) / 4
        model.final_norm.weight.zero_()
        model.final_norm.bias.copy_(u)
        model.lm_head.weight.normal_(0, 0.01)
        model.lm_head.weight[tokenizer.special_tokens["<|endoftext|>"]] = -10 * u
    return model.eval()


NAMES = ["Lily", "Tom", "Ben", "Mia", "Sam"]
THINGS = ["ball", "cat", "tree", "boat", "cake", "kite"]


def story(rng: random.Random) -> str:
    """A short story from a template: enough structure for a tiny model to learn quickly."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    return (f"Once upon a time, {name} had a {thing}. {name} liked the {thing} very much. "
            f"One day the {thing} was lost. {name} looked and found the {thing}. {name} was happy.")


def write_story_corpus(folder: Path, train: int, valid: int, seed: int = 0) -> Path:
    """stories_train.txt and stories_valid.txt in the TinyStories .txt layout."""
    rng = random.Random(seed)
    for name, count in (("stories_train.txt", train), ("stories_valid.txt", valid)):
        (folder / name).write_text("".join(story(rng) + "\n<|endoftext|>\n" for _ in range(count)), encoding="utf-8")
    return folder


def story_tokenizer(vocab_size: int, stories: int = 200, seed: int = 1) -> BPETokenizer:
    """A tokenizer trained on template stories."""
    rng = random.Random(seed)
    return BPETokenizer.train([story(rng) for _ in range(stories)], vocab_size=vocab_size)
