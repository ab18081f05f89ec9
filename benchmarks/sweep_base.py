"""The base-model sweep: which recipe learns most from the same 614k training tokens, at an
equal wall time per run on this machine.

    python benchmarks/sweep_base.py --minutes 8 --out benchmarks/sweep_results
    python benchmarks/sweep_base.py --minutes 8 --runs baseline,muon   # some runs only
    python benchmarks/sweep_base.py --minutes 15 --max_train_stories 746 --runs release,release_wd_3 \
        --work_dir runs/sweep_quarter --out benchmarks/sweep_results_quarter  # a quarter of the stories

Every run goes through train_tinystories_model.main (the real training loop) with the
recipe of the release before it (BASE) plus its own flags, for --minutes of wall time (evaluations
included); the learning-rate decay follows the clock, so every schedule ends with the time
budget. Each run is evaluated on the whole validation file every --eval_interval steps and at
its time limit, and early-stopped after --patience evaluations without improvement; its
figure is its best validation bits per byte. RUNS is a ladder: each run names the run it
builds on, so the table reads as what each change adds. With --max_train_stories, a run trains
on a seeded sample of the stories: a quarter of them for a quarter of the minutes repeats the
text as often as a run four times as long, so the memorising regime of a long run can be swept
at the price of a short one.

Resumable: a finished run (runs/sweep/<run>/result.json, same settings) is not redone, and
an interrupted one continues with --resume. Writes OUT/results.json, OUT/results.md and
OUT/curves.png (validation bits per byte against minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_utils import REPO, SHARED_DATA, machine_line
from train_tinystories_model import main as train  # the script's whole run, as a function of its flags

# The recipe of the release before the sweep (RESULTS.md), with warm-up scaled to a short run.
BASE = ["--position_embedding", "rope", "--batch_size", "16", "--learning_rate", "1e-3", "--dropout", "0.1",
        "--attention_dropout", "0", "--weight_decay", "0.1", "--warmup_steps", "30", "--num_epochs", "1000"]

# name -> (the run it builds on, the flags it adds to that run's). The baseline is BASE itself.
RUNS: dict[str, tuple[str | None, list[str]]] = {
    "baseline": (None, []),
    "muon": ("baseline", ["--optimizer", "muon"]),
    "warmdown": ("muon", ["--lr_schedule", "warmdown", "--min_lr", "0"]),
    "muon_lr_3e-3": ("warmdown", ["--learning_rate", "3e-3"]),
    "adamw_warmdown": ("baseline", ["--lr_schedule", "warmdown", "--min_lr", "0"]),
    "adamw_lr_3e-3": ("adamw_warmdown", ["--learning_rate", "3e-3"]),
    "qk_norm": ("muon_lr_3e-3", ["--qk_norm", "--zero_init_projections"]),
    "relu2_skips": ("qk_norm", ["--activation", "relu2", "--skip_weights"]),
    "wd_1": ("relu2_skips", ["--weight_decay", "1.0"]),
    # The released recipe, then the regularisers it needs once the run repeats its data ~15 times.
    "release": ("qk_norm", ["--activation", "gelu_tanh", "--weight_decay", "1.0", "--warmdown_fraction", "0.6"]),
    "release_wd_3": ("release", ["--weight_decay", "3.0"]),
    "release_dropout_0.2": ("release", ["--dropout", "0.2"]),
}


def flags_of(name: str) -> list[str]:
    """BASE, then the flags of every run up the ladder to this one (later flags win)."""
    parent, flags = RUNS[name]
    return (BASE if parent is None else flags_of(parent)) + flags


def settings_of(options: argparse.Namespace) -> dict:
    """The options that decide a run's figures: a saved result made with others is redone.
    max_train_stories is named only when set, so results from before it existed still count."""
    settings = {key: getattr(options, key) for key in ("minutes", "eval_interval", "patience", "dataset", "seed")}
    if options.max_train_stories:
        settings["max_train_stories"] = options.max_train_stories
    return settings


def saved_result(name: str, options: argparse.Namespace, work: Path) -> dict | None:
    """The figures of a finished run with these settings, or None."""
    path = work / name / "result.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    return saved if saved is not None and saved.get("settings") == settings_of(options) else None


def run_one(name: str, options: argparse.Namespace, work: Path) -> dict:
    """Train one run (or resume an interrupted one); returns its figures."""
    saved = saved_result(name, options, work)
    if saved is not None:
        return saved
    out = work / name
    argv = ["--dataset", options.dataset, "--tokenizer_path", options.tokenizer_path, "--output_dir", str(out),
            "--cache_dir", str(work / "data_cache"), "--max_time_minutes", str(options.minutes),
            "--eval_interval", str(options.eval_interval), "--eval_batches", "0", "--patience", str(options.patience),
            "--seed", str(options.seed), "--max_train_stories", str(options.max_train_stories),
            "--sample_tokens", "20", *flags_of(name)]
    argv.append("--resume" if (out / "last.pth").exists() else "--overwrite")
    print(f"\n=== {name}: {' '.join(RUNS[name][1]) or 'the baseline'}", flush=True)
    state = train(argv)
    best = min(state["history"], key=lambda h: h["val_loss"])
    result = {"name": name, "builds_on": RUNS[name][0], "adds": RUNS[name][1], "flags": flags_of(name),
              "settings": settings_of(options), "val_bits_per_byte": best["val_bits_per_byte"],
              "val_loss": best["val_loss"], "best_minute": best["minutes"], "best_tokens": best["tokens"],
              "tokens": state["tokens"], "minutes": state["train_seconds"] / 60,
              "train_tokens_per_second": state["tokens"] / state["step_seconds"],
              "history": [{k: h[k] for k in ("step", "tokens", "minutes", "val_loss", "val_bits_per_byte")}
                          for h in state["history"]]}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, result in results.items():
        history = result["history"]
        ax.plot([h["minutes"] for h in history], [h["val_bits_per_byte"] for h in history], marker=".", label=name)
    ax.set_xlabel("minutes of training (evaluations included)")
    ax.set_ylabel("validation bits per byte")
    ax.set_ylim(top=min(1.3, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, dict], out: Path, header: str) -> None:
    """results.json, results.md (one row per run: its best figure, its gain over the run it
    builds on, and its last figure, which shows how far it had memorised by then), curves.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [header, "", "| run | builds on | adds | best val bits/byte | change | at minute | at the end "
             "| tokens seen | train tokens/s |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        parent = results.get(r["builds_on"] or "")
        change = f"{r['val_bits_per_byte'] - parent['val_bits_per_byte']:+.4f}" if parent else ""
        lines.append(f"| {name} | {r['builds_on'] or ''} | `{' '.join(r['adds'])}` | {r['val_bits_per_byte']:.4f} | "
                     f"{change} | {r['best_minute']:.1f} | {r['history'][-1]['val_bits_per_byte']:.4f} | "
                     f"{r['tokens']:,} | {r['train_tokens_per_second']:,.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out / "curves.png")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8, help="wall time of each run")
    parser.add_argument("--eval_interval", type=int, default=60, help="steps between evaluations")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--runs", default="", help="comma-separated run names to train (default: all)")
    parser.add_argument("--dataset", default=str(SHARED_DATA))
    parser.add_argument("--tokenizer_path", default=str(REPO / "bpe_tokenizer.json"))
    parser.add_argument("--max_train_stories", type=int, default=0,
                        help="train on a seeded sample of this many stories (0 = all): a quarter of the stories "
                             "for a quarter of the minutes repeats the data as often as a full-length run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "sweep"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "sweep_results"))
    options = parser.parse_args(argv)
    chosen = [n for n in options.runs.split(",") if n] or list(RUNS)
    unknown = [n for n in chosen if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    work = Path(options.work_dir)
    for name in chosen:
        run_one(name, options, work)
    # The report holds every finished run, from this call or an earlier one, in RUNS's order.
    results = {name: saved for name in RUNS if (saved := saved_result(name, options, work)) is not None}
    # The command that gives this report: without --runs, which only picks what to train now.
    given = argv if argv is not None else sys.argv[1:]
    kept = [arg for i, arg in enumerate(given) if arg != "--runs" and (i == 0 or given[i - 1] != "--runs")]
    command = " ".join(["python benchmarks/sweep_base.py", *kept])
    sample = f" ({options.max_train_stories} training stories)" if options.max_train_stories else ""
    header = (f"Sweep: `{command}`; {options.minutes} minutes per run, base flags `{' '.join(BASE)}`, "
              f"data {options.dataset}{sample}, seed {options.seed}; {machine_line()}")
    write_report(results, Path(options.out), header)
    return results


if __name__ == "__main__":
    main()
