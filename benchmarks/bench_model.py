"""Training throughput of TransformerLM against Hugging Face GPT-2 of the same size.

    python benchmarks/bench_model.py --repeats 7 [--compile] [--loss_check_steps 150]

Forward + backward tokens/second, same run, median of --repeats steps after warm-up, the two
models' steps timed in turns:
our default config (sinusoidal positions, window 256, GELU) as the training loop runs it
(speedups.use_chunked_loss: no logits tensor) against transformers.GPT2LMHeadModel with the
same sizes (attn_implementation="sdpa", dropout 0.1 on embeddings and residuals and none on
attention weights, like ours), at batch 8 x 256 and 4 x 512, in float32 and with bfloat16 autocast; with --compile, both under torch.compile.
Model FLOPs utilisation = estimate_flops_per_token x tokens/s over a large matmul's FLOP/s
measured in the same run, in the same precision.

--loss_check_steps N trains our default config for N steps in float32 and again with bf16
autocast (same seed, same batches of ../shared/data) and prints both loss curves, to decide
whether bf16 is safe as the CPU default.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from bench_utils import SHARED_DATA, interleaved_seconds, machine_line, matmul_peak
from speedups import use_chunked_loss
from transformer_model import TransformerConfig, TransformerLM, estimate_flops_per_token

SHAPES = ((8, 256), (4, 512))


def hf_gpt2(config: TransformerConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers, n_head=config.num_attention_heads, n_inner=config.intermediate_size,
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.attention_dropout,
        bos_token_id=None, eos_token_id=None, attn_implementation="sdpa",
    ))


def train_steps(model, batch: int, seq: int, dtype: torch.dtype | None, is_hf: bool):
    """A function that runs one forward + backward on random tokens."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    targets = torch.randint(0, model.config.vocab_size, (batch, seq))

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(ids, labels=targets).loss if is_hf else model(ids, targets=targets).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def loss_check(steps: int, warmup: int = 30) -> None:
    """Train float32 and bf16 autocast from the same start on the same batches, plus float32
    from another seed to show the size of run-to-run noise; print the three curves."""
    from bpe_tokenizer import ENDOFTEXT, BPETokenizer
    from tinystories_data import load_stories

    stories = load_stories(str(SHARED_DATA / "tinystories_train.txt"))
    tokenizer = BPETokenizer.train(stories, 10_000)
    stream = torch.tensor([t for ids in tokenizer.encode_batch([s + ENDOFTEXT for s in stories]) for t in ids])
    runs = {"float32, seed 0": (None, 0), "bf16 autocast, seed 0": (torch.bfloat16, 0), "float32, seed 1": (None, 1)}
    curves = {}
    for name, (dtype, seed) in runs.items():
        torch.manual_seed(seed)
        model = use_chunked_loss(TransformerLM(TransformerConfig()).train())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        generator = torch.Generator().manual_seed(seed)
        curve = []
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - 257, (16,), generator=generator)
            window = torch.stack([stream[s : s + 257] for s in starts])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = model(window[:, :-1], targets=window[:, 1:]).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[name] = curve
    print(f"\nloss check: default config, batch 16 x 256, AdamW lr 1e-3 ({warmup} warm-up steps), weight decay "
          f"0.1, {steps} steps; train loss, mean of each block of steps")
    print("| steps | " + " | ".join(curves) + " | bf16 - float32 | seed 1 - seed 0 |")
    print("| ---: |" + " ---: |" * (len(curves) + 2))
    block = max(10, steps // 10)
    for end in range(block, steps + 1, block):
        means = [sum(c[end - block : end]) / block for c in curves.values()]
        print(f"| {end - block + 1}-{end} | " + " | ".join(f"{m:.3f}" for m in means)
              + f" | {means[1] - means[0]:+.3f} | {means[2] - means[0]:+.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also measure both models under torch.compile")
    parser.add_argument("--loss_check_steps", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    print(machine_line())
    peaks = {"float32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048 x 2048): float32 {peaks['float32'] / 1e12:.3f} TFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")
    config = TransformerConfig()
    ours = use_chunked_loss(TransformerLM(config).train())  # as the training loop runs it
    hf = hf_gpt2(config).train()
    print(f"parameters: ours {ours.num_parameters():,}, Hugging Face GPT-2 {hf.num_parameters():,} "
          f"(its {config.max_position_embeddings * config.hidden_size:,} learned position weights)\n")

    def compiled(model):
        # A fresh, static-shape compilation per measurement: no recompiles inside the timing.
        torch._dynamo.reset()
        return torch.compile(model, dynamic=False)

    print("| model | precision | batch x seq | tokens/s ours | tokens/s HF GPT-2 | ours / HF | MFU ours | MFU HF |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label in ("eager", "compiled") if args.compile else ("eager",):
        wrap = compiled if label == "compiled" else (lambda model: model)
        for precision, dtype in (("float32", None), ("bf16", torch.bfloat16)):
            for batch, seq in SHAPES:
                tokens = batch * seq
                seconds = interleaved_seconds([train_steps(wrap(ours), batch, seq, dtype, is_hf=False),
                                               train_steps(wrap(hf), batch, seq, dtype, is_hf=True)], args.repeats)
                ours_tps, hf_tps = tokens / seconds[0], tokens / seconds[1]
                flops = estimate_flops_per_token(config, seq)
                hf_flops = estimate_flops_per_token(TransformerConfig(window_size=None), seq)
                print(f"| {label} | {precision} | {batch} x {seq} | {ours_tps:,.0f} | {hf_tps:,.0f} | "
                      f"{ours_tps / hf_tps:.2f}x | {flops * ours_tps / peaks[precision]:.0%} | "
                      f"{hf_flops * hf_tps / peaks[precision]:.0%} |", flush=True)
    if args.loss_check_steps:
        loss_check(args.loss_check_steps)


if __name__ == "__main__":
    main()
