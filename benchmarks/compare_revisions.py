"""A benchmark run on an older revision of the code and on the working tree, in turns, in one run.

    python benchmarks/compare_revisions.py --base 52c8890 --runs 2 -- benchmarks/bench_generate.py --repeats 3
    python benchmarks/compare_revisions.py --base 52c8890 --runs 2 -- benchmarks/bench_model.py --repeats 7

The base revision is checked out into a temporary git worktree. The benchmark script (a path
inside the repo, with its flags after --) then runs --runs times in each tree, the trees
taking turns (base, new, base, new, ...), so that a change in the machine's load hits both
alike. Every markdown table row the script prints is read; for each row and each column
whose header says "tokens/s", the table gives the median over the runs of base and new, and
new / base. A refactoring that costs nothing shows ratios near 1.00x.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(tree: Path, command: list[str]) -> str:
    """The benchmark's standard output, run with this Python in tree."""
    print(f"running {' '.join(command)} in {tree}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, *command], cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"error: the benchmark failed in {tree}:\n{done.stderr[-2000:]}")
    return done.stdout


def speed_cells(output: str) -> dict[tuple[str, str], float]:
    """{(row label, column header): value} for every "tokens/s" cell of every markdown table.
    A row's label is its leading cells up to the first number, joined by commas, so rows such
    as "eager | float32 | 8 x 256" stay apart."""
    cells, header = {}, None
    for line in output.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = row
            continue
        if set(line) <= set("|-: "):
            continue
        numbers = [i for i, cell in enumerate(row) if cell.replace(",", "").replace(".", "", 1).isdigit()]
        label = ", ".join(row[: numbers[0]] if numbers else row)
        for i in numbers:
            if i < len(header) and "tokens/s" in header[i]:
                cells[(label, header[i])] = float(row[i].replace(",", ""))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--runs", type=int, default=2, help="runs in each tree")
    parser.add_argument("--outputs", default=None, help="also keep each run's whole output in this folder")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark script and its flags")
    args = parser.parse_args()
    command = [part for part in args.command if part != "--"]
    if not command:
        parser.error("give the benchmark after --, e.g. -- benchmarks/bench_generate.py --repeats 3")
    results: dict[str, list[dict]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory() as scratch:
        base_tree = Path(scratch) / "base"
        if (REPO.parent / "shared").exists():  # ../shared beside the base tree too, for benchmarks that read data
            (Path(scratch) / "shared").symlink_to(REPO.parent / "shared")
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base],
                       check=True, capture_output=True)
        try:
            for run in range(1, args.runs + 1):
                for name, tree in (("base", base_tree), ("new", REPO)):
                    output = run_benchmark(tree, command)
                    results[name].append(speed_cells(output))
                    if args.outputs:
                        Path(args.outputs).mkdir(parents=True, exist_ok=True)
                        (Path(args.outputs) / f"{name}-{run}.txt").write_text(output, encoding="utf-8")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)
    print(f"{' '.join(command)}: base {args.base} against the working tree, medians of {args.runs} runs each\n")
    print("| row | column | base | new | new / base |")
    print("| --- | --- | ---: | ---: | ---: |")
    for key in results["new"][0]:
        if all(key in run for run in results["base"]):
            base = statistics.median(run[key] for run in results["base"])
            new = statistics.median(run[key] for run in results["new"])
            print(f"| {key[0]} | {key[1]} | {base:,.0f} | {new:,.0f} | {new / base:.2f}x |")


if __name__ == "__main__":
    main()
