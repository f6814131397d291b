"""torchrun support shared by every corpus or fact scan: who am I, which items are mine, gather results.

Launched with ``torchrun --nproc_per_node N script.py ...`` the environment carries ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; a plain ``python script.py`` is rank 0 of 1 and nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from fflayers.core import InputError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment variables."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"rank {rank} of world size {world} is out of range (set by torchrun)")
    return DistInfo(rank, world, local)


def rank_device(info: DistInfo, device: str | torch.device | None = "auto") -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is asked for or available, else the CPU."""
    want = "auto" if device is None else str(device)
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if want.startswith("cuda") or want == "auto":
        n = torch.cuda.device_count()
        if n == 0:
            raise InputError("--device cuda asked for, but no CUDA device is visible")
        if ":" in want:
            return torch.device(want)
        if info.local_rank >= n:
            raise InputError(f"rank {info.rank} has local rank {info.local_rank} but only {n} GPU(s) "
                             "are visible; start at most one process per GPU (--nproc_per_node)")
        return torch.device("cuda", info.local_rank)
    return torch.device(want)


def join_ranks(info: DistInfo, device: str | torch.device | None,
               timeout_s: float | None = None) -> torch.device:
    """This rank's device (:func:`rank_device`), after joining the torchrun job with it
    (:func:`init_distributed`); what every command-line tool does first under torchrun."""
    dev = rank_device(info, device)
    init_distributed(dev, timeout_s=timeout_s)
    return dev


def init_distributed(device: torch.device, timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun job (nccl on CUDA, gloo on CPU); a no-op outside torchrun.

    ``timeout_s``: how long a collective waits for the slowest rank (default: torch's); long scans whose ranks
    finish their shares at different times pass hours here.
    """
    info = dist_info()
    if info.enabled:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
    return info


def parse_shard_spec(spec: str) -> tuple[int, int]:
    """``"I/N"`` (job I of N, counted from 0) as ``(I, N)``; one-line :class:`~fflayers.core.InputError`
    otherwise."""
    parts = str(spec).split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"shard spec {spec!r} is not I/N; pass e.g. --shard 0/4 (job 0 of 4)") from None
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard spec {spec!r} is out of range: I/N needs N >= 1 and 0 <= I < N "
                           f"(e.g. --shard 0/{max(count, 1)} .. {max(count, 1) - 1}/{max(count, 1)})")
    return index, count


def _initialised() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the other ranks (``[obj]`` outside a job).
    Unlike :func:`gather_objects`, only rank 0 holds all of them."""
    import torch.distributed as dist

    if not _initialised():
        return [obj]
    main = dist.get_rank() == 0
    out: list[Any] | None = [None] * dist.get_world_size() if main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself outside a job)."""
    import torch.distributed as dist

    if not _initialised():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_range(n_items: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``n_items`` of ``rank``; shares differ by at most one item, in order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"shard {rank} of {world_size} is out of range")
    base, extra = divmod(n_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` outside a distributed job)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (a no-op outside a distributed job)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    """Leave the process group (a no-op outside a distributed job)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
