"""Pretrain the TinyStories transformer.

    python train_tinystories_model.py --dataset roneneldan/TinyStories --output_dir tinystories_model \\
        --num_epochs 10 --batch_size 32
    python train_tinystories_model.py --dataset ../shared/data --output_dir tinystories_model
    python train_tinystories_model.py --dataset ../shared/data --output_dir tinystories_model --resume  # after Ctrl-C
    torchrun --nproc_per_node=4 train_tinystories_model.py --dataset ...             # several GPUs/nodes

Stories are encoded once with the tokenizer (--tokenizer_path, from train_bpe_tokenizer_hf.py)
and cached; the model trains on windows of --block_size tokens with AdamW, warm-up and cosine
decay, gradient clipping, mixed precision and gradient accumulation; it is evaluated every
--eval_interval steps (loss, perplexity, bits per byte) and stops early when validation stops
improving. --output_dir receives best_model.pth, final_model.pth, last.pth (for --resume),
config.json and TensorBoard logs.

The loop (Trainer) is shared with train_tinystories_chat_model.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from bpe_tokenizer import BPETokenizer
from tinystories_data import (
    DEFAULT_DATASET,
    DataError,
    SplitNotFoundError,
    TokenWindows,
    cached_tokens,
    encode_stories,
    load_stories,
    run_script,
)
from transformer_model import (
    TransformerConfig,
    TransformerLM,
    autocast_dtype,
    estimate_flops_per_token,
    generate,
    pick_device,
    read_checkpoint,
    save_checkpoint,
)

LN2 = math.log(2)


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, a batch that does not fit); says what to change."""


# ----------------------------------------------------------------------- arguments

def add_model_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TransformerConfig field (but vocab_size, which the tokenizer sets), with
    the config's defaults: every architecture ablation is one flag."""
    group = parser.add_argument_group("model (TransformerConfig)")
    for field in dataclasses.fields(TransformerConfig):
        if field.name == "vocab_size":
            continue
        default = field.default
        if isinstance(default, bool):
            group.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=default)
        elif field.name == "window_size":
            group.add_argument("--window_size", type=int, default=default, help="0 = full causal attention")
        else:
            group.add_argument(f"--{field.name}", type=type(default), default=default)


def add_training_args(parser: argparse.ArgumentParser, learning_rate: float = 3e-4) -> None:
    """The loop's flags, shared with the chat fine-tuning script."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", default="tinystories_model")
    group.add_argument("--num_epochs", type=float, default=10)
    group.add_argument("--batch_size", type=int, default=32, help="sequences per step and process")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--min_lr", type=float, default=None, help="end of the decay (default: learning_rate / 10)")
    group.add_argument("--lr_schedule", choices=["cosine", "linear", "constant"], default="cosine")
    group.add_argument("--warmup_steps", type=int, default=100)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=DEFAULT_DATASET, help="hub id or local path (see tinystories_data)")
    data.add_argument("--val_dataset", default=None, help="validation data (default: --dataset's validation "
                      "split, or a held-out share of its stories)")
    data.add_argument("--val_fraction", type=float, default=0.05)
    data.add_argument("--text_column", default="text")
    data.add_argument("--tokenizer_path", default="bpe_tokenizer.json")
    data.add_argument("--block_size", type=int, default=256)
    data.add_argument("--max_train_stories", type=int, default=0, help="a seeded sample (0 = all)")
    data.add_argument("--max_val_stories", type=int, default=0, help="a seeded sample (0 = all)")
    data.add_argument("--cache_dir", default=None, help="encoded data (default: OUTPUT_DIR/data_cache)")
    data.add_argument("--num_workers", type=int, default=None, help="processes that encode the data")
    add_model_args(parser)
    add_training_args(parser)
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if args.block_size > args.max_position_embeddings:
        parser.error(f"--block_size {args.block_size} is above the model's context, --max_position_embeddings "
                     f"{args.max_position_embeddings}")
    return args


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "block_size"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.learning_rate <= 0 or args.num_epochs <= 0:
        parser.error("--learning_rate and --num_epochs must be positive")
    if args.resume and args.overwrite:
        parser.error("give --resume or --overwrite, not both")
    if args.min_lr is None:
        args.min_lr = args.learning_rate / 10


def model_config(args: argparse.Namespace, vocab_size: int) -> TransformerConfig:
    fields = {f.name for f in dataclasses.fields(TransformerConfig)} - {"vocab_size"}
    return TransformerConfig(vocab_size=vocab_size, **{name: getattr(args, name) for name in fields})


# ---------------------------------------------------------------------------- data

def load_tokenizer(path: str) -> BPETokenizer:
    if not os.path.exists(path):
        raise ValueError(f"no tokenizer at {path}: train one first (python train_bpe_tokenizer_hf.py --dataset ...) "
                         "or pass --tokenizer_path")
    return BPETokenizer.load(path)


def prepare_pretraining_data(args: argparse.Namespace, tokenizer: BPETokenizer) -> tuple[TokenWindows, TokenWindows]:
    """Training and validation windows. Validation: --val_dataset, else the data set's
    validation split, else a seeded --val_fraction of its stories. Both streams are encoded
    once and cached under --cache_dir."""
    cache_dir = args.cache_dir or os.path.join(args.output_dir, "data_cache")
    base_key = {"tokenizer": tokenizer.fingerprint(), "column": args.text_column, "seed": args.seed}
    loaded: dict[str, list[str]] = {}

    def stories(role: str) -> list[str]:
        if not loaded:
            loaded.update(load_train_and_validation(args))
        return loaded[role]

    keys = {role: {**base_key, "dataset": source_name(args.val_dataset if role == "validation" and args.val_dataset
                                                     else args.dataset),
                   "role": role, "max_stories": getattr(args, f"max_{'val' if role == 'validation' else 'train'}_stories"),
                   "val_dataset": source_name(args.val_dataset), "val_fraction": args.val_fraction}
            for role in ("train", "validation")}
    streams = {role: cached_tokens(cache_dir, keys[role],
                                   lambda role=role: encode_stories(stories(role), tokenizer, args.num_workers,
                                                                    desc=f"encoding {role} stories"))
               for role in ("train", "validation")}
    return (TokenWindows(streams["train"], args.block_size, shift_seed=args.seed),
            TokenWindows(streams["validation"], args.block_size))


def source_name(dataset: str | None) -> str | None:
    """A data set's identity for cache keys: the absolute path of a local one."""
    return str(Path(dataset).expanduser().resolve()) if dataset and Path(dataset).expanduser().exists() else dataset


