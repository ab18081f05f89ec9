"""Ablations: what each architectural choice is worth, at an equal token budget, on real text.

    python benchmarks/ablations.py --size small --max_tokens 2000000 --out benchmarks/ablation_results
    python benchmarks/ablations.py --runs pos_rope,pos_alibi --device cuda --size default

Every run goes through train_tinystories_model.main (the real training loop), with the same
seed, data (--dataset, ../shared/data by default), token budget and optimiser settings; only
the named choice changes. Groups:

- positions: sinusoidal, learned, RoPE, ALiBi, none (NoPE), full attention, scored at the
  training length and at twice it (learned positions cannot go past their table: n/a);
- norm: pre-norm and post-norm, each with and without learning-rate warm-up;
- window: full causal attention and windows of 32, 64 and 128 at a 256-token context (for the
  small size; a quarter, a half and all of the base context in general), with training and
  generation speed;
- vocab: BPE vocabularies of 1k, 4k and 10k trained by the project's tokenizer on the same text
  (bits per byte is the fair comparison; bytes per token is reported too);
- dropout: 0 and 0.1.

Writes OUT/results.json, OUT/results.md and PNG plots; each run's figures are also in
runs/ablations/<run>/result.json, and a finished run is not redone (delete that file to redo it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench_utils import REPO, SHARED_DATA, machine_line, median_seconds
from bpe_tokenizer import BPETokenizer
from common import autocast_dtype
from decoding import generate
from evaluation import token_byte_lengths, windowed_metrics
from tinystories_data import load_stories, prepare_pretraining_data
from train_tinystories_model import main as train  # the script's whole run, as a function of its flags
from transformer_model import load_checkpoint

SIZES = {  # model flags, context for the positions/norm/vocab/dropout runs, batch size
    "tiny": (["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4",
              "--intermediate_size", "64"], 32, 8),
    "small": (["--hidden_size", "128", "--num_hidden_layers", "4", "--num_attention_heads", "4",
               "--intermediate_size", "512"], 128, 16),
    "default": ([], 256, 32),
}
VOCABS = {"tiny": {"1k": 300, "4k": 400, "10k": 512}, "small": {"1k": 1000, "4k": 4000, "10k": 10000},
          "default": {"1k": 1000, "4k": 4000, "10k": 10000}}


def runs(context: int) -> dict[str, tuple[str, list[str], str]]:
    """name -> (group, flags that differ from the baseline, vocabulary). The baseline is
    sinusoidal, pre-norm, warm-up, full attention, dropout 0.1 and the 10k vocabulary; the
    window runs use twice the context, with windows of a quarter, a half and all of it."""
    plain = ["--max_position_embeddings", str(context), "--window_size", "0", "--block_size", str(context)]
    wide = ["--max_position_embeddings", str(2 * context), "--block_size", str(2 * context)]
    table = {
        "baseline": ("positions", plain),
        "pos_learned": ("positions", [*plain, "--position_embedding", "learned"]),
        "pos_rope": ("positions", [*plain, "--position_embedding", "rope"]),
        "pos_alibi": ("positions", [*plain, "--position_embedding", "alibi"]),
        "pos_none": ("positions", [*plain, "--position_embedding", "none"]),
        "norm_post": ("norm", [*plain, "--norm_position", "post"]),
        "norm_pre_no_warmup": ("norm", [*plain, "--warmup_steps", "0"]),
        "norm_post_no_warmup": ("norm", [*plain, "--norm_position", "post", "--warmup_steps", "0"]),
        "window_full": ("window", [*wide, "--window_size", "0"]),
        **{f"window_{w}": ("window", [*wide, "--window_size", str(w)]) for w in (context // 4, context // 2, context)},
        "vocab_1k": ("vocab", plain),
        "vocab_4k": ("vocab", plain),
        "dropout_0": ("dropout", [*plain, "--dropout", "0"]),
    }
    return {name: (group, flags, name[len("vocab_"):] if name.startswith("vocab_") else "10k")
            for name, (group, flags) in table.items()}


GROUP_MEMBERS = {"norm": ["baseline"], "vocab": ["baseline"], "dropout": ["baseline"]}  # the baseline joins them


def tokenizer_path(vocab: str, size: str, work: Path, dataset: str) -> Path:
    path = work / f"tokenizer_{size}_{vocab}.json"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        stories = load_stories(dataset, "train")
        BPETokenizer.train(stories, VOCABS[size][vocab]).save(path)
    return path


def settings_of(options: argparse.Namespace) -> dict:
    """The options that decide a run's figures: a saved result made with others is redone."""
    return {key: getattr(options, key) for key in ("size", "max_tokens", "budget_minutes", "dataset", "learning_rate",
                                                   "seed", "device")}


