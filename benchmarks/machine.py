"""What the benchmarks measure about the machine they run on, in the same run: memory read bandwidth,
and a record of the machine and its load for each JSON result."""

from __future__ import annotations

import datetime
import os
import platform
import time

import torch


def read_bandwidth(threads: int = 1, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s that `threads` threads read from DRAM (best of `repeats` sums over a buffer no cache holds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - started)
        return buffer.numel() * 4 / best
    finally:
        torch.set_num_threads(before)


def machine_record() -> dict:
    """Date, load average, CPU model and flags that matter here, torch version."""
    flags = ""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "cpu": model,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