def load_train_and_validation(args: argparse.Namespace) -> dict[str, list[str]]:
    train = load_stories(args.dataset, "train", args.text_column, args.max_train_stories, args.seed)
    try:
        if args.val_dataset:
            try:
                validation = load_stories(args.val_dataset, "validation", args.text_column, args.max_val_stories, args.seed)
            except SplitNotFoundError:  # a single file is its own split
                validation = load_stories(args.val_dataset, "train", args.text_column, args.max_val_stories, args.seed)
        else:
            validation = load_stories(args.dataset, "validation", args.text_column, args.max_val_stories, args.seed)
    except SplitNotFoundError:
        generator = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(len(train), generator=generator).tolist()
        held = max(1, int(len(train) * args.val_fraction))
        if held >= len(train):
            raise DataError(f"{args.dataset}: {len(train)} stories are too few to hold out a validation share") from None
        validation = [train[i] for i in sorted(order[:held])]
        train = [train[i] for i in sorted(order[held:])]
        if args.max_val_stories:
            validation = validation[: args.max_val_stories]
    return {"train": train, "validation": validation}


class EpochBatches:
    """Which items each step reads: every epoch a fresh seeded permutation, cut into global
    batches of batch_size x world_size items, of which each rank takes its own slice. The
    state (epoch, batch within it) goes into checkpoints, so --resume reads on exactly where
    the run stopped. A final incomplete batch is dropped, so every batch has the same size."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{num_items} training windows are too few for one batch of {batch_size} x "
                            f"{world_size} process(es): lower --batch_size or --block_size")
        self.epoch, self.position = 0, 0
        self._order: list[int] | None = None

    def next_indices(self) -> list[int]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_items, generator=generator).tolist()
        start = (self.position * self.world_size + self.rank) * self.batch_size
        self.position += 1
        return self._order[start : start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


def collate(dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*(dataset[i] for i in indices), strict=True)
    return torch.stack(inputs), torch.stack(targets)


# ----------------------------------------------------------------- the training loop

def lr_at(step: int, args: argparse.Namespace, total_steps: int) -> float:
    """Linear warm-up to learning_rate over warmup_steps, then cosine (or linear) decay to
    min_lr at total_steps, or constant."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.learning_rate
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_schedule == "cosine" else 1 - progress
    return args.min_lr + (args.learning_rate - args.min_lr) * shape


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: biases, LayerNorm gains and the
    embedding tables (the tied LM head among them) are not decayed."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.beta1, args.beta2), fused=fused)


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over all processes (identity when alone)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Under torchrun (RANK and WORLD_SIZE set), join the process group: NCCL between GPUs,
    gloo on CPUs; each process takes the GPU of its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank), device


