"""Training-step throughput of train_tinystories_model.py against a plain loop over GPT-2.

    python benchmarks/bench_train.py --repeats 9

Ours: the training loop's own step, training.train_step (batch collation, forward and backward
with the chunked loss, gradient clipping, the schedule, AdamW), default model config, batch
16 x 256. Theirs: a plain PyTorch loop over transformers.GPT2LMHeadModel of the same sizes (sdpa
attention, no attention dropout like ours) with the same AdamW, clipping and batch. float32 and
bf16 autocast on the CPU, the two loops' steps timed in turns; MFU over the matmul peak measured
in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import torch

from bench_model import hf_gpt2
from bench_utils import SHARED_DATA, interleaved_seconds, machine_line, matmul_peak
from bpe_tokenizer import BPETokenizer
from tinystories_data import TokenWindows, load_stories
from training import add_training_args, check_training_args, make_optimizer, start_run, train_step
from transformer_model import TransformerConfig, TransformerLM, estimate_flops_per_token

BATCH, BLOCK = 16, 256


def our_step(amp: bool, workdir: str, tokenizer: BPETokenizer) -> Callable[[], tuple[float, float]]:
    """One call = one training.train_step, set up as train_tinystories_model.py sets it up."""
    parser = argparse.ArgumentParser()
    add_training_args(parser)
    args = parser.parse_args(["--output_dir", workdir, "--batch_size", str(BATCH), "--amp" if amp else "--no-amp",
                              "--device", "cpu", "--num_epochs", "1000"])
    check_training_args(parser, args)
    config = TransformerConfig(vocab_size=tokenizer.vocab_size)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, 200 * BATCH * BLOCK, dtype=np.uint16)
    data = TokenWindows(tokens, BLOCK)
    run = start_run(args, TransformerLM(config), tokenizer, data, data)
    return lambda: train_step(run)


def hf_step(amp: bool) -> Callable[[], None]:
    """One step of a plain loop over Hugging Face GPT-2 of the same size."""
    config = TransformerConfig()
    model = hf_gpt2(config).train()
    args = argparse.Namespace(weight_decay=0.1, learning_rate=3e-4, beta1=0.9, beta2=0.95)
    optimizer = make_optimizer(model, args)
    rng = np.random.default_rng(1)

    def step():
        window = torch.from_numpy(rng.integers(0, config.vocab_size, (BATCH, BLOCK)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(window, labels=window).loss  # GPT2LMHeadModel shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(machine_line())
    peaks = {False: matmul_peak(torch.float32), True: matmul_peak(torch.bfloat16)}
    flops = estimate_flops_per_token(TransformerConfig(), BLOCK)
    hf_flops = estimate_flops_per_token(TransformerConfig(window_size=None), BLOCK)
    print(f"matmul peak: float32 {peaks[False] / 1e12:.3f}, bf16 {peaks[True] / 1e12:.3f} TFLOP/s\n")
    print("| precision | batch x seq | ours tokens/s | plain HF GPT-2 loop tokens/s | ours / HF | MFU ours | MFU HF |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    tokenizer = BPETokenizer.train(load_stories(str(SHARED_DATA / "tinystories_train.txt")), 10_000)
    with tempfile.TemporaryDirectory() as workdir:
        for amp in (False, True):
            seconds = interleaved_seconds([our_step(amp, workdir, tokenizer), hf_step(amp)], args.repeats)
            ours, hf = (BATCH * BLOCK / s for s in seconds)
            print(f"| {'bf16 autocast' if amp else 'float32'} | {BATCH} x {BLOCK} | {ours:,.0f} | {hf:,.0f} | "
                  f"{ours / hf:.2f}x | {flops * ours / peaks[amp]:.0%} | {hf_flops * hf / peaks[amp]:.0%} |", flush=True)


if __name__ == "__main__":
    main()
