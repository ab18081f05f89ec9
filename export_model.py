"""Export a trained model for other software: a Hugging Face folder, or a GGUF file for llama.cpp.

    python export_model.py                                   # the released base model -> exports/tinystories_base-hf
    python export_model.py --model_path pretrained/tinystories_chat.pth --format hf
    python export_model.py --format gguf --model_path CKPT --output model.gguf

A Hugging Face folder (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json with the chat template, a model card) loads with
AutoModelForCausalLM.from_pretrained(folder), and every script here takes it as --model_path.
A model trained with --qk_norm needs trust_remote_code=True: transformers has no architecture
with QK-norm, and the folder carries the few lines that add it (starcoder2_qk_norm.py).
A GGUF file runs in llama.cpp and ollama (GPT-2 and StarCoder2 shapes, no QK-norm).

A configuration with no exact twin is refused with the fields named, before anything is written.
With transformers installed, a float32 Hugging Face export is checked at the end: its logits
on a story against ours, within 1e-4. --overwrite replaces only an earlier export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import check_output_paths, run_script
from decoding import STORY_SAMPLING
from gguf_export import save_gguf
from hf_interop import read_export_config, save_hf_folder
from transformer_model import CheckpointError, TransformerLM, load_checkpoint

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "pretrained" / "tinystories_base.pth")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
CHECK_TEXT = ("Once upon a time, there was a little dog named Max. Max liked to run in the park with his friend, "
              "a small bird. One day, the bird could not fly, so Max carried her home on his back.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=DEFAULT_MODEL, help="a checkpoint (default: the released base model)")
    parser.add_argument("--format", choices=["hf", "gguf"], default="hf")
    parser.add_argument("--output", help="the folder (hf) or file (gguf) to write; default exports/NAME-hf or "
                                         "exports/NAME.gguf")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the weights' precision")
    parser.add_argument("--allow_gelu_approx", action="store_true",
                        help="gguf: export a model trained with exact GELU, though llama.cpp computes the tanh form")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    if args.output is None:
        name = Path(args.model_path).stem
        args.output = f"exports/{name}-hf" if args.format == "hf" else f"exports/{name}.gguf"
    if Path(args.output).exists() and not args.overwrite:
        parser.error(f"--output {args.output}: it already exists; pass --overwrite to replace it")
    if args.format == "hf" and Path(args.output).is_dir() and not is_export_folder(args.output):
        parser.error(f"--output {args.output}: a folder that export_model.py did not write; it is never replaced")
    check_output_paths(parser, args, **({"folders": ("output",)} if args.format == "hf" else {"files": ("output",)}))
    return args


def is_export_folder(folder: str) -> bool:
    try:
        read_export_config(folder)
        return True
    except CheckpointError:
        return False


def default_sampling(metadata: dict) -> dict:
    """The decoding settings this project uses for the model's kind, for generation_config.json."""
    if metadata.get("kind") == "chat":
        from request_following import CHAT_MAX_NEW_TOKENS, CHAT_SAMPLING  # here: it imports `datasets` (a second)

        return CHAT_SAMPLING | {"max_new_tokens": CHAT_MAX_NEW_TOKENS}
    return STORY_SAMPLING


def check_against_transformers(model: TransformerLM, ids: list[int], folder: str) -> None:
    """Load the folder with transformers (if installed) and print the largest logit difference;
    a ValueError if it is above 1e-4, which would be a bug in the export."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not installed: the export was not checked against it")
        return
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokens = torch.tensor([ids])
    with torch.no_grad():
        difference = (hf(tokens).logits - model.cpu()(tokens).logits).abs().max().item()
    print(f"checked with transformers ({type(hf).__name__}): largest logit difference {difference:.2e} "
          f"over {len(ids)} tokens")
    if not difference <= 1e-4:
        raise ValueError(f"the export in {folder} gives logits {difference:.2e} away from ours: a bug, please "
                         "report it")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer, metadata = load_checkpoint(args.model_path, device="cpu")
    dtype = DTYPES[args.dtype]
    if args.format == "gguf":
        architecture = save_gguf(model, tokenizer, args.output, dtype, args.allow_gelu_approx, name=Path(args.model_path).stem)
        print(f"wrote {args.output}: GGUF, llama.cpp architecture {architecture}, {args.dtype}")
        if model.config.activation == "gelu":
            print("note: the model was trained with exact GELU; llama.cpp's tanh form gives slightly different outputs")
        return
    architecture = save_hf_folder(model, tokenizer, args.output, metadata, default_sampling(metadata), dtype,
                                  overwrite=args.overwrite)
    print(f"wrote {args.output}: Hugging Face folder, architecture {architecture}, {args.dtype}")
    if architecture == "starcoder2_qk_norm":
        print("load it with trust_remote_code=True (QK-norm is added by the folder's starcoder2_qk_norm.py)")
    if dtype == torch.float32:
        check_against_transformers(model, tokenizer.encode(CHECK_TEXT), args.output)
    else:
        print("(a float16 export is not checked against transformers: rounding alone moves its logits)")


if __name__ == "__main__":
    run_script(main)
