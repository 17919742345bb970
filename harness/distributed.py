"""Data-parallel InfEmbed with torch.distributed (gloo on CPU, NCCL on GPU).

Each rank holds a contiguous shard of the data (:func:`shard`). During ``fit`` every
Hessian-vector product and the example count are summed with ``all_reduce``, so all
ranks run the same Arnoldi iteration and end with identical factors. ``transform``
embeds the local shard and gathers the shards in rank order, which with contiguous
shards is the dataset's own order. Nothing changes when no process group exists.

Run under ``torchrun --nproc-per-node N``; :func:`init_from_env` starts the group from
torchrun's environment with a timeout, so a rank that dies makes the others fail
with an error instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

DEFAULT_TIMEOUT_S = 600


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Starts the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Returns True when running distributed. The timeout (``INFEMBED_DIST_TIMEOUT_S``,
    default 600 s) bounds how long a collective waits for a rank that died.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        timeout = timeout_s if timeout_s is not None else float(os.environ.get("INFEMBED_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return is_distributed()


def shard(dataset: Dataset, rank_: int | None = None, world_size_: int | None = None) -> Subset:
    """The contiguous block of ``dataset`` this rank owns (sizes differ by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world_size_ is None else world_size_
    n = len(dataset)
    start, stop = r * n // w, (r + 1) * n // w
    return Subset(dataset, range(start, stop))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned); identity when not distributed."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenates every rank's rows in rank order (all ranks receive the result)."""
    if not is_distributed():
        return local
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, local)
    return np.concatenate(parts, axis=0)
