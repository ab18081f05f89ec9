"""Generation speed: our KV-cache decoding against Hugging Face generate, same weights.

    python benchmarks/bench_generate.py --repeats 3 [--device cuda]
    python benchmarks/bench_generate.py --quality_only --quality_checkpoint pretrained/tinystories_base.pth

A GPT-2-shaped configuration of the default size (learned positions, full attention,
gelu_tanh; 5.85M parameters) is copied into transformers.GPT2LMHeadModel with to_hf_model, so
both run identical weights. Float32, a 16-token prompt and 256 new tokens (no end token, so
every run makes all 256), tokens/second as a median of --repeats interleaved runs: batch 1
greedy, temperature sampling, top-p sampling (p = 0.9) and beam search with 4 beams, batch 16
top-p sampling and bf16 weights, each ours eager, ours with the compiled decoding step (the
CLI's --compile; compiling happens in the warm-up run, outside the timing) and Hugging Face's;
on a CPU also --quantize int8; and ours without a cache (decoding.generate_without_cache, the
whole sequence recomputed every step: what the cache buys). "Ours" is the model as the CLI
runs it: speedups.use_few_row_linear's layers where they pay on this machine, and
filter_top_p_fast. On a CPU, then each linear layer of a decoding step timed alone, F.linear
against few_row_linear's batched path (forced, also where few_row_blocks or few_row_pays keep
a layer on F.linear), and the share of a float32 greedy run's operator time spent
in matrix multiplications, from torch.profiler. The compute limit is the matmul peak measured
in the same run over 2 x parameters FLOPs per token. With --quality_checkpoint, what
--quantize int8 costs that model in quality (--quality_only: that alone).
"""

from __future__ import annotations

import argparse
import copy
import functools
import warnings

import torch

from bench_utils import interleaved_seconds, machine_line, matmul_peak, median_seconds, memory_bandwidth, synchronized
from decoding import beam_search, generate, generate_without_cache
from hf_interop import to_hf_model
from speedups import (
    compile_decoding,
    few_row_blocks,
    few_row_linear,
    few_row_pays,
    filter_top_p_fast,
    quantize_int8,
    use_few_row_linear,
)
from transformer_model import TransformerConfig, TransformerLM

PROMPT_TOKENS, NEW_TOKENS = 16, 256


