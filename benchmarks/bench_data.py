"""The data pipeline at the size of the whole TinyStories: tokenizer training and token
caching on 1x to 700x the shared train text, against Hugging Face `tokenizers` as the peer.

    python benchmarks/bench_data.py            # 1x, 10x and 100x the shared train text
    python benchmarks/bench_data.py --big      # and 700x: 1.8 GB, about TinyStories' 1.9 GB

The corpora are ../shared/data/tinystories_train.txt written N times over (under --work_dir).
For each corpus, four steps, each a process of its own, run one after the other:

- ours, tokenizer: `train_bpe_tokenizer_hf.py --dataset CORPUS` (vocab 10,000), as a user
  runs it: a pass to count the stories, then the pre-token counting on all cores, merging,
  and the held-out compression figure;
- HF, tokenizer: BpeTrainer with the ByteLevel pre-tokenizer (bench_tokenizer.hf_train),
  train_from_iterator over the same file's stories, streamed (Rust, all cores);
- ours, token cache: tinystories_data.prepare_pretraining_data, what
  train_tinystories_model.py does before its first step: count, hold out 5% for validation,
  and encode both parts into uint16 files, on all cores;
- HF, encode: encode_batch (Rust, all cores) over the same stories, streamed in batches of
  1,000, written to a uint16 file: the same job with the peer's encoder, on the tokenizer ours
  trained.

Each step's wall time, its throughput (MB of corpus per second), its seconds per 100 MB (flat
when time grows linearly), and its peak resident memory: the sum over the step's process and
its workers (proportional set sizes, so that pages shared after a fork count once), sampled
every 50 ms, and the largest single process (resident set). Ratios: our tokenizer
time over HF's (target at most 1.5x at 100x), our encoding throughput over HF's (target 2x or
more). Prints a Markdown table; --json writes the rows too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from bench_utils import REPO, SHARED_DATA, cpu_name

SCALES = [1, 10, 100]
BIG_SCALE = 700
MB = 1e6


# ------------------------------------------------------------------ the HF steps

def hf_train_step(corpus: str, output: str) -> None:
    from bench_tokenizer import hf_train
    from tinystories_data import StorySource

    hf_train(StorySource(corpus)).save(output)


def hf_encode_step(corpus: str, tokenizer_json: str, output: str) -> None:
    from tokenizers import Tokenizer

    from bpe_tokenizer import ENDOFTEXT
    from tinystories_data import StorySource
    from tokenizer_workers import batched_texts

    tokenizer = Tokenizer.from_file(tokenizer_json)
    end = tokenizer.token_to_id(ENDOFTEXT)
    with open(output, "wb") as f:
        for batch in batched_texts(StorySource(corpus)):
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                f.write(np.array([*encoding.ids, end], dtype=np.uint16).tobytes())


def cache_step(corpus: str, tokenizer_path: str, cache_dir: str) -> None:
    from bpe_tokenizer import BPETokenizer
    from tinystories_data import prepare_pretraining_data

    windows = prepare_pretraining_data(BPETokenizer.load(tokenizer_path), corpus, 256, cache_dir)
    print(json.dumps({role: len(data.tokens) for role, data in windows.items()}))


STEPS = {"hf_train": hf_train_step, "hf_encode": hf_encode_step, "cache": cache_step}


# ------------------------------------------------------------------ measuring

def measure(command: list[str], log: Path) -> dict:
    """Run command; its wall time, and its peak memory sampled every 50 ms: the sum over its
    processes of their proportional set size (PSS: a page that forked workers share with
    their parent counts once, not once per process), and the largest process's resident set."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    start = time.perf_counter()
    with open(log, "w") as out:
        process = psutil.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        peak_sum = peak_one = 0
        while process.poll() is None:
            pss, rss = [], []
            for member in [process, *process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # it ended between the listing and the reading
                    memory = member.memory_full_info()
                    pss.append(memory.pss)
                    rss.append(memory.rss)
            peak_sum, peak_one = max(peak_sum, sum(pss)), max(peak_one, max(rss, default=0))
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); see {log}")
    return {"seconds": seconds, "peak_mb": peak_sum / MB, "largest_process_mb": peak_one / MB}


def build_corpus(work: Path, scale: int) -> Path:
    """The shared train text written scale times over (kept for the next run)."""
    path = work / f"tinystories_train_{scale}x.txt"
    text = (SHARED_DATA / "tinystories_train.txt").read_bytes()
    if not path.exists() or path.stat().st_size != scale * len(text):
        with open(path, "wb") as f:
            for _ in range(scale):
                f.write(text)
    return path


def bench_corpus(work: Path, scale: int) -> list[dict]:
    corpus = build_corpus(work, scale)
    size = corpus.stat().st_size / MB
    step = work / f"{scale}x"
    step.mkdir(exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--step"]
    runs = {
        "ours, tokenizer": [sys.executable, "train_bpe_tokenizer_hf.py", "--dataset", str(corpus),
                            "--output", str(step / "ours.json"), "--hf_output", str(step / "ours_hf.json")],
        "HF, tokenizer": [*me, "hf_train", str(corpus), str(step / "hf.json")],
        "ours, token cache": [*me, "cache", str(corpus), str(step / "ours.json"), tempfile.mkdtemp(dir=step)],
        "HF, encode": [*me, "hf_encode", str(corpus), str(step / "ours_hf.json"), str(step / "hf_tokens.bin")],
    }
    rows = []
    for name, command in runs.items():
        result = measure(command, step / f"{name.replace(', ', '_').replace(' ', '_')}.log")
        rows.append({"corpus": f"{scale}x", "mb": size, "step": name, **result,
                     "mb_per_s": size / result["seconds"], "s_per_100mb": 100 * result["seconds"] / size})
        print(f"{scale}x {name}: {result['seconds']:.1f} s, peak {result['peak_mb']:.0f} MB", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| corpus | MB | step | seconds | MB/s | s per 100 MB | peak memory, all processes (PSS, MB) | "
             "largest process (RSS, MB) | ours vs HF |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_key = {(row["corpus"], row["step"]): row for row in rows}
    for row in rows:
        ratio = ""
        if row["step"] == "ours, tokenizer":
            ratio = f"{row['seconds'] / by_key[row['corpus'], 'HF, tokenizer']['seconds']:.2f}x the time"
        elif row["step"] == "ours, token cache":
            ratio = f"{row['mb_per_s'] / by_key[row['corpus'], 'HF, encode']['mb_per_s']:.2f}x the speed"
        lines.append(f"| {row['corpus']} | {row['mb']:.0f} | {row['step']} | {row['seconds']:.1f} | "
                     f"{row['mb_per_s']:.1f} | {row['s_per_100mb']:.1f} | {row['peak_mb']:.0f} | "
                     f"{row['largest_process_mb']:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", action="store_true", help=f"also {BIG_SCALE}x (1.8 GB of disk, about 30 minutes)")
    parser.add_argument("--scales", type=int, nargs="*", default=None, help="corpus sizes, in copies of the text")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "bench_data"))
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)  # (one measured step, run by measure)
    args = parser.parse_args()
    if args.step:
        STEPS[args.step[0]](*args.step[1:])
        return
    if not (SHARED_DATA / "tinystories_train.txt").exists():
        raise SystemExit(f"{SHARED_DATA / 'tinystories_train.txt'} is missing: this benchmark needs the shared text")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    scales = args.scales or SCALES + ([BIG_SCALE] if args.big else [])
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; corpora under {work}", flush=True)
    rows = [row for scale in scales for row in bench_corpus(work, scale)]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
