"""Device selection and DistributedDataParallel set-up (self-launched or under torchrun), the
collectives the trainer uses, and stops every process agrees on."""
from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from utils.errors import ConfigError, Interrupted
from utils.signals import StopSignals


@dataclass
class DistContext:
    """Where this process runs: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def device_ids(spec: str | None) -> list[int] | None:
    """The ``-d`` option as written: ``"0,1,2"`` -> ``[0, 1, 2]``; ``"cpu"``, empty or unset ->
    ``None``. Malformed or repeated ids are a one-line ConfigError (nothing is checked on the machine)."""
    spec = str(spec or "").strip().lower()
    if spec in ("cpu", ""):
        return None
    try:
        ids = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"-d/--device: expected GPU ids like 0,1,2 or 'cpu', got {spec!r}") from None
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise ConfigError(f"-d/--device {spec}: GPU ids must be distinct and >= 0")
    return ids


def parse_devices(spec: str | None) -> list[int] | None:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (each GPU checked to exist); ``"cpu"`` -> ``None`` (CPU);
    unset -> GPU 0 when there is one, else CPU."""
    if spec is None:
        return [0] if torch.cuda.is_available() else None
    ids = device_ids(spec)
    for index in ids or ():
        resolve_device(f"cuda:{index}")   # the one check that the GPU exists
    return ids


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """One device for inference: ``cpu``, ``cuda`` or ``cuda:N`` (default: cuda when available)."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: invalid device {spec!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec}: CUDA is not available on this machine (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ConfigError(f"device: unsupported device {spec!r}; use cpu, cuda or cuda:N")
    return device


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process(devices: list[int] | None, rank: int | None = None, world_size: int | None = None) -> DistContext:
    """Initialise this process: its device and, when distributed, the process group (gloo on CPU,
    NCCL on GPU). Under torchrun the rank comes from the environment; a self-launched worker passes it."""
    if launched_by_torchrun():
        rank, world_size, local_rank = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    else:
        rank, world_size = rank or 0, world_size or 1
        local_rank = rank
    device = torch.device("cpu")
    if devices is not None:
        device = torch.device("cuda", devices[local_rank] if local_rank < len(devices) else local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistContext(rank, world_size, device)


def cleanup() -> None:
    """Destroy the process group once nothing holds it. DistributedDataParallel sits in a reference
    cycle after the run; left to interpreter exit, its gloo work was torn down there and 2 of 52
    2-process CPU runs died with SIGABRT ("terminate called without an active exception")."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes in place (no-op when not distributed)."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj):
    """Rank 0's Python object on every rank (identity when not distributed)."""
    holder = [obj]
    if _distributed():
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_max(value: int, device: torch.device | None = None) -> int:
    """The largest of every process's ``value`` (``value`` itself when not distributed)."""
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_gather_object(obj: Any) -> list:
    """Every process's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not _distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def agreed_signal(stop: StopSignals, device: torch.device | None = None) -> int:
    """The signal that stops the run, agreed by every process (0: none): a process that got no
    signal takes the others' (so every process stops at the same point with the same status)."""
    signum = all_reduce_max(stop.signum or 0, device)
    if signum and not stop.signum:
        stop.signum = signum
    return signum


class AgreedBatches:
    """An evaluation loader whose processes agree before each batch whether a signal arrived
    (:class:`Interrupted` on all of them); a shorter shard polls until the longest one is done,
    so no process waits in a collective that another one left."""

    def __init__(self, loader: Iterable, stop: StopSignals, device: torch.device | None = None):
        self.loader, self.stop, self.device = loader, stop, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        own = len(self.loader)
        most = all_reduce_max(own, self.device)
        batches = iter(self.loader)
        for index in range(most):
            signum = agreed_signal(self.stop, self.device)
            if signum:
                raise Interrupted(signum)
            if index < own:
                yield next(batches)