def matmul_share(run) -> float:
    """The fraction of a run's operator time spent in matrix multiplications (torch.profiler):
    how much of a decoding step is the weights' work rather than everything around it."""
    from torch.profiler import profile

    with profile() as profiler:
        run()
    times = {event.key: event.self_cpu_time_total for event in profiler.key_averages()}
    return sum(times.get(name, 0) for name in ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")) / sum(times.values())


def few_row_linear_table(config: TransformerConfig, repeats: int = 30) -> None:
    """Each linear layer of a decoding step (one row) with F.linear and with few_row_linear's
    batched path, the weight cold in memory as it is in decoding (a 64 MB buffer is touched
    before each call, evicting the caches): microseconds per call, medians of `repeats`. The
    batched path is forced for every layer (speedups.MIN_BLOCK_ROWS lowered), so the table
    also shows the layers that the gate keeps on F.linear, and why."""
    import torch.nn.functional as F

    import speedups

    flush = torch.ones(64 * 2**20 // 4)
    threads = torch.get_num_threads()

    def cold_microseconds(fn, *args) -> float:
        return median_seconds(lambda _: fn(*args), repeats, setup=lambda: flush.add_(1)) * 1e6

    hidden, inner = config.hidden_size, config.intermediate_size
    print(f"\n| layer (out x in) | F.linear us | few_row_linear us | speed-up | blocks ({threads} threads) "
          "| swapped in here (few_row_pays) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, (out, inp) in {"LM head": (config.vocab_size, hidden), "qkv": (3 * hidden, hidden),
                             "attention output": (hidden, hidden), "MLP in": (inner, hidden),
                             "MLP out": (hidden, inner)}.items():
        weight, bias, x = torch.randn(out, inp), torch.randn(out), torch.randn(1, 1, inp)
        gate, speedups.MIN_BLOCK_ROWS = speedups.MIN_BLOCK_ROWS, 1  # force the batched path
        try:
            blocked = cold_microseconds(few_row_linear, x, weight, bias)
        finally:
            speedups.MIN_BLOCK_ROWS = gate
        plain = cold_microseconds(F.linear, x, weight, bias)
        picked = few_row_blocks(out, threads)
        print(f"| {name} ({out:,} x {inp:,}) | {plain:,.0f} | {blocked:,.0f} | {plain / blocked:.2f}x | "
              f"{picked if picked > 1 else '1 (F.linear)'} | {'yes' if few_row_pays(out, inp, threads) else 'no'} |",
              flush=True)


def int8_quality(checkpoint: str, data: str, prompts: int = 20, new_tokens: int = 100) -> None:
    """What --quantize int8 costs in quality: validation bits per byte of the float32 and the
    int8 model, and how often greedy decoding picks the same tokens."""
    from evaluation import token_byte_lengths, windowed_metrics
    from tinystories_data import encode_stories, load_stories
    from transformer_model import load_checkpoint

    model, tokenizer, _ = load_checkpoint(checkpoint, device="cpu")
    stories = load_stories(data, "validation")
    tokens = encode_stories(stories, tokenizer, num_workers=1)
    token_bytes = token_byte_lengths(tokenizer)
    quantized = quantize_int8(model)
    print(f"\nint8 quality on {checkpoint}, validation split of {data}:")
    print("| model | val loss | bits per byte | greedy tokens equal to float32 |")
    print("| --- | ---: | ---: | ---: |")
    prompt_ids = [tokenizer.encode(" ".join(story.split()[:8])) for story in stories[:prompts]]
    reference = [generate(model, p, new_tokens, do_sample=False)[0] for p in prompt_ids]
    for name, candidate in (("float32", model), ("int8 (dynamic)", quantized)):
        metrics = windowed_metrics(candidate, tokens, 256, 16, torch.device("cpu"), None, token_bytes)
        outputs = [generate(candidate, p, new_tokens, do_sample=False)[0] for p in prompt_ids]
        same = sum(a == b for ref, out in zip(reference, outputs, strict=True) for a, b in zip(ref, out, strict=True))
        print(f"| {name} | {metrics['val_loss']:.4f} | {metrics['val_bits_per_byte']:.4f} | "
              f"{same / (prompts * new_tokens):.1%} |", flush=True)


def decoding_cases(device: torch.device):
    """The models (ours, as the CLI runs it, and Hugging Face's copy of it) and the cases:
    (case, batch, our model, how ours runs, how Hugging Face runs (None: no peer))."""
    config = TransformerConfig(position_embedding="learned", window_size=None, activation="gelu_tanh")
    ours = use_few_row_linear(TransformerLM(config).eval().to(device))
    hf = to_hf_model(ours)
    ours_bf16, hf_bf16 = copy.deepcopy(ours).to(torch.bfloat16), copy.deepcopy(hf).to(torch.bfloat16)
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), device=device)
    batch_prompt = torch.randint(0, config.vocab_size, (16, PROMPT_TOKENS), device=device)
    hf_settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    greedy = dict(do_sample=False)
    temperature, top_p = dict(temperature=0.8, seed=0), dict(top_p=0.9, seed=0, top_p_filter=filter_top_p_fast)
    cases = [
        ("batch 1, greedy", 1, ours, lambda m: generate(m, prompt, NEW_TOKENS, **greedy),
         lambda: hf.generate(prompt, do_sample=False, **hf_settings)),
        ("batch 1, temperature 0.8 sampling", 1, ours, lambda m: generate(m, prompt, NEW_TOKENS, **temperature),
         lambda: hf.generate(prompt, do_sample=True, temperature=0.8, top_k=0, **hf_settings)),
        ("batch 1, top-p 0.9 sampling", 1, ours, lambda m: generate(m, prompt, NEW_TOKENS, **top_p),
         lambda: hf.generate(prompt, do_sample=True, top_p=0.9, top_k=0, **hf_settings)),
        ("batch 1, beam search, 4 beams", 1, ours,
         lambda m: beam_search(m, prompt, num_beams=4, max_new_tokens=NEW_TOKENS),
         lambda: hf.generate(prompt, do_sample=False, num_beams=4, **hf_settings)),
        ("batch 16, top-p 0.9 sampling", 16, ours, lambda m: generate(m, batch_prompt, NEW_TOKENS, **top_p),
         lambda: hf.generate(batch_prompt, do_sample=True, top_p=0.9, top_k=0, **hf_settings)),
        ("batch 1, greedy, bf16 weights", 1, ours_bf16, lambda m: generate(m, prompt, NEW_TOKENS, **greedy),
         lambda: hf_bf16.generate(prompt, do_sample=False, **hf_settings)),
    ]
    if device.type == "cpu":
        cases.append(("batch 1, greedy, --quantize int8", 1, quantize_int8(ours),
                      lambda m: generate(m, prompt, NEW_TOKENS, **greedy), None))
    return config, ours, prompt, cases


