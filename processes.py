"""The processes of a training run and the batches each reads: shared by the training loop
(training.py) for one process or many (torchrun).

- Distributed: this process's rank among world_size processes, and a sum over all of them;
- setup_distributed: join torchrun's process group (NCCL between GPUs, gloo on CPUs);
- EpochBatches: the seeded order of the training items, a fresh permutation each epoch, cut
  into global batches of which each process takes its own slice; resumable.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from common import pick_device
from tinystories_data import DataError


@dataclasses.dataclass
class Distributed:
    """This process's place among the processes of a torchrun job (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """The process that logs and writes files."""
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
    return Distributed(rank, world_size), device


# ---------------------------------------------------------------------- data order

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
        if self.position >= self.batches_per_epoch:
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