class Trainer:
    """The loop shared by pretraining and chat fine-tuning: accumulation, mixed precision,
    clipping, schedule, evaluation, early stopping, checkpoints, exact resume, Ctrl-C,
    TensorBoard. The data is any Dataset whose items are (inputs, targets) of one shape,
    targets -100 where the loss does not count."""

    def __init__(self, args: argparse.Namespace, model: TransformerLM, tokenizer: BPETokenizer,
                 train_data, val_data, kind: str = "pretraining"):
        self.args, self.tokenizer, self.kind = args, tokenizer, kind
        self.train_data, self.val_data = train_data, val_data
        self.out = Path(args.output_dir)
        self.dist, self.device = setup_distributed(args.device)
        self.run_config = run_config(args)
        torch.manual_seed(args.seed)
        self.model = model.to(self.device)
        self.raw_model = model
        self.optimizer = make_optimizer(self.model, args)
        dtype = autocast_dtype(self.device) if args.amp_dtype is None else (
            torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16)
        use_amp = dtype is not None if args.amp is None else args.amp
        self.amp_dtype = (dtype or torch.bfloat16) if use_amp else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.batches = EpochBatches(len(train_data), args.batch_size, args.seed, self.dist.rank, self.dist.world_size)
        steps_per_epoch = self.batches.batches_per_epoch // args.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise DataError("fewer batches than --gradient_accumulation_steps: lower it or --batch_size")
        self.total_steps = max(1, int(args.num_epochs * steps_per_epoch))
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        # train_seconds is the run's wall time (evaluations and saves included); step_seconds
        # counts the optimisation steps alone, for a throughput that evaluations do not dilute.
        self.state = {"step": 0, "tokens": 0, "best_val_loss": math.inf, "evals_without_improvement": 0,
                      "history": [], "train_seconds": 0.0, "step_seconds": 0.0}
        self.token_bytes = token_byte_lengths(tokenizer)
        self.stop_requested = False
        self.writer = None

    # -------------------------------------------------------------- run bookkeeping

    def prepare_output_dir(self) -> None:
        """Refuse to mix runs: an output dir with a run in it needs --resume or --overwrite."""
        config_path = self.out / "config.json"
        if config_path.exists() and not (self.args.resume or self.args.overwrite):
            old = run_config(argparse.Namespace(**json.loads(config_path.read_text(encoding="utf-8"))))
            differs = "a run with a different config" if old != self.run_config else "a run already"
            raise ValueError(f"{self.out} holds {differs}: pass --resume to continue it or --overwrite to start over "
                             "(or choose another --output_dir)")
        if self.args.resume:
            if not (self.out / "last.pth").exists():
                raise ValueError(f"--resume: no {self.out / 'last.pth'} to continue from")
            self.resume()  # before anything is written, so a refused resume leaves the folder as it was
        if self.dist.world_size > 1:
            dist.barrier()  # every process has checked before the first one writes
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            config_path.write_text(json.dumps(vars(self.args), indent=1, sort_keys=True) + "\n", encoding="utf-8")
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops the logged steps after last.pth, which it is about to redo.
            self.writer = SummaryWriter(self.args.log_dir or str(self.out / "runs"),
                                        purge_step=self.state["step"] if self.args.resume else None)

    def resume(self) -> None:
        payload = read_checkpoint(self.out / "last.pth")
        metadata = payload["metadata"]
        saved_tokenizer = BPETokenizer.from_json(payload["tokenizer"])
        if saved_tokenizer.fingerprint() != self.tokenizer.fingerprint():
            raise ValueError(f"--resume: {self.out / 'last.pth'} was trained with another tokenizer "
                             f"({saved_tokenizer.vocab_size} tokens) than --tokenizer_path gives "
                             f"({self.tokenizer.vocab_size}); pass the run's own tokenizer")
        if payload["config"] != self.raw_model.config.to_dict():
            raise ValueError(f"--resume: the model flags differ from those of the run in {self.out}")
        self.raw_model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(metadata["optimizer"])
        self.scaler.load_state_dict(metadata["scaler"])
        self.batches.load_state_dict(metadata["data"])
        self.state = metadata["state"]
        torch.set_rng_state(metadata["rng"]["torch"])
        if torch.cuda.is_available() and metadata["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(metadata["rng"]["cuda"])
        self.log(f"resumed from {self.out / 'last.pth'} at step {self.state['step']}")

    def save(self, name: str, with_optimizer: bool = False) -> None:
        if not self.dist.main:
            return
        metadata = {"kind": self.kind, "state": self.state, "history": self.state["history"],
                    "step": self.state["step"], "args": self.run_config}
        if with_optimizer:
            metadata |= {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                         "data": self.batches.state_dict(),
                         "rng": {"torch": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        save_checkpoint(self.out / name, self.raw_model, self.tokenizer, **metadata)

    def log(self, message: str) -> None:
        if self.dist.main:
            tqdm.write(message)

    # ----------------------------------------------------------------- one step

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over gradient_accumulation_steps micro-batches. A micro-batch's
        loss is the mean over its targets (those not -100), so it is weighted by its share of
        the targets of the whole effective batch (batch_size x accumulation x processes): the
        summed gradients are then those of the mean loss over all of them, even when targets
        are uneven across micro-batches (chat trains on assistant tokens only)."""
        args, model = self.args, self.model
        micro_batches = []
        for _ in range(args.gradient_accumulation_steps):
            indices = self.batches.next_indices()
            if hasattr(self.train_data, "set_epoch"):  # TokenWindows cut the stream afresh each epoch
                self.train_data.set_epoch(self.batches.epoch)
            micro_batches.append(collate(self.train_data, indices))
        counts = [int((targets != -100).sum()) for _, targets in micro_batches]
        # DDP averages the processes' gradients, so a process's mean target count is the unit.
        mean_count = max(self.dist.sum([float(sum(counts))], self.device)[0] / self.dist.world_size, 1.0)
        total = 0.0
        for micro, ((inputs, targets), count) in enumerate(zip(micro_batches, counts, strict=True)):
            self.state["tokens"] += inputs.numel() * self.dist.world_size
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            sync = micro == len(micro_batches) - 1 or self.dist.world_size == 1
            with contextlib.nullcontext() if sync else model.no_sync(), self.autocast():
                loss = model(inputs, targets=targets).loss * (count / mean_count)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} at step {self.state['step'] + 1}; the last good "
                                    f"checkpoint is {self.out / 'last.pth'} (try a lower --learning_rate)")
            self.scaler.scale(loss).backward()
            total += loss.item()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():  # (fp16's scaler skips such steps)
            raise TrainingError(f"the gradient norm became {grad_norm.item()} at step {self.state['step'] + 1}; the "
                                f"last good checkpoint is {self.out / 'last.pth'} (try a lower --learning_rate)")
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.state["step"], args, self.total_steps)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        return total, grad_norm.item()

    # --------------------------------------------------------------- evaluation

    def evaluate(self, max_batches: int) -> dict:
        """Validation metrics (see loss_totals), this process's share of the batches, summed
        over all processes."""
        batches = sequential_batches(len(self.val_data), self.args.batch_size)[self.dist.rank :: self.dist.world_size]
        if max_batches:
            batches = batches[:max_batches]
        totals = loss_totals(self.raw_model, self.val_data, batches, self.device, self.autocast, self.token_bytes)
        return summarize_losses(*self.dist.sum(totals, self.device))

    def sample(self) -> str:
        prompt = self.args.sample_prompt
        eos = self.tokenizer.special_tokens.get("<|endoftext|>")
        prompt_ids = self.sample_prompt_ids(prompt)
        (tokens,) = generate(self.raw_model, prompt_ids, self.args.sample_tokens, temperature=0.8, top_p=0.95,
                             eos_token_id=eos, bos_token_id=eos, seed=self.args.seed)
        return self.tokenizer.decode(t for t in tokens if t != eos)

    def sample_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    # ------------------------------------------------------------------ the run

    def on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: leave now
            raise KeyboardInterrupt
        self.stop_requested = True
        self.log(f"\n{signal.Signals(signum).name}: stopping after this step and saving {self.out / 'last.pth'} "
                 "(press Ctrl-C again to quit without saving)")

    def run(self) -> dict:
        args = self.args
        self.prepare_output_dir()
        if self.dist.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if args.compile:
            self.model = torch.compile(self.model)
        self.model.train()
        handlers = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.writer:
                self.writer.close()
            if self.dist.world_size > 1:
                dist.destroy_process_group()

    def _loop(self) -> dict:
        args, state = self.args, self.state
        tokens_per_step = args.gradient_accumulation_steps * args.batch_size * self.dist.world_size * args.block_size
        flops_per_token = estimate_flops_per_token(self.raw_model.config, args.block_size)
        self.log(f"{self.kind}: {self.raw_model.num_parameters():,} parameters, {len(self.train_data):,} training "
                 f"windows, {self.total_steps:,} steps of {tokens_per_step:,} tokens, device {self.device}, "
                 f"precision {self.amp_dtype or torch.float32}")
        bar = tqdm(total=self.total_steps, initial=state["step"], disable=not self.dist.main, unit="step",
                   dynamic_ncols=True)
        started, window_loss, window_steps = time.perf_counter(), 0.0, 0
        run_seconds_before = state["train_seconds"]
        reason = "finished"
        try:
            while state["step"] < self.total_steps:
                step_start = time.perf_counter()
                try:
                    loss, grad_norm = self.train_step()
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not is_out_of_memory(err) or state["step"] > 0:
                        raise
                    raise TrainingError(f"the first batch does not fit in memory: lower --batch_size "
                                        f"({args.batch_size}) or --block_size, and raise "
                                        "--gradient_accumulation_steps to keep the effective batch") from None
                seconds = time.perf_counter() - step_start
                state["step_seconds"] = state.get("step_seconds", 0.0) + seconds
                state["train_seconds"] = run_seconds_before + time.perf_counter() - started
                window_loss, window_steps = window_loss + loss, window_steps + 1
                tokens_per_second = tokens_per_step / seconds
                lr = self.optimizer.param_groups[0]["lr"]
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
                if self.writer:
                    for tag, value in (("train/loss", loss), ("train/learning_rate", lr), ("train/grad_norm", grad_norm),
                                       ("train/tokens_per_second", tokens_per_second),
                                       ("train/model_tflops", flops_per_token * tokens_per_second / 1e12)):
                        self.writer.add_scalar(tag, value, state["step"])
                if state["step"] % args.eval_interval == 0 or state["step"] == self.total_steps:
                    if self.evaluation_says_stop(window_loss / window_steps, lr):
                        reason = f"early stop: no improvement in {args.patience} evaluations"
                        break
                    window_loss, window_steps = 0.0, 0
                    self.save("last.pth", with_optimizer=True)
                stop = self.stop_requested or (args.max_time_minutes and state["train_seconds"]
                                              > args.max_time_minutes * 60)
                if self.dist.sum([float(bool(stop))], self.device)[0]:
                    reason = "interrupted" if self.stop_requested else f"time limit ({args.max_time_minutes} min)"
                    break
        finally:
            bar.close()
        self.save("last.pth", with_optimizer=True)
        if reason == "interrupted":
            raise KeyboardInterrupt(f"stopped at step {state['step']}; saved {self.out / 'last.pth'}. Continue with "
                                    f"the same command plus --resume")
        self.save("final_model.pth")
        if self.writer:
            self.writer.flush()
        self.log(f"{reason} at step {state['step']} ({state['tokens']:,} tokens, {state['train_seconds'] / 60:.1f} min); "
                 f"best validation loss {state['best_val_loss']:.4f}")
        if args.release_to and self.dist.main:
            release(self.out / "best_model.pth", args.release_to)
            self.log(f"released {args.release_to}")
        return state

    def evaluation_says_stop(self, train_loss: float, lr: float) -> bool:
        """Evaluate, log, keep the best model; True when patience has run out."""
        state = self.state
        metrics = self.evaluate(self.args.eval_batches)
        if not math.isfinite(metrics["val_loss"]):
            raise TrainingError(f"the validation loss became {metrics['val_loss']} at step {state['step']}; the last "
                                f"good checkpoint is {self.out / 'last.pth'} (try a lower --learning_rate)")
        record = {"step": state["step"], "tokens": state["tokens"], "train_loss": train_loss, "lr": lr,
                  "minutes": state["train_seconds"] / 60, **metrics}
        state["history"].append(record)
        improved = metrics["val_loss"] < state["best_val_loss"]
        if improved:
            state["best_val_loss"], state["evals_without_improvement"] = metrics["val_loss"], 0
            self.save("best_model.pth")
        else:
            state["evals_without_improvement"] += 1
        story = self.sample() if self.dist.main else ""
        if self.writer:
            for name in ("val_loss", "val_perplexity", "val_bits_per_byte"):
                self.writer.add_scalar(f"val/{name[4:]}", metrics[name], state["step"])
            self.writer.add_text("sample", f"{self.args.sample_prompt}{story}", state["step"])
        self.log(f"step {state['step']}: train loss {train_loss:.4f}, val loss {metrics['val_loss']:.4f}, "
                 f"perplexity {metrics['val_perplexity']:.2f}, {metrics['val_bits_per_byte']:.4f} bits/byte"
                 f"{' (best)' if improved else ''}\n  sample: {(self.args.sample_prompt + story)[:300]!r}")
        return bool(self.args.patience) and state["evals_without_improvement"] >= self.args.patience


def is_out_of_memory(err: BaseException) -> bool:
    """Whether err is an allocation failure: CUDA says "out of memory", the CPU allocator
    "can't allocate memory"."""
    return any(text in str(err) for text in ("out of memory", "can't allocate memory", "not enough memory"))


@torch.no_grad()
def loss_totals(model: TransformerLM, dataset, batches: list[list[int]], device: torch.device, autocast,
                token_bytes: torch.Tensor) -> list[float]:
    """[total nats, targets, UTF-8 bytes of the targets] over the given batches of dataset
    items; targets of -100 do not count. token_bytes (vocab,): bytes per token id (special
    tokens count as their text)."""
    was_training = model.training
    model.eval()
    nats = tokens = text_bytes = 0.0
    for indices in batches:
        inputs, targets = collate(dataset, indices)
        inputs, targets = inputs.to(device), targets.to(device).flatten()
        with autocast():
            logits = model(inputs).logits
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=-100,
                                                   reduction="none")
        counted = targets != -100
        nats += losses.sum().item()
        tokens += counted.sum().item()
        text_bytes += token_bytes[targets[counted].cpu()].sum().item()
    model.train(was_training)
    return [nats, tokens, text_bytes]


def sequential_batches(count: int, batch_size: int) -> list[list[int]]:
    """Item indices 0 .. count - 1 in order, in batches of batch_size (the last may be shorter)."""
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def windowed_metrics(model: TransformerLM, tokens, block_size: int, batch_size: int, device: torch.device, autocast,
                     token_bytes: torch.Tensor) -> dict:
    """summarize_losses over a whole token stream cut into windows of block_size tokens."""
    windows = TokenWindows(tokens, block_size)
    batches = sequential_batches(len(windows), batch_size)
    return summarize_losses(*loss_totals(model, windows, batches, device, autocast, token_bytes))


def summarize_losses(nats: float, tokens: float, text_bytes: float) -> dict:
    """Mean loss per target token, its perplexity, and bits per byte: total nats / ln 2 /
    total UTF-8 bytes, which does not depend on the tokenizer."""
    loss = nats / max(tokens, 1)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50)),
            "val_bits_per_byte": nats / LN2 / max(text_bytes, 1), "val_tokens": tokens}


def token_byte_lengths(tokenizer: BPETokenizer) -> torch.Tensor:
    return torch.tensor([len(tokenizer.vocab[i]) for i in range(tokenizer.vocab_size)], dtype=torch.float64)


def release(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy a checkpoint as a released model: weights in float16, no optimizer state."""
    from transformer_model import load_checkpoint

    model, tokenizer, metadata = load_checkpoint(source, device="cpu")
    keep = {key: metadata[key] for key in ("kind", "history", "step", "args") if key in metadata}
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(destination, model, tokenizer, weights_dtype=torch.float16, **keep)


# ------------------------------------------------------------------------------ main

def run_config(args: argparse.Namespace) -> dict:
    """The flags that define a run, leaving out those that only steer one invocation."""
    steering = {"resume", "overwrite", "device", "num_workers", "release_to", "log_dir", "cache_dir", "compile",
                "max_time_minutes"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in steering}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer_path)
    config = model_config(args, tokenizer.vocab_size)
    train_data, val_data = prepare_pretraining_data(args, tokenizer)
    torch.manual_seed(args.seed)
    model = TransformerLM(config)
    return Trainer(args, model, tokenizer, train_data, val_data).run()


if __name__ == "__main__":
    run_script(main, user_errors=(ValueError, OSError, TrainingError))
