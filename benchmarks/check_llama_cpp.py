"""Does llama.cpp run our GGUF exports as we do? (Not part of CI: it needs llama-cpp-python,
which builds llama.cpp from source: `pip install llama-cpp-python`, about 15 minutes on 2 cores.)

    python benchmarks/check_llama_cpp.py [CHECKPOINT ...]

For each checkpoint (default: the small learned-position model from the ablations, GPT-2 in
llama.cpp; a RoPE model without QK-norm goes to StarCoder2), this exports a GGUF file, loads it
in llama.cpp, and compares:
- the tokenizer: llama.cpp's ids against ours on validation stories;
- each token's log-probability over a validation story (the exported context), against ours;
- 100 greedy tokens after "Once upon a time".
A model trained with exact GELU is exported with --allow_gelu_approx, since llama.cpp computes
the tanh form, so each comparison is made twice: against our model as trained, and against the
same weights with gelu_tanh, which is what llama.cpp is meant to compute. The released base and
chat models have QK-norm, which llama.cpp lacks: they cannot go to GGUF (export_model.py says why).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench_utils import REPO, machine_line
from bpe_tokenizer import BPETokenizer
from decoding import generate
from gguf_export import gguf_context, save_gguf
from transformer_model import TransformerLM, load_checkpoint

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

DEFAULT_MODELS = [str(REPO / "pretrained" / "ablation_pos_learned.pth")]
VALID = REPO.parent / "shared" / "data" / "tinystories_valid.txt"


def with_tanh_gelu(model: TransformerLM) -> TransformerLM:
    """The same weights with GPT-2's tanh GELU: what llama.cpp computes."""
    twin = TransformerLM(dataclasses.replace(model.config, activation="gelu_tanh")).eval()
    twin.load_state_dict(copy.deepcopy(model.state_dict()))
    return twin


def our_log_probs(model: TransformerLM, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1).numpy()


def llama_log_probs(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    shifted = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    shifted -= shifted.max(-1, keepdims=True)  # a log-softmax: (positions, vocab)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def compare(name: str, llm: llama_cpp.Llama, model: TransformerLM, tokenizer: BPETokenizer, context: int) -> None:
    stories = [s.strip() for s in VALID.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()][:200]
    same_ids = sum(llm.tokenize(s.encode(), add_bos=False, special=False) == tokenizer.encode(s, allowed_special="none")
                   for s in stories)
    print(f"{name}: llama.cpp's token ids equal ours on {same_ids}/{len(stories)} validation stories")
    ids = tokenizer.encode(stories[0] + " " + stories[1], allowed_special="none")[:context]
    theirs = llama_log_probs(llm, ids)
    targets = np.array(ids[1:])
    their_target = theirs[np.arange(len(targets)), targets]
    for label, ours_model in (("as trained (exact GELU)", model), ("same weights, tanh GELU", with_tanh_gelu(model))):
        ours = our_log_probs(ours_model, ids)[np.arange(len(targets)), targets]
        difference = np.abs(ours - their_target)
        print(f"  log-probability of each of {len(targets)} tokens, ours {label} vs llama.cpp: "
              f"max |diff| {difference.max():.2e}, mean {difference.mean():.2e}; "
              f"mean log-prob ours {ours.mean():.4f}, llama.cpp {their_target.mean():.4f}")
        prompt = tokenizer.encode("Once upon a time")
        (expected,) = generate(ours_model, prompt, 100, do_sample=False)
        llm.reset()
        produced = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            produced.append(int(token))
            if len(produced) == len(expected):
                break
        agree = next((i for i, (a, b) in enumerate(zip(expected, produced, strict=False)) if a != b), len(expected))
        print(f"  greedy, ours {label}: the first {agree} of {len(expected)} tokens equal llama.cpp's")


def main() -> None:
    if llama_cpp is None:
        sys.exit("error: this check needs llama-cpp-python: pip install llama-cpp-python (it builds llama.cpp)")
    print(machine_line(), f"llama-cpp-python {llama_cpp.__version__}")
    for file in sys.argv[1:] or DEFAULT_MODELS:
        model, tokenizer, _ = load_checkpoint(file, device="cpu")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.gguf"
            architecture = save_gguf(model, tokenizer, path, allow_gelu_approx=True)
            context = gguf_context(model.config)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, logits_all=True, verbose=False, n_threads=2)
            compare(f"{Path(file).name} ({architecture})", llm, model, tokenizer, context)


if __name__ == "__main__":
    main()