def compiled(model: TransformerLM):
    """A compiled copy. Every model's decoding step is one code object to torch, which traces
    one at most 8 times in a process; the earlier cases' compiled code is not needed any more."""
    torch._dynamo.reset()
    return compile_decoding(copy.deepcopy(model))  # compiles on its first decoding step, in a warm-up run


def print_limits_header(ours: TransformerLM, device: torch.device) -> tuple[dict, float]:
    """The machine, its matmul peaks and memory speed, and the table's header."""
    peaks = {dtype: matmul_peak(dtype, device=str(device)) for dtype in (torch.float32, torch.bfloat16)}
    bandwidth = memory_bandwidth(device=str(device))
    weight_bytes = 4 * ours.num_parameters()
    print(machine_line() if device.type == "cpu" else f"{machine_line()}, {torch.cuda.get_device_name(device)}")
    print(f"matmul peak {peaks[torch.float32] / 1e12:.3f} TFLOP/s float32, {peaks[torch.bfloat16] / 1e12:.3f} bf16; "
          f"streaming read {bandwidth / 1e9:.1f} GB/s; {ours.num_parameters():,} parameters "
          f"({weight_bytes / 1e6:.1f} MB in float32)")
    print("compute limit: the matmul peak of the case's precision (float32 for int8, which has no int8 peak here) "
          "over 2 x parameters FLOPs per token; weight-read limit: every weight read once per step\n")
    print("| case | ours tokens/s | ours --compile tokens/s | HF tokens/s | ours / HF | --compile / HF "
          "| fastest ours / compute limit | HF / compute limit | fastest ours / weight-read limit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    return peaks, bandwidth


def measure_case(case, ours: TransformerLM, peaks: dict, bandwidth: float, device: torch.device, repeats: int) -> None:
    """One row: ours eager, ours compiled and Hugging Face's, timed in turns."""
    name, batch, model, run_ours, run_hf = case
    runs = [synchronized(functools.partial(run_ours, candidate), device) for candidate in (model, compiled(model))]
    runs += [synchronized(run_hf, device)] if run_hf else []
    tokens_per_second = [batch * NEW_TOKENS / s for s in interleaved_seconds(runs, repeats, warmup=1)]
    eager, fast = tokens_per_second[0], tokens_per_second[1]
    bf16 = "bf16" in name
    compute_limit = peaks[torch.bfloat16 if bf16 else torch.float32] / (2 * ours.num_parameters())
    bytes_per_weight = 1 if "int8" in name else 2 if bf16 else 4
    read_limit = batch * bandwidth / (ours.num_parameters() * bytes_per_weight)  # tokens/s: one weight read per step
    best = max(eager, fast)
    peer, peer_limit = " | | ", ""
    if run_hf:
        hf_tps = tokens_per_second[2]
        peer = f"{hf_tps:,.0f} | {eager / hf_tps:.2f}x | {fast / hf_tps:.2f}x"
        peer_limit = f"{hf_tps / compute_limit:.1%}"
    print(f"| {name} | {eager:,.0f} | {fast:,.0f} | {peer} | {best / compute_limit:.1%} | {peer_limit} | "
          f"{best / read_limit:.0%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quality_checkpoint", default=None, help="also measure int8's quality on this model")
    parser.add_argument("--quality_data", default="../shared/data", help="its validation split is scored")
    parser.add_argument("--quality_only", action="store_true", help="measure int8's quality only, not the speeds")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.quality_only:
        int8_quality(args.quality_checkpoint or "pretrained/tinystories_base.pth", args.quality_data)
        return
    torch.manual_seed(0)
    device = torch.device(args.device)
    config, ours, prompt, cases = decoding_cases(device)
    peaks, bandwidth = print_limits_header(ours, device)
    for case in cases:
        measure_case(case, ours, peaks, bandwidth, device, args.repeats)
    prompt_ids = prompt[0].tolist()
    without_cache = synchronized(lambda: generate_without_cache(ours, prompt_ids, NEW_TOKENS, temperature=0), device)
    without_cache = interleaved_seconds([without_cache], args.repeats, warmup=1)[0]
    print(f"| batch 1, greedy, no KV cache | {NEW_TOKENS / without_cache:,.0f} | | | | | | | |")
    if device.type == "cpu":
        few_row_linear_table(config)
        share = matmul_share(lambda: generate(ours, prompt, NEW_TOKENS, do_sample=False))
        print(f"\nbatch 1 greedy, float32: {share:.0%} of operator time in matrix multiplications (torch.profiler)")
    if args.quality_checkpoint:
        int8_quality(args.quality_checkpoint, args.quality_data)


if __name__ == "__main__":
    main()