def generation_speed(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> float:
    """Greedy tokens/second (median of 3), continuing a prompt that fills most of the context."""
    return new_tokens / median_seconds(lambda: generate(model, prompt, new_tokens, do_sample=False), repeats=3)


def run_one(name: str, flags: list[str], vocab: str, options: argparse.Namespace, work: Path) -> dict:
    """Train one run (or resume an interrupted one) and measure its final model; returns its figures."""
    out = work / name
    result_path = out / "result.json"
    if result_path.exists():
        saved = json.loads(result_path.read_text())
        if saved.get("settings") == settings_of(options):
            return saved
    model_flags, _, batch = SIZES[options.size]
    block = int(flags[flags.index("--block_size") + 1])
    steps = max(1, options.max_tokens // (batch * block))
    argv = ["--dataset", options.dataset, "--tokenizer_path", str(tokenizer_path(vocab, options.size, work, options.dataset)),
            "--output_dir", str(out), "--cache_dir", str(work / "data_cache"), "--batch_size", str(batch),
            "--learning_rate", str(options.learning_rate), "--max_steps", str(steps),
            "--eval_interval", str(max(1, steps // 6)), "--eval_batches", "0", "--patience", "0",
            "--seed", str(options.seed), "--device", options.device, "--sample_tokens", "20", *model_flags, *flags]
    if options.budget_minutes:
        argv += ["--max_time_minutes", str(options.budget_minutes)]
    resumable = (out / "last.pth").exists() and not result_path.exists()
    argv.append("--resume" if resumable else "--overwrite")
    print(f"\n=== {name}: {' '.join(flags)}", flush=True)
    state = train(argv)
    model, tokenizer, _ = load_checkpoint(out / "final_model.pth", device=options.device)
    # The validation stream the run evaluated on: the same arguments find the same cache file.
    validation = prepare_pretraining_data(tokenizer, options.dataset, block, work / "data_cache",
                                          seed=options.seed)["validation"]
    token_bytes = token_byte_lengths(tokenizer)
    device = next(model.parameters()).device
    amp_dtype = None if "--no-amp" in argv else autocast_dtype(device)  # the precision the runs trained in

    def bits_per_byte(block_size: int) -> dict:
        return windowed_metrics(model, validation.tokens, block_size, batch, device, amp_dtype, token_bytes)

    # The final model is scored here (not the last logged evaluation), so a run cut short by
    # --budget_minutes is measured on the weights it ended with.
    final = bits_per_byte(block)
    result = {"name": name, "flags": flags, "vocab": vocab, "block_size": block, "settings": settings_of(options),
              "tokens": state["tokens"], "minutes": state["train_seconds"] / 60,
              "train_tokens_per_second": state["tokens"] / state["step_seconds"],
              "val_loss": final["val_loss"], "val_bits_per_byte": final["val_bits_per_byte"],
              "bytes_per_token": float(token_bytes[torch.from_numpy(validation.tokens.astype("int64"))].mean()),
              "history": [{k: h[k] for k in ("step", "tokens", "val_loss", "val_bits_per_byte")} for h in state["history"]]}
    if model.config.position_embedding == "learned":
        result["val_bits_per_byte_2x"] = None  # no positions past the learned table
    else:
        result["val_bits_per_byte_2x"] = bits_per_byte(2 * block)["val_bits_per_byte"]
    if name.startswith("window"):
        context = model.config.max_position_embeddings
        prompt = validation.tokens[: context - 64].astype("int64").tolist()
        result["generate_tokens_per_second"] = generation_speed(model, prompt, 64)
    result_path.write_text(json.dumps(result, indent=1))
    return result


def plot(results: dict[str, dict], groups: dict[str, list[str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, (group, names) in zip(axes[0], groups.items(), strict=True):
        values = [results[n]["val_bits_per_byte"] for n in names]
        shown = list(values)
        if group == "positions":  # side by side: the training length and twice it (learned: none)
            ax.bar([i - 0.2 for i in range(len(names))], values, width=0.4, color="tab:blue", label="training length")
            twice = [(i + 0.2, results[n]["val_bits_per_byte_2x"]) for i, n in enumerate(names)
                     if results[n].get("val_bits_per_byte_2x") is not None]
            ax.bar([x for x, _ in twice], [v for _, v in twice], width=0.4, color="tab:orange", label="2x length")
            shown += [v for _, v in twice]
            ax.legend(fontsize=7)
        else:
            ax.bar(range(len(names)), values, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(min(shown) * 0.9, max(shown) * 1.05)
        ax.set_title(group)
        ax.set_ylabel("validation bits per byte")
    fig.tight_layout()
    fig.savefig(out / "bits_per_byte.png", dpi=110)
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.4), squeeze=False)
    for ax, (group, names) in zip(axes[0], groups.items(), strict=True):
        for name in names:
            history = results[name]["history"]
            ax.plot([h["tokens"] / 1e6 for h in history], [h["val_bits_per_byte"] for h in history], label=name)
        ax.set_title(group)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("validation bits per byte")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close("all")


def write_report(results: dict[str, dict], groups: dict[str, list[str]], out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [header, "", "| group | run | val bits/byte | at 2x length | val loss | bytes/token | train tokens/s "
             "| generate tokens/s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for group, names in groups.items():
        for name in names:
            r = results[name]
            twice = "n/a" if r.get("val_bits_per_byte_2x") is None else f"{r['val_bits_per_byte_2x']:.4f}"
            generated = f"{r['generate_tokens_per_second']:,.0f}" if "generate_tokens_per_second" in r else ""
            lines.append(f"| {group} | {name} | {r['val_bits_per_byte']:.4f} | {twice} | {r['val_loss']:.4f} | "
                         f"{r['bytes_per_token']:.2f} | {r['train_tokens_per_second']:,.0f} | {generated} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, groups, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="small", help="model size (tiny is for tests)")
    parser.add_argument("--max_tokens", type=int, default=2_000_000, help="training tokens per run")
    parser.add_argument("--budget_minutes", type=float, default=0, help="also stop each run after this long")
    parser.add_argument("--runs", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--dataset", default=str(SHARED_DATA))
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "ablations"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "ablation_results"))
    options = parser.parse_args(argv)
    context = SIZES[options.size][1]
    table = runs(context)
    chosen = [n for n in options.runs.split(",") if n] or list(table)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(table)}")
    work = Path(options.work_dir) / options.size
    results = {name: run_one(name, table[name][1], table[name][2], options, work) for name in chosen}
    groups: dict[str, list[str]] = {}
    for name in chosen:
        groups.setdefault(table[name][0], []).append(name)
    for group, extra in GROUP_MEMBERS.items():
        if group in groups:
            groups[group] = [n for n in extra if n in results] + groups[group]
    header = (f"Ablations: `{' '.join(['python benchmarks/ablations.py', *(argv if argv is not None else sys.argv[1:])])}`; "
              f"size {options.size} ({' '.join(SIZES[options.size][0]) or 'the default config'}), "
              f"{options.max_tokens:,} training tokens per run, seed {options.seed}, data {options.dataset}; {machine_line()}")
    write_report(results, groups, Path(options.out), header)
    return results


if __name__ == "__main__":
    main()
