"""The training loop, as functions: shared by pretraining (train_tinystories_model.py) and chat
fine-tuning (train_tinystories_chat_model.py).

Read `train` first (at the end of the file): setup, then `while step < total:` one step, log,
evaluate and checkpoint, stop checks; then finish. `train_step` is one optimizer step in one
place: gradient accumulation, token-weighted micro-batches, autocast, the GradScaler, clipping,
the learning-rate schedule. The chat script reuses the loop through three hooks of `train`
(`prompt_ids`, `on_output_dir_ready`, `score_model`), not by subclassing.

The file, top to bottom:
- flags: add_training_args, the rules for numbers (FLOAT_RULES, AT_LEAST_ONE, AT_LEAST_ZERO),
  check_training_args (the output paths too), run_config (the flags that define a run);
- the recipe: schedule_progress (by steps, or by the clock with a time budget), lr_at
  (warm-up, then cosine, linear, warmdown or no decay), CombinedOptimizer and make_optimizer
  (AdamW, or Muon for the hidden matrices with AdamW for the rest);
- (the processes and the data order they share, Distributed, setup_distributed and
  EpochBatches, are in processes.py);
- is_out_of_memory, release (a best model as a 16-bit released file);
- a run: Run (what one run holds), training_amp_dtype, start_run, log, check_resumed_flags
  (RESUME_MUST_KEEP), resume, clear_previous_run, claim_output_dir, save;
- one step: diverged (the error for a loss that is no longer a number), train_step;
- evaluation: process_share, fit_temperature (with calibration data), evaluate, sample,
  is_improvement, evaluation_says_stop;
- the loop: STOP_SIGNALS, silence_terminal, request_stop and install_stop_handlers (Ctrl-C,
  SIGTERM, SIGHUP), first_step_must_fit, stop_signals, log_step, finish,
  wrap_model, close, and train.

Every run writes best_model.pth, final_model.pth, last.pth (with the optimizer, scaler, data
position and RNG states, so --resume continues exactly), config.json and TensorBoard logs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from bpe_tokenizer import ENDOFTEXT, BPETokenizer
from calibration import fit_inverse_temperature, fold_temperature, temperature_derivatives
from common import Interrupted, autocast, autocast_dtype, check_output_paths, write_atomically
from decoding import generate
from evaluation import collate, loss_totals, sequential_batches, summarize_losses, token_byte_lengths
from processes import Distributed, EpochBatches, setup_distributed
from speedups import use_chunked_loss
from tinystories_data import DataError
from transformer_model import (
    RELEASED_METADATA,
    LMHead,
    TransformerLM,
    estimate_flops_per_token,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

Dataset = torch.utils.data.Dataset


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, a batch that does not fit); says what to change."""


# --------------------------------------------------------------------------- flags

