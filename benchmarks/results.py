"""Where every benchmark's numbers go: one JSON file per run under benchmarks/results/.

Each file holds the benchmark's own results and what is needed to judge them: the date, the load
average when the run began and when it ended (the machine is shared), the machine, the commit and the
arguments. Commit the file; the README's numbers name it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The hardware and software the numbers were measured on."""
    import torch

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=RESULTS_DIR.parent, timeout=9
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _commit() -> str | None:
    """HEAD, with "+changes" when the work tree differs from it (outside benchmarks/results/)."""
    head = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--", ":/", ":(top,exclude)benchmarks/results")
    return f"{head}+changes" if head and changed else head


def results_path(name: str, when: datetime.datetime | None = None) -> Path:
    """results/<name>-<UTC time, to the second>.json: where a run of benchmark `name` goes by default."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    when = when or datetime.datetime.now(datetime.UTC)
    return RESULTS_DIR / f"{name}-{when:%Y%m%dT%H%M%SZ}.json"


class BenchmarkRun:
    """Started when the benchmark starts (the load average then), written when it ends."""

    def __init__(self, name: str, args: object = None) -> None:
        self.name = name
        self.args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} if args else {}
        self.started = datetime.datetime.now(datetime.UTC)
        self.load_before = os.getloadavg()

    def write(self, results: object, path: Path | None = None) -> Path:
        """Writes results/<name>-<UTC time>.json (or `path`); returns where it went."""
        path = path or results_path(self.name, self.started)
        record = {
            "benchmark": self.name,
            "date": self.started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg_before": self.load_before,
            "loadavg_after": os.getloadavg(),
            "machine": machine(),
            "commit": _commit(),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "args": self.args,
            "results": results,
        }
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"results written to {path}")
        return path
