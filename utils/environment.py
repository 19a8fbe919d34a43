"""The machine a run uses: versions, CPU and GPU facts (the start-up banner, benchmark reports)."""
from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import torch
import torchvision

from utils.malloc import retain_freed_memory


def _cpuinfo_blocks() -> list[dict[str, str]]:
    """The processors of /proc/cpuinfo as ``{field: value}`` (none where it cannot be read)."""
    try:
        chunks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        return []
    blocks = [{key.strip(): value.strip() for key, _, value in (line.partition(":") for line in chunk.splitlines())}
              for chunk in chunks]
    return [block for block in blocks if block.get("processor", "").isdigit()]


def available_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores() -> int | None:
    """Physical cores among the CPUs this process may run on (None when /proc/cpuinfo says nothing)."""
    cpus = available_cpus()
    return len({(block.get("physical id", "0"), block.get("core id", block["processor"]))
                for block in _cpuinfo_blocks() if int(block["processor"]) in cpus}) or None


def default_threads() -> int:
    """The machine's cores available to this process (physical cores when known)."""
    return physical_cores() or len(available_cpus()) or 1


def environment(device: torch.device) -> dict:
    """Versions, CPU facts and (on CUDA) the GPU's properties, as a JSON-able dict."""
    first = (_cpuinfo_blocks() or [{}])[0]
    flags = set(first.get("flags", "").split())
    cpu = {"model": first.get("model name") or platform.processor() or platform.machine(),
           **{flag: flag in flags for flag in ("avx512_bf16", "amx_bf16", "avx512f")},
           "logical_cpus": os.cpu_count(), "available_cpus": len(available_cpus()), "physical_cores": physical_cores()}
    env = {"host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torchvision": torchvision.__version__, "cpu": cpu,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "mkldnn": torch.backends.mkldnn.is_available(), "threads": torch.get_num_threads(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "malloc_tuning": retain_freed_memory(), "gpu": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_bytes": props.total_memory, "count": torch.cuda.device_count(),
                      "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                      "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                      "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                      "cudnn_benchmark": torch.backends.cudnn.benchmark}
    return env


def banner(device: torch.device, world_size: int = 1) -> str:
    """One line for a run's start-up banner: versions, devices, processes, allocator tuning."""
    if device.type == "cuda":
        devices = f"{world_size} x {torch.cuda.get_device_name(device)}"
    else:
        devices = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    malloc = "freed memory retained" if retain_freed_memory() else "default"
    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}; "
            f"devices: {devices}; processes: {world_size}; malloc: {malloc}")
