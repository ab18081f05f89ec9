"""How well a model predicts held-out text: loss, perplexity and bits per byte.

The functions, in the order a measurement uses them:

- token_byte_lengths: the UTF-8 bytes of every token id, to turn a loss into bits per byte.
- Batch and collate: dataset items -> one batch (training reads its batches this way too).
- sequential_batches: every item of a dataset, in order, in batches.
- loss_totals: [total nats, targets, UTF-8 bytes of the targets] over some batches.
- summarize_losses: those totals -> mean loss, perplexity, bits per byte.
- windowed_metrics: all of it over a whole token stream cut into windows.

Any dataset whose items are (inputs, targets) of one shape works (TokenWindows for stories,
ChatExamples for conversations); targets of -100 do not count. Training (training.py) logs these
figures at every evaluation, and benchmarks/eval_model.py computes them for any checkpoint.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bpe_tokenizer import BPETokenizer
from common import autocast
from tinystories_data import TokenWindows
from transformer_model import AvoidedTokens

LN2 = math.log(2)


def token_byte_lengths(tokenizer: BPETokenizer) -> torch.Tensor:
    """(vocab,) float64: the UTF-8 bytes each token id stands for (a special token counts as
    its text, e.g. 13 for <|endoftext|>, as it stands in the data files)."""
    return torch.tensor([len(tokenizer.vocab[i]) for i in range(tokenizer.vocab_size)], dtype=torch.float64)


class Batch(NamedTuple):
    """A batch of dataset items: inputs, targets and loss weights, each (batch, seq), and the
    tokens the loss pushes down (AvoidedTokens, from chat rows with a balancing weight)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_weights: torch.Tensor
    avoided: AvoidedTokens | None = None

    def to(self, device: torch.device) -> Batch:
        avoided = None if self.avoided is None else AvoidedTokens(*(part.to(device) for part in self.avoided))
        return Batch(self.inputs.to(device), self.targets.to(device), self.loss_weights.to(device), avoided)


def collate(dataset: torch.utils.data.Dataset, indices: list[int]) -> Batch:
    """The items at indices, stacked into a Batch. Chat rows (chat_data.ChatExamples) bring
    their weights, and may bring avoided tokens; items of two parts weigh each counted
    target (not -100) 1 and the others 0."""
    parts = [torch.stack(part) for part in zip(*(dataset[i] for i in indices), strict=True)]
    weights = parts[2] if len(parts) > 2 else (parts[1] != -100).float()
    return Batch(parts[0], parts[1], weights, AvoidedTokens(*parts[3:]) if len(parts) > 3 else None)


def sequential_batches(count: int, batch_size: int) -> list[list[int]]:
    """Item indices 0 .. count - 1 in order, in batches of batch_size (the last may be shorter)."""
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


@torch.no_grad()
def loss_totals(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batches: list[list[int]],
                device: torch.device, amp_dtype: torch.dtype | None, token_bytes: torch.Tensor,
                temperature: float = 1.0) -> list[float]:
    """[total nats, targets, UTF-8 bytes of the targets] over the given batches of dataset
    items, the model run under autocast to amp_dtype (None: float32), its logits divided by
    temperature (calibration.py fits one). Targets of -100 do not count. token_bytes: see
    token_byte_lengths. Totals, not means, so that the shares of several processes (or of
    several calls) add up before they are divided."""
    was_training = model.training
    model.eval()
    nats = tokens = text_bytes = 0.0
    for indices in batches:
        batch = collate(dataset, indices)  # the plain loss: every target alike
        inputs, targets = batch.inputs.to(device), batch.targets.to(device).flatten()  # targets: (batch * seq,)
        with autocast(device, amp_dtype):
            logits = model(inputs).logits  # (batch, seq, vocab)
        # The loss in float32 whatever the autocast dtype, one value per target, summed below.
        logits = logits.float().flatten(0, 1)  # (batch * seq, vocab)
        if temperature != 1.0:
            logits = logits / temperature
        losses = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
        counted = targets != -100
        nats += losses.sum().item()
        tokens += counted.sum().item()
        text_bytes += token_bytes[targets[counted].cpu()].sum().item()
    model.train(was_training)
    return [nats, tokens, text_bytes]


def summarize_losses(nats: float, tokens: float, text_bytes: float) -> dict:
    """Mean loss per target token, its perplexity, and bits per byte: total nats / ln 2 /
    total UTF-8 bytes, which does not depend on the tokenizer."""
    loss = nats / max(tokens, 1)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50)),
            "val_bits_per_byte": nats / LN2 / max(text_bytes, 1), "val_tokens": tokens}


def windowed_metrics(model: torch.nn.Module, tokens, block_size: int, batch_size: int, device: torch.device,
                     amp_dtype: torch.dtype | None, token_bytes: torch.Tensor, temperature: float = 1.0) -> dict:
    """summarize_losses over a whole token stream cut into windows of block_size tokens (the
    way training cuts its validation stream), the logits divided by temperature."""
    windows = TokenWindows(tokens, block_size)
    batches = sequential_batches(len(windows), batch_size)
    return summarize_losses(*loss_totals(model, windows, batches, device, amp_dtype, token_bytes, temperature))