def add_training_args(parser: argparse.ArgumentParser, learning_rate: float = 3e-4) -> None:
    """The loop's flags, shared with the chat fine-tuning script."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", default="tinystories_model")
    group.add_argument("--num_epochs", type=float, default=10)
    group.add_argument("--batch_size", type=int, default=32, help="sequences per step and process")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--min_lr", type=float, default=None, help="end of the decay (default: learning_rate / 10)")
    group.add_argument("--lr_schedule", choices=["cosine", "linear", "constant", "warmdown"], default="cosine",
                       help="warmdown: constant, then a linear decay over the last --warmdown_fraction of the run")
    group.add_argument("--warmdown_fraction", type=float, default=0.45)
    group.add_argument("--warmup_steps", type=int, default=100)
    group.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                       help="muon: torch.optim.Muon on the blocks' weight matrices, AdamW on the rest")
    group.add_argument("--weight_decay", type=float, default=0.1, help="on weight matrices only")
    group.add_argument("--beta1", type=float, default=0.9)
    group.add_argument("--beta2", type=float, default=0.95)
    group.add_argument("--grad_clip", type=float, default=1.0, help="0 = off")
    group.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0 = the epochs decide)")
    group.add_argument("--max_time_minutes", type=float, default=0, help="stop once the run has trained this long, resumed parts included (0 = no limit)")
    group.add_argument("--eval_interval", type=int, default=200)
    group.add_argument("--eval_batches", type=int, default=20, help="validation batches per evaluation (0 = all)")
    group.add_argument("--patience", type=int, default=5, help="stop after this many evaluations without "
                       "improvement (0 = never)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision (default: on where the device has fast bf16 or fp16)")
    group.add_argument("--amp_dtype", choices=["bf16", "fp16"], default=None)
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--log_dir", default=None, help="TensorBoard logs (default: OUTPUT_DIR/runs)")
    group.add_argument("--sample_prompt", default="Once upon a time", help="story started at each evaluation")
    group.add_argument("--sample_tokens", type=int, default=120)
    group.add_argument("--resume", action="store_true", help="continue the run in --output_dir from last.pth")
    group.add_argument("--overwrite", action="store_true", help="start over in an --output_dir that holds a run")
    group.add_argument("--release_to", default=None,
                       help="also write the best model here: weights in 16 bits, no optimizer state")


# Each number flag's rule, written so that NaN fails it; infinity is refused separately.
FLOAT_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "learning_rate": (lambda v: v > 0, "a positive number"),
    "num_epochs": (lambda v: v > 0, "a positive number"),
    "min_lr": (lambda v: v >= 0, "0 or more"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": (lambda v: v >= 0, "0 or more (0 turns clipping off)"),
    "max_time_minutes": (lambda v: v >= 0, "0 or more (0 = no limit)"),
    "warmdown_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "checkable_weight": (lambda v: v >= 0, "0 or more"),
    "words_lines": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "swapped_words": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "requested_weight": (lambda v: v >= 0, "0 or more"), "balancing_weight": (lambda v: v >= 0, "0 or more"),
}
AT_LEAST_ONE = ("batch_size", "gradient_accumulation_steps", "eval_interval", "block_size")
# (These tables also hold the scripts' own data flags; each is checked where a script has it.)
AT_LEAST_ZERO = ("max_steps", "patience", "eval_batches", "warmup_steps", "seed", "sample_tokens",
                 "max_train_stories", "max_val_stories", "calibration_stories", "max_train_conversations",
                 "max_val_conversations")


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse impossible flags through parser.error (exit 2) before any work starts, and fill
    in --min_lr."""
    for name in AT_LEAST_ONE:
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    for name in AT_LEAST_ZERO:
        if getattr(args, name, 0) < 0:
            parser.error(f"--{name} must be 0 or more, not {getattr(args, name)}")
    for name, (holds, rule) in FLOAT_RULES.items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and holds(value)):
            parser.error(f"--{name} must be {rule}, not {value}")
    if args.resume and args.overwrite:
        parser.error("give --resume or --overwrite, not both")
    check_output_paths(parser, args, files=("release_to",), folders=("output_dir", "log_dir"))
    if args.min_lr is None:
        args.min_lr = args.learning_rate / 10


def run_config(args: argparse.Namespace) -> dict:
    """The flags that define a run, leaving out those that only steer one invocation."""
    steering = {"resume", "overwrite", "device", "num_workers", "release_to", "log_dir", "cache_dir", "compile",
                "max_time_minutes"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in steering}


# -------------------------------------------------------------------------- recipe

def schedule_progress(step: int, train_seconds: float, args: argparse.Namespace, total_steps: int) -> float:
    """How far the decay is, from 0 (the end of warm-up) to 1: the share of the steps after
    warm-up done, or, with --max_time_minutes, the share of the time used if that is further
    along, so that the decay ends when the time budget does."""
    steps = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    clock = train_seconds / (60 * args.max_time_minutes) if args.max_time_minutes else 0.0
    return min(1.0, max(steps, clock))


