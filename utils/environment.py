"""The machine a run uses: versions, CPU and GPU facts (the start-up banner, benchmark reports)."""
from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import torch


def _cpuinfo_blocks() -> list[dict[str, str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    blocks = []
    for chunk in text.split("\n\n"):
        fields = {}
        for line in chunk.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "processor" in fields:
            blocks.append(fields)
    return blocks


def available_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores() -> int | None:
    """Physical cores among the CPUs this process may run on (None when /proc/cpuinfo says nothing)."""
    cpus, cores = available_cpus(), set()
    for block in _cpuinfo_blocks():
        try:
            processor = int(block["processor"])
        except ValueError:
            continue
        if processor in cpus:
            cores.add((block.get("physical id", "0"), block.get("core id", str(processor))))
    return len(cores) or None


def default_threads() -> int:
    """The machine's cores available to this process (physical cores when known)."""
    return physical_cores() or len(available_cpus()) or 1


def cpu_info() -> dict:
    blocks = _cpuinfo_blocks()
    first = blocks[0] if blocks else {}
    flags = set(first.get("flags", "").split())
    return {"model": first.get("model name") or platform.processor() or platform.machine(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512f": "avx512f" in flags, "logical_cpus": os.cpu_count(),
            "available_cpus": len(available_cpus()), "physical_cores": physical_cores()}


def environment(device: torch.device) -> dict:
    """Versions, CPU facts and (on CUDA) the GPU's properties, as a JSON-able dict."""
    import torchvision

    from utils.malloc import retain_freed_memory
    env = {"host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torchvision": torchvision.__version__, "cpu": cpu_info(),
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
    import torchvision

    from utils.malloc import retain_freed_memory
    if device.type == "cuda":
        devices = f"{world_size} x {torch.cuda.get_device_name(device)}"
    else:
        devices = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    malloc = "freed memory retained" if retain_freed_memory() else "default"
    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}; "
            f"devices: {devices}; processes: {world_size}; malloc: {malloc}")
