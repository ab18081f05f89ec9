"""The released models through their Hugging Face exports, as transformers runs them.

    python benchmarks/check_exports.py

For each released model: export it (hf_interop.save_hf_folder), load the folder with
transformers' AutoModelForCausalLM, and report the largest logit difference from ours over the
first 512 tokens of the validation file (the whole context, twice the window) and whether 200
greedy tokens after "Once upon a time" are the same. tests/test_export.py asserts the same
things (within 1e-4, 100 tokens); this prints the figures for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import tempfile

import torch
from transformers import AutoModelForCausalLM

from bench_utils import REPO, SHARED_DATA, machine_line
from bpe_tokenizer import ENDOFTEXT
from decoding import generate
from hf_interop import save_hf_folder
from transformer_model import load_checkpoint


def main() -> None:
    print(machine_line())
    text = (SHARED_DATA / "tinystories_valid.txt").read_text(encoding="utf-8")
    for name in ("tinystories_base", "tinystories_chat"):
        ours, tokenizer, metadata = load_checkpoint(REPO / "pretrained" / f"{name}.pth", device="cpu")
        with tempfile.TemporaryDirectory() as folder:
            architecture = save_hf_folder(ours, tokenizer, f"{folder}/export", metadata)
            hf = AutoModelForCausalLM.from_pretrained(f"{folder}/export", trust_remote_code=True).eval()
        ids = torch.tensor([tokenizer.encode(text, allowed_special="none")[:512]])
        with torch.no_grad():
            difference = (hf(ids).logits - ours(ids).logits).abs().max().item()
        eos, prompt = tokenizer.special_tokens[ENDOFTEXT], tokenizer.encode("Once upon a time")
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=200, eos_token_id=eos,
                             pad_token_id=eos)[0, len(prompt):].tolist()
        (mine,) = generate(ours, prompt, 200, do_sample=False, eos_token_id=eos)
        print(f"{name}: {architecture}; largest logit difference over 512 validation tokens {difference:.2e}; "
              f"greedy tokens equal: {mine == theirs[: len(mine)]} ({len(mine)} tokens)")


if __name__ == "__main__":
    main()