def lr_at(step: int, args: argparse.Namespace, progress: float) -> float:
    """Linear warm-up to learning_rate over warmup_steps, then, by the schedule's progress
    (0 to 1): cosine or linear decay to min_lr; or constant; or warmdown, constant until the
    last warmdown_fraction of the run and a linear decay to min_lr over it."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.learning_rate
    if args.lr_schedule == "warmdown":
        shape = min(1.0, (1 - progress) / args.warmdown_fraction)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_schedule == "cosine" else 1 - progress
    return args.min_lr + (args.learning_rate - args.min_lr) * shape


class CombinedOptimizer:
    """Several optimizers stepped as one, each over its own parameters; what the loop needs
    of an optimizer (param_groups, step, zero_grad, state_dict, load_state_dict), so the
    schedule, the fp16 scaler and --resume treat them as one."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        """The groups themselves, not copies, so that setting a group's lr sets it in its
        optimizer; read afresh each time, as load_state_dict replaces them."""
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def step(self, closure: Callable[[], float] | None = None) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer | CombinedOptimizer:
    """AdamW with weight decay on the weight matrices of linear layers (and of an untied LM
    head) only: biases, LayerNorm gains, the skip weights and the embedding tables (the tied
    LM head among them) are not decayed. With --optimizer muon, torch's Muon takes the
    blocks' weight matrices instead (Muon orthogonalises 2-D updates; it is not meant for
    embeddings or the head), with the same learning rate and weight decay:
    adjust_lr_fn="match_rms_adamw" scales its update to AdamW's size."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, LMHead))
                and m.weight is not None}
    decay = [p for p in model.parameters() if id(p) in matrices]
    no_decay = [p for p in model.parameters() if id(p) not in matrices]
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2} if args.optimizer == "muon" else set()
    groups = [{"params": [p for p in decay if id(p) not in hidden], "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.beta1, args.beta2), fused=fused)
    if not hidden:
        return adamw
    muon = torch.optim.Muon([p for p in decay if id(p) in hidden], lr=args.learning_rate,
                            weight_decay=args.weight_decay, adjust_lr_fn="match_rms_adamw")
    return CombinedOptimizer(muon=muon, adamw=adamw)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether err is an allocation failure: CUDA says "out of memory", the CPU allocator
    "can't allocate memory"."""
    return any(text in str(err) for text in ("out of memory", "can't allocate memory", "not enough memory"))


def release(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy a checkpoint as a released model: weights in float16, no optimizer state."""
    model, tokenizer, metadata = load_checkpoint(source, device="cpu")
    keep = {key: metadata[key] for key in RELEASED_METADATA if key in metadata}
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(destination, model, tokenizer, weights_dtype=torch.float16, **keep)


# --------------------------------------------------------------------------- a run

@dataclasses.dataclass
class Run:
    """What one run holds. `state` is what --resume restores besides the weights, optimizer,
    scaler, data position and RNG: step, tokens, best_val_loss (the validation loss of the best
    model), best_score (with a score_model: its score), evals_without_improvement,
    history (one record per evaluation), train_seconds (the run's wall time, evaluations and
    saves included) and step_seconds (the optimisation steps alone, for a throughput that
    evaluations do not dilute)."""

    args: argparse.Namespace
    kind: str  # "pretraining" or "chat", recorded in the checkpoints
    tokenizer: BPETokenizer
    train_data: Dataset
    val_data: Dataset
    raw_model: TransformerLM  # what is saved, evaluated and sampled
    model: torch.nn.Module  # what trains: raw_model, or raw_model wrapped by DDP or torch.compile
    optimizer: torch.optim.Optimizer | CombinedOptimizer
    amp_dtype: torch.dtype | None  # autocast dtype; None is float32
    scaler: torch.amp.GradScaler
    batches: EpochBatches
    total_steps: int
    dist: Distributed
    device: torch.device
    out: Path
    state: dict
    token_bytes: torch.Tensor  # UTF-8 bytes per token id, for bits per byte
    writer: SummaryWriter | None = None  # TensorBoard, on the main process
    calibration_data: Dataset | None = None  # held-out training text to fit a temperature on (calibration.py)
    stop_signal: int = 0  # the signal (Ctrl-C, SIGTERM, SIGHUP) that asked the run to stop; 0 for none
    stop_time: float = 0.0  # when it came (time.monotonic)


def training_amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """--amp and --amp_dtype as an autocast dtype (None: float32). By default mixed precision
    is on where the device has a fast half precision (common.autocast_dtype)."""
    dtype = autocast_dtype(device) if args.amp_dtype is None else (
        torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16)
    use_amp = dtype is not None if args.amp is None else args.amp
    return (dtype or torch.bfloat16) if use_amp else None


def start_run(args: argparse.Namespace, model: TransformerLM, tokenizer: BPETokenizer, train_data: Dataset,
              val_data: Dataset, kind: str = "pretraining", calibration_data: Dataset | None = None) -> Run:
    """Everything a run needs before its first step: the processes and the device, the model
    on it with the chunked loss switched on, AdamW, the precision, the data order and the
    number of steps. Writes nothing."""
    distributed, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    # The chunked loss never builds the (batch, seq, vocab) logits. It is switched on here, on
    # the model itself, before DDP or torch.compile wrap it; the state-dict keys stay the same.
    model = use_chunked_loss(model).to(device)
    amp_dtype = training_amp_dtype(args, device)
    batches = EpochBatches(len(train_data), args.batch_size, args.seed, distributed.rank, distributed.world_size)
    steps_per_epoch = batches.batches_per_epoch // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise DataError("fewer batches than --gradient_accumulation_steps: lower it or --batch_size")
    total_steps = max(1, int(args.num_epochs * steps_per_epoch))
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    state = {"step": 0, "tokens": 0, "best_val_loss": math.inf, "evals_without_improvement": 0, "history": [],
             "train_seconds": 0.0, "step_seconds": 0.0}
    return Run(args=args, kind=kind, tokenizer=tokenizer, train_data=train_data, val_data=val_data, raw_model=model,
               model=model, optimizer=make_optimizer(model, args), amp_dtype=amp_dtype,
               # Only fp16 needs loss scaling (its range is narrow); bf16 and float32 run the scaler disabled.
               scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
               batches=batches, total_steps=total_steps, dist=distributed, device=device, out=Path(args.output_dir),
               state=state, token_bytes=token_byte_lengths(tokenizer), calibration_data=calibration_data)


def log(run: Run, message: str) -> None:
    """One line on the main process, above the progress bar."""
    if run.dist.main:
        tqdm.write(message)


# Flags whose change would make --resume read other data, or cut it differently, than the run
# it continues (the number of processes among them): refused. Any other change (the rate, the
# step count, the evaluations) is allowed and said. (Both scripts' data flags are here; each run
# has its own.)
RESUME_MUST_KEEP = ("dataset", "val_dataset", "val_fraction", "text_column", "block_size", "batch_size",
                    "gradient_accumulation_steps", "seed", "max_train_stories", "max_val_stories",
                    "calibration_stories", "words_lines", "from_stories", "base_model", "requests", "checkable_weight",
                    "swapped_words", "requested_weight", "balancing_weight", "select_requests", "select_stories",
                    "max_train_conversations", "max_val_conversations", "processes")


def check_resumed_flags(run: Run, saved: dict, path: Path) -> None:
    """Refuse a changed flag of RESUME_MUST_KEEP; log every other flag that differs from the
    saved run's."""
    now = run_config(run.args) | {"processes": run.dist.world_size}
    changed = {key: (saved[key], now[key]) for key in now.keys() & saved.keys() if saved[key] != now[key]}
    refused = [key for key in changed if key in RESUME_MUST_KEEP]
    if refused:
        raise ValueError(f"--resume: {path} was trained with " + ", ".join(
            f"--{key} {changed[key][0]} (now {changed[key][1]})" for key in sorted(refused))
            + "; a resumed run must read its data the same way: pass the run's own values, or start a new run")
    if changed:
        log(run, "--resume: continuing with changed flags: " + ", ".join(
            f"--{key} {changed[key][1]} (was {changed[key][0]})" for key in sorted(changed)))


def resume(run: Run) -> None:
    """Restore the run from its last.pth: weights, optimizer, scaler, data position, state and
    RNG, after checking that the tokenizer, the model flags and the data flags are the run's
    own (check_resumed_flags)."""
    path = run.out / "last.pth"
    payload = read_checkpoint(path)
    metadata = payload["metadata"]
    saved_tokenizer = BPETokenizer.from_json(payload["tokenizer"])
    if saved_tokenizer.fingerprint() != run.tokenizer.fingerprint():
        raise ValueError(f"--resume: {path} was trained with another tokenizer ({saved_tokenizer.vocab_size} tokens) "
                         f"than --tokenizer_path gives ({run.tokenizer.vocab_size}); pass the run's own tokenizer")
    if payload["config"] != run.raw_model.config.to_dict():
        raise ValueError(f"--resume: the model flags differ from those of the run in {run.out}")
    if "optimizer" not in metadata:
        raise ValueError(f"--resume: {path} holds weights but no optimizer state (a best_model.pth or a released "
                         "model copied over it?), so the run cannot continue exactly; put the run's own last.pth "
                         "back, or start over with --overwrite")
    saved_flags = metadata.get("args", {}) | ({"processes": metadata["processes"]} if "processes" in metadata else {})
    check_resumed_flags(run, saved_flags, path)
    saved_optimizer = "muon" if set(metadata["optimizer"]) == {"muon", "adamw"} else "adamw"
    if saved_optimizer != run.args.optimizer:
        raise ValueError(f"--resume: the run in {run.out} trained with --optimizer {saved_optimizer}; pass that again")
    run.raw_model.load_state_dict(payload["model"])
    run.optimizer.load_state_dict(metadata["optimizer"])
    run.scaler.load_state_dict(metadata["scaler"])
    run.batches.load_state_dict(metadata["data"])
    run.state = metadata["state"]
    torch.set_rng_state(metadata["rng"]["torch"])
    if torch.cuda.is_available() and metadata["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(metadata["rng"]["cuda"])
    log(run, f"resumed from {path} at step {run.state['step']}")


def clear_previous_run(run: Run) -> None:
    """--overwrite: delete the old run's checkpoints and its TensorBoard events in OUTPUT_DIR/runs,
    so that a new run stopped early never leaves a folder that mixes two runs. (The data cache
    stays: its files are named by what they hold. A --log_dir elsewhere may hold other runs' logs
    and is left alone.)"""
    for name in ("best_model.pth", "final_model.pth", "last.pth"):
        (run.out / name).unlink(missing_ok=True)
    for events in (run.out / "runs").glob("events.out.tfevents.*"):
        events.unlink()


def claim_output_dir(run: Run, on_output_dir_ready: Callable[[Path], None] | None = None) -> None:
    """Refuse to mix runs (an output dir with a run in it needs --resume or --overwrite),
    resume, then write config.json, open TensorBoard and call on_output_dir_ready (on the
    main process)."""
    args, config_path = run.args, run.out / "config.json"
    if config_path.exists() and not (args.resume or args.overwrite):
        try:
            old = run_config(argparse.Namespace(**json.loads(config_path.read_text(encoding="utf-8"))))
        except (ValueError, TypeError):  # damaged: it holds a run all the same
            old = None
        differs = ("a run whose config.json is damaged" if old is None else
                   "a run with a different config" if old != run_config(args) else "a run already")
        raise ValueError(f"{run.out} holds {differs}: pass --resume to continue it or --overwrite to start over "
                         "(or choose another --output_dir)")
    if args.resume:
        if not (run.out / "last.pth").exists():
            raise ValueError(f"--resume: no {run.out / 'last.pth'} to continue from")
        resume(run)  # before anything is written, so a refused resume leaves the folder as it was
    if run.dist.world_size > 1:
        dist.barrier()  # every process has checked before the first one writes
    if run.dist.main:
        if args.overwrite:
            clear_previous_run(run)
        run.out.mkdir(parents=True, exist_ok=True)
        config = json.dumps(vars(args), indent=1, sort_keys=True) + "\n"
        write_atomically(config_path, lambda tmp: Path(tmp).write_text(config, encoding="utf-8"))
        from torch.utils.tensorboard import SummaryWriter  # a slow import, only where it is used

        # A resumed run drops the logged steps after last.pth, which it is about to redo.
        run.writer = SummaryWriter(args.log_dir or str(run.out / "runs"),
                                   purge_step=run.state["step"] if args.resume else None)
        if on_output_dir_ready:
            on_output_dir_ready(run.out)


def save(run: Run, name: str, with_optimizer: bool = False, temperature: float = 1.0) -> None:
    """A checkpoint in the output dir (main process only); with_optimizer adds what --resume
    needs; a temperature other than 1 is folded into a copy of the weights (calibration.py)."""
    if not run.dist.main:
        return
    metadata = {"kind": run.kind, "state": run.state, "history": run.state["history"], "step": run.state["step"],
                "args": run_config(run.args)}
    if with_optimizer:
        metadata |= {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                     "processes": run.dist.world_size,
                     "data": run.batches.state_dict(),
                     "rng": {"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    model = run.raw_model if temperature == 1.0 else fold_temperature(copy.deepcopy(run.raw_model), temperature)
    save_checkpoint(run.out / name, model, run.tokenizer, **metadata)


# ------------------------------------------------------------------------ one step

def diverged(run: Run, what: str) -> TrainingError:
    """The error for a loss or gradient that is no longer a number: where to go back to (if
    anything was saved yet), and what to try."""
    last = run.out / "last.pth"
    kept = f"the last good checkpoint is {last}" if last.exists() else "nothing was saved yet"
    clip = ", or --grad_clip 1.0" if run.args.grad_clip == 0 else ""
    return TrainingError(f"{what}; {kept} (try a lower --learning_rate{clip})")


def train_step(run: Run) -> tuple[float, float]:
    """One optimizer step over gradient_accumulation_steps micro-batches; returns (loss, the
    gradient norm before clipping). A micro-batch's loss is the mean over its targets (those
    not -100, each counted by its loss weight), so it is weighted by its share of the targets
    of the whole effective batch (batch_size x accumulation x processes): the summed gradients
    are then those of the mean loss over all of them, even when targets are uneven across
    micro-batches (chat trains on assistant tokens only)."""
    args, state = run.args, run.state
    # Read the micro-batches first, to count their targets.
    micro_batches = []
    for _ in range(args.gradient_accumulation_steps):
        indices = run.batches.next_indices()
        if hasattr(run.train_data, "set_epoch"):  # TokenWindows cut the stream afresh each epoch
            run.train_data.set_epoch(run.batches.epoch)
        micro_batches.append(collate(run.train_data, indices))
    counts = [float(batch.loss_weights[batch.targets != -100].sum()) for batch in micro_batches]
    # DDP averages the processes' gradients, so a process's mean target count is the unit.
    mean_count = max(run.dist.sum([float(sum(counts))], run.device)[0] / run.dist.world_size, 1.0)
    total = 0.0
    for micro, (batch, count) in enumerate(zip(micro_batches, counts, strict=True)):
        state["tokens"] += batch.inputs.numel() * run.dist.world_size
        batch = batch.to(run.device)  # inputs, targets, weights: (batch, block_size)
        # DDP syncs gradients on the last micro-batch only; the others accumulate locally.
        sync = micro == len(micro_batches) - 1 or run.dist.world_size == 1
        with contextlib.nullcontext() if sync else run.model.no_sync(), autocast(run.device, run.amp_dtype):
            out = run.model(batch.inputs, targets=batch.targets, loss_weights=batch.loss_weights, avoided=batch.avoided)
            loss = out.loss * (count / mean_count)
        if not torch.isfinite(loss):
            raise diverged(run, f"the loss became {loss.item()} at step {state['step'] + 1}")
        run.scaler.scale(loss).backward()  # fp16: scaled up so small gradients do not underflow
        total += loss.item()
    # Clip the gradient norm (of the true, unscaled gradients); 0 turns clipping off.
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                               args.grad_clip if args.grad_clip > 0 else math.inf)
    if not torch.isfinite(grad_norm) and not run.scaler.is_enabled():  # (fp16's scaler skips such steps)
        raise diverged(run, f"the gradient norm became {grad_norm.item()} at step {state['step'] + 1}")
    # The schedule's learning rate for this step, then the update.
    progress = schedule_progress(state["step"], state["train_seconds"], args, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(state["step"], args, progress)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    return total, grad_norm.item()


# ---------------------------------------------------------------------- evaluation

def process_share(run: Run, dataset: Dataset) -> list[list[int]]:
    """This process's share of dataset's items in order, in batches (evaluation.sequential_batches)."""
    return sequential_batches(len(dataset), run.args.batch_size)[run.dist.rank :: run.dist.world_size]


def fit_temperature(run: Run) -> float:
    """The temperature that minimises the loss on the run's calibration data (calibration.py),
    each process summing the derivatives over its share of the batches."""
    batches = process_share(run, run.calibration_data)

    def derivatives(inverse_temperature: float) -> list[float]:
        totals = temperature_derivatives(run.raw_model, run.calibration_data, batches, run.device, run.amp_dtype,
                                         inverse_temperature)
        return run.dist.sum(totals, run.device)

    return 1 / fit_inverse_temperature(derivatives)


def evaluate(run: Run, max_batches: int) -> dict:
    """Validation metrics (evaluation.summarize_losses): this process's share of the first
    max_batches batches (0: all), summed over all processes. With calibration data, they are
    taken with the logits divided by the temperature fitted on it, and the temperature and the
    uncalibrated loss and bits per byte join them."""
    batches = process_share(run, run.val_data)
    if max_batches:
        batches = batches[:max_batches]

    def metrics_at(temperature: float) -> dict:
        totals = loss_totals(run.raw_model, run.val_data, batches, run.device, run.amp_dtype, run.token_bytes,
                             temperature)
        return summarize_losses(*run.dist.sum(totals, run.device))

    if run.calibration_data is None:
        return metrics_at(1.0)
    temperature, uncalibrated = fit_temperature(run), metrics_at(1.0)
    return metrics_at(temperature) | {"temperature": temperature, "val_loss_uncalibrated": uncalibrated["val_loss"],
                                      "val_bits_per_byte_uncalibrated": uncalibrated["val_bits_per_byte"]}


def sample(run: Run, prompt_ids: Callable[[str], list[int]]) -> str:
    """What the model writes after --sample_prompt (encoded by prompt_ids), seeded."""
    eos = run.tokenizer.special_tokens.get(ENDOFTEXT)
    (tokens,) = generate(run.raw_model, prompt_ids(run.args.sample_prompt), run.args.sample_tokens, temperature=0.8,
                         top_p=0.95, eos_token_id=eos, bos_token_id=eos, seed=run.args.seed)
    return run.tokenizer.decode(t for t in tokens if t != eos)


def is_improvement(metrics: dict, state: dict) -> bool:
    """Better than the best model so far: a higher "score" where the run has a score_model
    (chat: request-following; a tie goes to the lower validation loss), else a lower
    validation loss."""
    lower_loss = metrics["val_loss"] < state["best_val_loss"]
    if "score" in metrics:
        best = state.get("best_score", -math.inf)
        return metrics["score"] > best or (metrics["score"] == best and lower_loss)
    return lower_loss


def evaluation_says_stop(run: Run, train_loss: float, prompt_ids: Callable[[str], list[int]],
                         score_model: Callable[[TransformerLM], dict] | None = None) -> bool:
    """Evaluate (and score, with score_model), log, keep the best model; True when patience
    has run out."""
    args, state = run.args, run.state
    metrics = evaluate(run, args.eval_batches)
    if not math.isfinite(metrics["val_loss"]):
        raise diverged(run, f"the validation loss became {metrics['val_loss']} at step {state['step']}")
    if score_model is not None:  # averaged over the processes, so that all of them choose alike
        scores = score_model(run.raw_model)
        totals = run.dist.sum(list(scores.values()), run.device)
        metrics.update(zip(scores, (total / run.dist.world_size for total in totals), strict=True))
    record = {"step": state["step"], "tokens": state["tokens"], "train_loss": train_loss,
              "lr": run.optimizer.param_groups[0]["lr"], "minutes": state["train_seconds"] / 60, **metrics}
    state["history"].append(record)
    improved = is_improvement(metrics, state)
    if improved:
        state.update(best_val_loss=metrics["val_loss"], evals_without_improvement=0)
        if "score" in metrics:
            state["best_score"] = metrics["score"]
        save(run, "best_model.pth", temperature=metrics.get("temperature", 1.0))
    else:
        state["evals_without_improvement"] += 1
    story = sample(run, prompt_ids) if run.dist.main else ""
    if run.writer:
        for name, value in metrics.items():
            run.writer.add_scalar(f"val/{name.removeprefix('val_')}", value, state["step"])
        run.writer.add_text("sample", f"{args.sample_prompt}{story}", state["step"])
    score = f", score {metrics['score']:.3f}" if "score" in metrics else ""
    if "temperature" in metrics:
        score += (f", temperature {metrics['temperature']:.3f} (at 1: "
                  f"{metrics['val_bits_per_byte_uncalibrated']:.4f} bits/byte)")
    log(run, f"step {state['step']}: train loss {train_loss:.4f}, val loss {metrics['val_loss']:.4f}, "
             f"perplexity {metrics['val_perplexity']:.2f}, {metrics['val_bits_per_byte']:.4f} bits/byte{score}"
             f"{' (best)' if improved else ''}\n  sample: {(args.sample_prompt + story)[:300]!r}")
    return bool(args.patience) and state["evals_without_improvement"] >= args.patience


# ------------------------------------------------------------------------ the loop

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# torchrun passes a signal on to its workers, which the terminal has often signalled already:
# the same signal again this soon after the first is that echo, not a second request.
ECHO_SECONDS = 2.0


def silence_terminal() -> None:
    """Point standard output and error at /dev/null where they are a terminal: after SIGHUP it
    has closed, and a write to it would fail before the save. A log file or pipe stays."""
    with open(os.devnull, "w") as devnull:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
            with contextlib.suppress(OSError, ValueError, AttributeError):  # no real file behind it
                if os.isatty(stream.fileno()):
                    os.dup2(devnull.fileno(), stream.fileno())


def request_stop(run: Run, signum: int, frame: object) -> None:
    """The handler of STOP_SIGNALS: the first asks the loop to save and stop after this step;
    a second (not the first one's echo) quits at once, without saving."""
    now = time.monotonic()
    if run.stop_signal:
        if signum == run.stop_signal and now - run.stop_time < ECHO_SECONDS:
            return
        raise Interrupted(f"{signal.Signals(signum).name} again: quit without saving this step (the last save, "
                          f"if any, is {run.out / 'last.pth'})", signum)
    run.stop_signal, run.stop_time = signum, now
    with contextlib.suppress(OSError):
        log(run, f"\n{signal.Signals(signum).name}: stopping after this step and saving {run.out / 'last.pth'} "
                 "(press Ctrl-C again to quit without saving)")
    if signum == signal.SIGHUP:
        silence_terminal()


def install_stop_handlers(run: Run) -> dict:
    """request_stop for each of STOP_SIGNALS; returns the handlers it replaced. A signal that is
    ignored stays ignored: nohup ignores SIGHUP so that a run outlives its terminal."""
    return {sig: signal.signal(sig, functools.partial(request_stop, run)) for sig in STOP_SIGNALS
            if signal.getsignal(sig) is not signal.SIG_IGN}


@contextlib.contextmanager
def first_step_must_fit(run: Run) -> Iterator[None]:
    """Turn an out-of-memory error in the first step into a line that says which flag to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err) or run.state["step"] > 0:
            raise
        raise TrainingError(f"the first batch does not fit in memory: lower --batch_size ({run.args.batch_size}) "
                            "or --block_size, and raise --gradient_accumulation_steps to keep the effective "
                            "batch") from None


def stop_signals(run: Run) -> tuple[bool, bool]:
    """(interrupted, out of time): one of STOP_SIGNALS, and the time limit, agreed on by every
    process, so that all of them stop at the same step."""
    limit = run.args.max_time_minutes * 60
    out_of_time = bool(limit) and run.state["train_seconds"] > limit
    interrupted, out_of_time = run.dist.sum([float(run.stop_signal > 0), float(out_of_time)], run.device)
    return interrupted > 0, out_of_time > 0


def log_step(run: Run, bar: tqdm, loss: float, grad_norm: float, tokens_per_second: float,
             flops_per_token: float) -> None:
    """The progress bar's postfix and the step's TensorBoard scalars."""
    lr = run.optimizer.param_groups[0]["lr"]
    bar.update()
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
    if run.writer:
        for tag, value in (("train/loss", loss), ("train/learning_rate", lr), ("train/grad_norm", grad_norm),
                           ("train/tokens_per_second", tokens_per_second),
                           ("train/model_tflops", flops_per_token * tokens_per_second / 1e12)):
            run.writer.add_scalar(tag, value, run.state["step"])


def finish(run: Run, reason: str) -> None:
    """Save last.pth; an interrupted run stops there, saying how to resume (KeyboardInterrupt,
    common.Interrupted); any other writes final_model.pth, logs the summary and releases the best model."""
    args, state = run.args, run.state
    save(run, "last.pth", with_optimizer=True)
    if reason == "interrupted":
        raise Interrupted(f"stopped at step {state['step']}; saved {run.out / 'last.pth'}. Continue with the same "
                          "command plus --resume", run.stop_signal or signal.SIGINT)
    save(run, "final_model.pth")
    if run.writer:
        run.writer.flush()
    score = f", score {state['best_score']:.3f}" if "best_score" in state else ""
    log(run, f"{reason} at step {state['step']} ({state['tokens']:,} tokens, {state['train_seconds'] / 60:.1f} min); "
             f"best model: validation loss {state['best_val_loss']:.4f}{score}")
    if args.release_to and run.dist.main:
        release(run.out / "best_model.pth", args.release_to)
        log(run, f"released {args.release_to}")


def wrap_model(run: Run) -> None:
    """run.model becomes raw_model wrapped for several processes (DDP averages the gradients
    across them) and, with --compile, compiled; in training mode. Done after a resume has
    loaded the weights, since DDP copies rank 0's weights to the others when it wraps."""
    if run.dist.world_size > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.args.compile:
        run.model = torch.compile(run.model)
    run.model.train()


def close(run: Run) -> None:
    """Close TensorBoard and leave the process group, whichever way the run ended."""
    if run.writer:
        run.writer.close()
    if run.dist.world_size > 1:
        dist.destroy_process_group()


def train(args: argparse.Namespace, model: TransformerLM, tokenizer: BPETokenizer, train_data: Dataset,
          val_data: Dataset, kind: str = "pretraining", prompt_ids: Callable[[str], list[int]] | None = None,
          on_output_dir_ready: Callable[[Path], None] | None = None,
          score_model: Callable[[TransformerLM], dict] | None = None, calibration_data: Dataset | None = None) -> dict:
    """Train model with the flags of add_training_args on train_data, evaluating on val_data
    (items (inputs, targets) of one shape, targets -100 where the loss does not count); returns
    the run's state. Hooks: prompt_ids(text) encodes each evaluation's sample prompt (default
    tokenizer.encode); on_output_dir_ready(output_dir) runs on the main process once the dir is
    claimed; score_model(model) adds metrics to each evaluation, a "score" among them choosing
    the best model (is_improvement); calibration_data: see evaluate and save."""
    # Setup: processes, device, optimizer, precision, schedule; the output dir; DDP and compile.
    run = start_run(args, model, tokenizer, train_data, val_data, kind, calibration_data)
    claim_output_dir(run, on_output_dir_ready)
    wrap_model(run)
    prompt_ids, state = prompt_ids or tokenizer.encode, run.state
    tokens_per_step = args.gradient_accumulation_steps * args.batch_size * run.dist.world_size * args.block_size
    flops_per_token = estimate_flops_per_token(run.raw_model.config, args.block_size)
    log(run, f"{kind}: {run.raw_model.num_parameters():,} parameters, {len(train_data):,} training windows, "
             f"{run.total_steps:,} steps of {tokens_per_step:,} tokens, device {run.device}, "
             f"precision {run.amp_dtype or torch.float32}")
    handlers = install_stop_handlers(run)
    started, seconds_before = time.perf_counter(), state["train_seconds"]
    window_loss, window_steps, reason = 0.0, 0, "finished"
    try:
        with tqdm(total=run.total_steps, initial=state["step"], disable=not run.dist.main, unit="step",
                  dynamic_ncols=True) as bar:
            while state["step"] < run.total_steps:
                # One optimizer step.
                step_start = time.perf_counter()
                with first_step_must_fit(run):
                    loss, grad_norm = train_step(run)
                seconds = time.perf_counter() - step_start
                # Log: the run's clock (resumed parts included), the progress bar, TensorBoard.
                state["step_seconds"] = state.get("step_seconds", 0.0) + seconds
                state["train_seconds"] = seconds_before + time.perf_counter() - started
                window_loss, window_steps = window_loss + loss, window_steps + 1
                log_step(run, bar, loss, grad_norm, tokens_per_step / seconds, flops_per_token)
                interrupted, out_of_time = stop_signals(run)
                # Evaluate every eval_interval steps and at the end (the last step or the time
                # limit): keep the best model, stop early when patience has run out, else save
                # last.pth to resume from.
                if state["step"] % args.eval_interval == 0 or state["step"] == run.total_steps or out_of_time:
                    if evaluation_says_stop(run, window_loss / window_steps, prompt_ids, score_model):
                        reason = f"early stop: no improvement in {args.patience} evaluations"
                        break
                    window_loss, window_steps = 0.0, 0
                    save(run, "last.pth", with_optimizer=True)
                    # The evaluation counts against the time limit: if it used up the rest, stop here.
                    state["train_seconds"] = seconds_before + time.perf_counter() - started
                    interrupted, out_of_time = stop_signals(run)
                if interrupted or out_of_time:
                    reason = "interrupted" if interrupted else f"time limit ({args.max_time_minutes} min)"
                    break
        # Finish: last.pth (an interrupted run ends there), final_model.pth, the release.
        finish(run, reason)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        close(run)
    return state
