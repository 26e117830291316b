"""This process's place in a training run: one process, or one rank of a torchrun job (DDP or
FSDP). Owns torch.distributed (the process group, the collectives a run needs) and how a step's
batch is split over the ranks. Knows examples and tensors; not the model, the loop or jobs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .examples import Example, pack

STRATEGIES = ("ddp", "fsdp")
STOPS = (None, "pause", "cancel")  # what rank 0 may tell every rank to do after a step


def training_device(local_rank: int = 0) -> torch.device:
    """The device a rank trains on: its own GPU (LOCAL_RANK-th) where torch sees CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def supports_bf16(device: torch.device) -> bool:
    """bf16 matmuls that are fast on this device: AVX512-BF16/AMX CPUs, CUDA GPUs from Ampere on."""
    from ..models.device import cpu_supports_bf16

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()


def _round_store(rank: int, world: int):
    """The rendezvous store of this start of the ranks, under a prefix of its own. After torchrun
    restarts the ranks, the agent's store still holds the last start's keys, among them the dead
    ranks' gloo addresses: a new rank that read one before its peer wrote the new one would
    connect to a dead port, fail, and spend a restart. Keys of each start apart, it cannot."""
    import datetime

    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it, as env:// does
    store = dist.TCPStore(
        host, port, world, is_master=not agent_hosts and rank == 0, timeout=datetime.timedelta(minutes=10)
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"fundament/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/start-{attempt}", store)


@dataclass
class Parallel:
    """One process (the default) or one rank of `world_size`. Every rank sees the whole global
    batch (the same shuffled order as one process) and trains its share of it: examples
    rank, rank + world_size, ... so the same data and global batch give the same training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @classmethod
    def from_env(cls, strategy: str = "ddp") -> Parallel:
        """The rank torchrun started this process as (RANK, WORLD_SIZE, LOCAL_RANK), its process
        group joined: NCCL on CUDA, gloo on the CPU."""
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        p = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), strategy)
        if world > 1 and not dist.is_initialized():
            if p.device.type == "cuda":
                torch.cuda.set_device(p.device)
            backend = "nccl" if p.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=_round_store(p.rank, world), rank=p.rank, world_size=world)
        return p

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return training_device(self.local_rank)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (one all-reduce for all of them)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def agree(self, stop: str | None, save: bool) -> tuple[str | None, bool]:
        """Rank 0's decision after a step (stop the run? save the resume state now?) made every
        rank's: a rank that stopped or saved alone would leave the others waiting in a collective."""
        if not self.distributed:
            return stop, save
        import torch.distributed as dist

        t = torch.tensor([STOPS.index(stop), int(save)], device=self._comm_device())
        dist.broadcast(t, 0)
        return STOPS[int(t[0])], bool(t[1])

    def rows(self, examples: list[Example], row_tokens: int) -> list[tuple[list[Example], float]]:
        """This rank's share of `examples` packed into rows, each with its weight in the loss (1).
        Every rank returns as many rows as the rank with the most: the shorter ones are padded with
        rows of weight 0, since each forward of a sharded model is a collective every rank joins."""
        mine = pack(examples[self.rank :: self.world_size], row_tokens)
        if not self.distributed:
            return [(row, 1.0) for row in mine]
        most = max(len(pack(examples[r :: self.world_size], row_tokens)) for r in range(self.world_size))
        filler = [min(examples, key=lambda ex: ex.n_tokens)]  # the least work every rank has at hand
        return [(row, 1.0) for row in mine] + [(filler, 0.0)] * (most - len(mine))

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")
