"""Process-group setup for `torchrun`: DDP over gloo on CPU, NCCL on GPU. One process is a world of 1."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("tunery")

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # --shard: the model's weights are split across the processes (sharding.py)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if size == 1:
        return World(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Processes on one machine share its cores; oversubscribing them slows every rank down.
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    return World(dist.get_rank(), size, local_rank, device)


def all_sum(values: list[float], world: World) -> list[float]:
    """Sum a few scalars over all processes (one collective)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_max(values: list[float], world: World) -> list[float]:
    """The largest value of each of a few scalars over all processes (one collective)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def even_rows(rows: list[T], world: World, filler: T | None = None) -> list[tuple[T, bool]]:
    """`rows` each with True, then, in a sharded run, copies of the last (or `filler` when there is none)
    with False up to the largest number of rows any process has: every process must run the same number
    of forward passes, since each gathers the sharded weights with the others. A copy counts for
    nothing (weight 0)."""
    marked = [(row, True) for row in rows]
    if not world.sharded:
        return marked
    most = int(all_max([float(len(rows))], world)[0])
    pad = rows[-1] if rows else filler
    if pad is None:
        raise ValueError("even_rows: a process without rows needs a filler")
    return marked + [(pad, False)] * (most - len(rows))


def grads_sync(
    model: torch.nn.Module, world: World, last_row: bool
) -> contextlib.AbstractContextManager[None]:
    """The context of one row's backward in a step of several rows: DDP all-reduces gradients on the
    step's last row only (`no_sync` on the others, which accumulate locally); nothing without DDP. A
    sharded model reduce-scatters every row's gradients (accumulating them whole would cost the memory
    sharding saves)."""
    if last_row or not world.distributed or world.sharded:
        return contextlib.nullcontext()
    return model.no_sync()  # type: ignore[operator,no-any-return]


def backward_share(loss_sum: torch.Tensor, share: float, world: World, count: float) -> None:
    """Backpropagate one row's summed loss as its `share` of the step's mean over `count` items (examples,
    pairs or trained tokens, counted over every process), however the step is split into rows and
    processes: DDP and a sharded model average gradients over processes, hence the world size factor."""
    (loss_sum * (share * world.size / count)).backward()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def teardown(world: World, grace: float = 30.0) -> None:
    """Leave the process group. Every caller has passed a barrier with all its files written, so nothing is
    lost if gloo's `destroy_process_group` never returns, which it occasionally does on CPU when the ranks
    leave at different moments (pytorch#75097): after `grace` seconds the process exits by itself rather
    than hang torchrun forever."""
    if not (world.distributed and dist.is_initialized()):
        return
    done = threading.Thread(target=dist.destroy_process_group, daemon=True)
    done.start()
    done.join(grace)
    if done.is_alive():
        log.warning(
            "rank %d: leaving the process group took over %.0f s; exiting without it", world.rank, grace
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
