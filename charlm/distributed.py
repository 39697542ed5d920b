"""torchrun / DistributedDataParallel: which lanes a rank trains, and what the ranks share.

`train.batch_size` is the global number of lanes; with W processes, rank r trains lanes
[r*B/W, (r+1)*B/W). A run with W processes therefore computes what one process does with the same
batch_size (gradients are averaged over ranks), and it resumes with any W that divides batch_size:
the checkpoint holds every lane's hidden state.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import CharlmError


@dataclass
class Dist:
    """This process's place in the run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone prints, logs and writes checkpoints."""
        return self.rank == 0

    def lanes(self, batch_size: int) -> slice:
        """The rows of a global (batch_size, ...) batch that this rank trains."""
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, values: list[float]) -> list[float]:
        """Average values over ranks (one all-reduce; a no-op in a single process)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def gather_lanes(self, h: torch.Tensor) -> torch.Tensor:
        """Every rank's hidden state (L, B/W, D) joined into the global (L, B, D)."""
        if self.world == 1:
            return h
        parts = [torch.empty_like(h) for _ in range(self.world)]
        dist.all_gather(parts, h.contiguous())
        return torch.cat(parts, dim=1)

    def weight_spread(self, model: torch.nn.Module) -> float:
        """Largest difference between ranks of any parameter's sum (0.0: they agree)."""
        sums = torch.stack([p.detach().double().sum().cpu() for p in model.parameters()])
        parts = [torch.empty_like(sums) for _ in range(self.world)]
        dist.all_gather(parts, sums)
        return float((torch.stack(parts) - sums).abs().max())


def setup(batch_size: int, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    if batch_size % world:
        raise CharlmError(f"train.batch_size={batch_size} must be a multiple of the {world} processes")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


def teardown(d: Dist) -> None:
    """Leave the process group (after the last collective)."""
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
