"""Drawing one token from the logits: decoding.sample_from_logits (inverse transform sampling,
written out) against torch.multinomial on the softmax, the reason the decoder does not call
multinomial.

    python benchmarks/bench_sampling.py --repeats 2000

10,000 logits per row (this project's vocabulary), batch 1 and batch 16, microseconds per draw
as a median of --repeats calls each (a quarter as many at batch 16), the two timed in turns.
"""

from __future__ import annotations

import argparse
import functools

import torch

from bench_utils import interleaved_seconds, machine_line
from decoding import sample_from_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    print(machine_line())
    print("\n| batch | sample_from_logits us | torch.multinomial us | multinomial / ours |")
    print("| ---: | ---: | ---: | ---: |")
    for batch, repeats in ((1, args.repeats), (16, args.repeats // 4)):
        logits = torch.randn(batch, 10_000, generator=torch.Generator().manual_seed(0)) * 3
        generator = torch.Generator().manual_seed(0)
        draws = [functools.partial(sample_from_logits, logits, generator),
                 lambda x=logits, g=generator: torch.multinomial(x.softmax(-1), 1, generator=g)]
        ours, theirs = interleaved_seconds(draws, repeats)
        print(f"| {batch} | {ours * 1e6:,.0f} | {theirs * 1e6:,.0f} | {theirs / ours:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
