"""Joining a torch.distributed process group (as started by ``torchrun``) and reporting failures clearly.

Failure handling, the same for both training modes: every blocking call (collectives, send/recv) runs
under the process group's ``timeout``. When a rank dies, gloo notices the closed connection at once and
the other ranks' pending calls fail within about a second; when a rank hangs, their calls fail after
``timeout``. Either way ``communication()`` turns the backend's RuntimeError into a DistributedFFError
that names this rank and what it was doing, so nothing waits forever and the message points at the
rank that failed first.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_RECIPE = "torchrun --nproc-per-node 2 -m ffkernels train --distributed data"


class DistributedFFError(RuntimeError):
    """A collective or point-to-point transfer failed: another rank failed, exited, or timed out."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def default_backend(device) -> str:
    """"nccl" for CUDA tensors, "gloo" otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"ffkernels: distributed training needs the environment variable {name}, which torchrun "
                           f"sets for every process; start it with e.g. `{TORCHRUN_RECIPE}`")
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"ffkernels: environment variable {name} must be an integer, got {value!r}") from None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def init_from_env(device: str = "cpu", backend=None, timeout: float = 300.0, threads=None) -> DistContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT).

    ``device`` "cuda" becomes ``cuda:LOCAL_RANK`` (one GPU per process). On the CPU each process gets
    ``threads`` intra-op threads, by default the usable cores divided by the processes on this node
    (LOCAL_WORLD_SIZE): processes that share cores must not each start one thread per core.
    ``timeout`` (seconds) bounds every collective and transfer.
    """
    if not dist.is_available():
        raise RuntimeError("ffkernels: this PyTorch build has no torch.distributed support")
    if dist.is_initialized():
        raise RuntimeError("ffkernels: a default process group is already initialized in this process")
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("ffkernels: device 'cuda' was asked for but no CUDA GPU is available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(threads or max(1, _usable_cpus() // max(1, local_world)))
    backend = backend or default_backend(dev)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout),
                            device_id=dev if backend == "nccl" else None)
    return DistContext(rank, world, local_rank, dev, backend)


def global_rank(group, rank_in_group: int) -> int:
    """The global rank of ``rank_in_group`` (point-to-point calls and ``src``/``dst`` take global ranks)."""
    return rank_in_group if group is None else dist.get_global_rank(group, rank_in_group)


@contextlib.contextmanager
def communication(what: str, group=None):
    """Run torch.distributed calls; a backend failure becomes a DistributedFFError naming this rank and ``what``."""
    try:
        yield
    except DistributedFFError:
        raise
    except RuntimeError as e:  # gloo/NCCL report lost peers and timeouts as RuntimeError (or subclasses)
        raise DistributedFFError(
            f"ffkernels: rank {dist.get_rank(group)} failed while {what}: another rank probably failed, exited or "
            f"hung past the process group's timeout (look for the first error among the ranks). Backend said: "
            f"{e}") from e


def require_initialized(who: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"ffkernels: {who} needs an initialized torch.distributed process group; call "
                           "torch.distributed.init_process_group(...) or ffkernels.distributed.init_from_env() "
                           f"first (e.g. under `{TORCHRUN_RECIPE}`)")
