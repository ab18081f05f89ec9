"""Does the compiled decoding step (speedups.compile_decoding, the CLI's --compile) decode exactly
like eager on this device, and how much faster?

    python benchmarks/check_compiled_decoding.py --device cuda

On a GPU the compiled step is replayed as a CUDA graph that writes into the KV cache in place;
this checks, on the same weights: 256 greedy tokens of a randomly initialised GPT-2-shaped
model (twice: the second run has a new cache, so the graph is captured again), 400 greedy
tokens of the released model (RoPE, a 256-token window, so the ring buffer wraps), and 4-beam
search; then eager and compiled greedy tokens/second (median of 3).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench_utils import REPO, median_seconds, synchronized
from decoding import beam_search, generate
from speedups import compile_decoding, use_few_row_linear
from transformer_model import TransformerConfig, TransformerLM, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    on_cuda = device.type == "cuda"
    print(torch.__version__, torch.cuda.get_device_name(device) if on_cuda else device, flush=True)

    torch.manual_seed(0)
    config = TransformerConfig(position_embedding="learned", window_size=None, activation="gelu_tanh")
    eager = use_few_row_linear(TransformerLM(config).eval().to(device))  # eager as the CLI runs it
    prompt = torch.randint(0, config.vocab_size, (1, 16), device=device)
    reference = generate(eager, prompt, 256, do_sample=False)
    compiled = compile_decoding(copy.deepcopy(eager))
    start = time.time()
    first = generate(compiled, prompt, 256, do_sample=False)
    print(f"compile + first run {time.time() - start:.1f} s")
    second = generate(compiled, prompt, 256, do_sample=False)
    same = sum(a == b for a, b in zip(first[0], reference[0], strict=True))
    print("compiled greedy equal to eager:", first == reference, second == first, f"{same}/256 tokens", flush=True)
    for name, model in (("eager", eager), ("compiled", compiled)):
        seconds = median_seconds(synchronized(lambda m=model: generate(m, prompt, 256, do_sample=False), device), 3)
        print(f"{name}: {256 / seconds:.0f} tokens/s", flush=True)

    base, tokenizer, _ = load_checkpoint(REPO / "pretrained" / "tinystories_base.pth", device=str(device))
    use_few_row_linear(base)
    ids = tokenizer.encode("Once upon a time")
    reference = generate(base, ids, 400, do_sample=False)
    out = generate(compile_decoding(base), ids, 400, do_sample=False)
    same = sum(a == b for a, b in zip(out[0], reference[0], strict=True))
    print("released model, 400 greedy tokens, compiled equal to eager:", out == reference, f"{same}/400", flush=True)
    beams = beam_search(compiled, prompt, num_beams=4, max_new_tokens=64)
    print("beam search compiled equal to eager:",
          beams[0][0] == beam_search(eager, prompt, num_beams=4, max_new_tokens=64)[0][0], flush=True)


if __name__ == "__main__":
    main()
