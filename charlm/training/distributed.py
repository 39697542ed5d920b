"""torchrun / DistributedDataParallel: which lanes a rank trains, and what the ranks share.

`train.batch_size` is the global number of lanes; with W processes, rank r trains lanes
[r*B/W, (r+1)*B/W). A run with W processes therefore computes what one process does with the same
batch_size (gradients are averaged over ranks), and it resumes with any W that divides batch_size:
the checkpoint holds every lane's hidden state.

Every tensor handed to a collective lives on the training device: NCCL has no CPU tensors.
Each rank draws its own dropout masks (its own seed) while the batch order is shared.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from charlm.errors import CharlmError


@dataclass
class Dist:
    """This process's place in the run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def main(self) -> bool:
        """Rank 0 alone prints, logs and writes checkpoints."""
        return self.rank == 0

    def lanes(self, batch_size: int) -> slice:
        """The rows of a global (batch_size, ...) batch that this rank trains."""
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def agree(self, mean: list[float], main: list[float] = ()) -> tuple[list[float], list[float]]:
        """One all-reduce: `mean` averaged over ranks, and rank 0's `main` given to every rank."""
        if self.world == 1:
            return list(mean), list(main)
        values = [*mean, *(main if self.main else [0.0] * len(main))]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)  # a sum: rank 0 alone adds `main`
        total = t.tolist()
        return [v / self.world for v in total[: len(mean)]], total[len(mean) :]

    def from_main(self, values: list[float]) -> list[float]:
        """Rank 0's values, on every rank."""
        return self.agree([], values)[1]

    def gather_lanes(self, h: torch.Tensor) -> torch.Tensor:
        """Every rank's hidden state (L, B/W, D) joined into the global (L, B, D)."""
        if self.world == 1:
            return h
        parts = [torch.empty_like(h) for _ in range(self.world)]
        dist.all_gather(parts, h.contiguous())
        return torch.cat(parts, dim=1)

    def gather_states(self, state: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-sized CPU tensor (an RNG state), in rank order, on the CPU."""
        if self.world == 1:
            return [state]
        local = state.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return [p.cpu() for p in parts]

    def weight_spread(self, model: torch.nn.Module) -> float:
        """Largest difference between ranks of any single weight (0.0: identical)."""
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(self.device)
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return float((high - low).max())


def leave_together(d: Dist) -> None:
    """Wait for every rank at the end of a run: a rank that leaves the group while another is still
    writing its summary can abort on exit (seen with gloo: "terminate called without an active
    exception")."""
    if d.world > 1:
        dist.barrier()


def dropout_seed(seed: int, rank: int) -> int:
    """The seed of rank's dropout stream: one per rank, all derived from the run's seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def setup(batch_size: int, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device), device
    if batch_size % world:
        raise CharlmError(f"train.batch_size={batch_size} must be a multiple of the {world} processes")
    if device.type == "mps":
        raise CharlmError(f"{world} processes on mps: PyTorch has no process group for Apple's GPU; run one process"
                          " (python train.py train.device=mps), or torchrun with train.device=cpu")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device), device


def teardown(d: Dist) -> None:
    """Leave the process group (after the last collective)."""
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
