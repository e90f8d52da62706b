"""Process-group helpers for training under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N -m crossmodal train ...`` starts N processes with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment; ``session`` joins them
into one process group (gloo on CPU, nccl on CUDA) and ``Dist`` says which one this is.
Without those variables (or with one process) nothing here starts a group and every
helper is a no-op, so the single-process path is exactly what it was.

The training loop uses: ``Dist.split`` (each rank's share of a global batch),
``gather_rows`` and ``share_rows`` (every rank's new rows of the F or G buffer, to every rank),
``sum_terms`` (the epoch's loss terms over all ranks), ``broadcast`` (rank 0's validation,
to all), ``main_first`` (rank 0 builds a dataset or a feature cache, the others then read
it) and ``wrap`` (the DistributedDataParallel wrapper).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger(__name__)

# rank 0 may spend long on a dataset build or a feature cache while the others wait at a barrier;
# a failed worker ends the others through torchrun, not through this timeout
TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, items: np.ndarray) -> list[np.ndarray]:
        """``items`` of one global batch cut into ``world_size`` contiguous parts (sizes differ by <= 1)."""
        return np.array_split(np.asarray(items), self.world_size)

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_terms(self, terms: dict[str, float]) -> dict[str, float]:
        """``terms`` summed over the ranks (every rank must hold the same names)."""
        if not self.enabled or not terms:
            return terms
        names = sorted(terms)
        values = torch.tensor([terms[k] for k in names], dtype=torch.float64, device=_device())
        tdist.all_reduce(values)
        return {k: float(v) for k, v in zip(names, values.cpu().tolist(), strict=True)}


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current() -> Dist:
    """The process group this process belongs to (``Dist()`` when there is none)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return Dist()
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def session(device: torch.device) -> Iterator[Dist]:
    """Join the ``torchrun`` process group for the block, if this process was started by it.

    The backend is nccl for a CUDA ``device`` (each process on GPU ``LOCAL_RANK``), gloo
    otherwise. A group that already exists (the caller's) is used and left open. Ranks
    other than 0 log errors only. Without ``torchrun`` this yields ``Dist()`` and does nothing.
    """
    if not launched() or (tdist.is_available() and tdist.is_initialized()):
        yield current()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    tdist.init_process_group(backend, timeout=TIMEOUT)
    dist = current()
    quiet = logging.getLogger("crossmodal")
    level = quiet.level
    if not dist.is_main:
        quiet.setLevel(logging.ERROR)
    log.info("process group: %d processes (%s)", dist.world_size, backend)
    try:
        yield dist
        dist.barrier()
    finally:
        quiet.setLevel(level)
        tdist.destroy_process_group()


@contextmanager
def main_first(dist: Dist) -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks after it: rank 0 builds what is
    cached on disk (a dataset, frozen towers' features), the others then read it."""
    if not dist.is_main:
        dist.barrier()
    yield
    if dist.is_main:
        dist.barrier()


def gather_rows(parts: list[np.ndarray], values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Every rank's rows, on every rank: ``[sum of len(parts), c]`` in the order of ``parts``.

    Args:
        parts: ``world_size`` arrays of row positions, the same list on every rank; rank r
            holds the values of ``parts[r]``.
        values: ``[len(parts[rank]), c]`` this rank's rows (not differentiated through).
    """
    if not dist.enabled:
        return values
    size = max(len(p) for p in parts)
    padded = values.new_zeros(size, values.shape[1])
    padded[: len(values)] = values
    gathered = [torch.empty_like(padded) for _ in parts]
    tdist.all_gather(gathered, padded)
    return torch.cat([got[: len(rows)] for rows, got in zip(parts, gathered, strict=True)])


def share_rows(buffer: torch.Tensor, parts: list[np.ndarray], values: torch.Tensor, dist: Dist) -> None:
    """Write every rank's new rows into ``buffer`` on every rank (``gather_rows`` for ``parts``).

    ``buffer`` ``[n, c]`` is the same on every rank before the call (F or G of the training
    set); rank r wrote ``values`` for rows ``parts[r]`` (disjoint).
    """
    rows = torch.as_tensor(np.concatenate(parts), dtype=torch.long, device=buffer.device)
    buffer[rows] = gather_rows(parts, values, dist).to(buffer.dtype)


def wrap(module: nn.Module, dist: Dist) -> nn.Module:
    """``module`` in DistributedDataParallel when distributed (rank 0's weights broadcast to all),
    else itself. Parameters a step does not use are allowed. Buffers are not broadcast at every
    step: frozen towers' never change, and a trained tower's batch-norm statistics matter only
    to rank 0, which validates and saves the model."""
    if not dist.enabled:
        return module
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.14 renamed broadcast_buffers (deprecated, with a warning) to forward_sync_buffers
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else "broadcast_buffers"
    return ddp(module, find_unused_parameters=True, **{name: False})


def _device() -> torch.device:
    """Where the group's collectives take their tensors: this process's GPU for nccl, else the CPU."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
