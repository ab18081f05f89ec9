"""Draw a training run's curves from its TensorBoard scalars into one PNG.

    python benchmarks/plot_training.py tinystories_model/runs benchmarks/base_training_curve.png

Left: the training loss (per step, and smoothed) and the validation loss at each evaluation.
Right: validation bits per byte and the learning rate. The scalars are the ones
train_tinystories_model.py writes (train/loss, train/learning_rate, val/loss,
val/bits_per_byte), so this works for the chat model's runs too.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def read_scalars(log_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tag -> (steps, values) for every scalar in the event files under log_dir. A resumed run
    writes the same steps again; the last value written for a step wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        by_step = {event.step: event.value for event in events.Scalars(tag)}
        steps = np.array(sorted(by_step))
        scalars[tag] = steps, np.array([by_step[step] for step in steps])
    return scalars


def moving_average(values: np.ndarray, width: int) -> np.ndarray:
    """Mean of each window of `width` values (the output is width - 1 shorter)."""
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot(scalars: dict[str, tuple[np.ndarray, np.ndarray]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, bpb_ax) = plt.subplots(1, 2, figsize=(11, 4))
    steps, loss = scalars["train/loss"]
    width = min(50, len(loss))
    loss_ax.plot(steps, loss, color="tab:blue", alpha=0.2, linewidth=0.6)
    loss_ax.plot(steps[width - 1:], moving_average(loss, width), color="tab:blue", label=f"train ({width}-step mean)")
    loss_ax.plot(*scalars["val/loss"], "o-", color="tab:orange", markersize=3, label="validation")
    loss_ax.set(xlabel="step", ylabel="loss (nats per token)", title=title)
    loss_ax.set_ylim(top=min(6.0, float(loss.max())))
    loss_ax.legend()

    val_steps, bpb = scalars["val/bits_per_byte"]
    bpb_ax.plot(val_steps, bpb, "o-", color="tab:orange", markersize=3, label="validation bits per byte")
    best = int(np.argmin(bpb))
    bpb_ax.annotate(f"best {bpb[best]:.4f} at step {val_steps[best]}", (val_steps[best], bpb[best]),
                    xytext=(0, 25), textcoords="offset points", ha="center", arrowprops={"arrowstyle": "->"})
    bpb_ax.set(xlabel="step", ylabel="bits per byte")
    bpb_ax.set_ylim(top=min(1.6, float(bpb.max())))
    lr_ax = bpb_ax.twinx()
    lr_ax.plot(*scalars["train/learning_rate"], color="tab:gray", linewidth=1, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    bpb_ax.legend(loc="upper right")
    lr_ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", help="a run's TensorBoard directory (OUTPUT_DIR/runs)")
    parser.add_argument("png", help="where to write the figure")
    parser.add_argument("--title", default="training run")
    args = parser.parse_args(argv)
    scalars = read_scalars(args.log_dir)
    missing = {"train/loss", "train/learning_rate", "val/loss", "val/bits_per_byte"} - set(scalars)
    if missing:
        sys.exit(f"error: {args.log_dir} holds no {', '.join(sorted(missing))} scalars; "
                 "give the runs/ folder of a train_tinystories_model.py run")
    plot(scalars, args.png, args.title)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
