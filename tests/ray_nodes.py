"""A real multi-node Ray cluster on one machine: a head and worker nodes, each its own `ray start --block`.

Every node runs in a process group of its own (its raylet, agents and the workers it spawned), so a
node is lost the way a machine is: SIGKILL to that whole group, and to any descendant of its
`ray start` outside the group, at once. The cluster is independent of
the session cluster of tests/conftest.py: nothing here calls ray.init, and drivers that need one run as
subprocesses with RAY_ADDRESS set to this cluster. Token authentication stays on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

RAY = Path(sys.executable).with_name("ray")
# The GCS declares a silent node dead after period x threshold; Ray's default (3 s x 5) makes tests slow.
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
OBJECT_STORE_BYTES = 256 << 20
_LIST_NODES = """
import json, sys
from ray.util.state import list_nodes
alive = [("state", "=", "ALIVE")]
nodes = list_nodes(address=sys.argv[1], filters=alive, timeout=10, raise_on_missing_output=False)
print(json.dumps([{"node_id": n.node_id, "resources_total": n.resources_total} for n in nodes]))
"""


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports (asked for together, so the OS does not hand one out twice)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    resources: dict[str, float]

    def processes(self) -> list[int]:
        """Its raylet, agents and workers: `ray start` and every process descended from it."""
        parents = _parents()
        ours, grew = {self.process.pid}, True
        while grew:
            more = {pid for pid, ppid in parents.items() if ppid in ours} - ours
            ours |= more
            grew = bool(more)
        return sorted(ours)

    @property
    def pgid(self) -> int:
        return self.process.pid


class RayNodes:
    """`with RayNodes() as nodes: nodes.add_worker(...)`; `nodes.env` is what a driver process needs."""

    def __init__(self, head_cpus: int = 0) -> None:
        # short: Ray's socket paths must fit in 107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="moen", dir="/tmp")
        base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self._node_env = base | {"RAY_AUTH_MODE": "token"} | FAST_FAILURE_DETECTION
        gcs_port, dashboard_port = _free_ports(2)
        self.address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.env = base | {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": self.address}
        self.nodes: list[Node] = []
        head = ["--head", "--port", str(gcs_port), "--dashboard-port", str(dashboard_port)]
        head += ["--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", self.temp_dir]
        head += ["--ray-client-server-port", str(free_port())]
        try:
            self._start("head", head, head_cpus, {})
        except BaseException:
            self.stop()
            raise

    def add_worker(self, name: str, cpus: int, resources: dict[str, float] | None = None) -> Node:
        return self._start(name, ["--address", self.address], cpus, resources or {})

    def _start(self, name: str, role: list[str], cpus: int, resources: dict[str, float]) -> Node:
        ports = _free_ports(6)
        flags = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", "0"]
        flags += ["--object-store-memory", str(OBJECT_STORE_BYTES)]
        flags += ["--resources", json.dumps({"moe_node_" + name: 1, **resources})]
        for flag, port in zip(
            ("--node-manager-port", "--object-manager-port", "--metrics-export-port"), ports, strict=False
        ):
            flags += [flag, str(port)]
        flags += [
            "--dashboard-agent-listen-port",
            str(ports[3]),
            "--dashboard-agent-grpc-port",
            str(ports[4]),
        ]
        flags += ["--runtime-env-agent-port", str(ports[5])]
        flags += ["--min-worker-port", str(20000 + 1000 * len(self.nodes))]
        flags += ["--max-worker-port", str(20999 + 1000 * len(self.nodes))]
        process = subprocess.Popen(
            [str(RAY), "start", "--block", "--disable-usage-stats", *role, *flags],
            env=self._node_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        node = Node(name, process, {"CPU": cpus, "moe_node_" + name: 1, **resources})
        self.nodes.append(node)
        self.wait_for_nodes(len(self.nodes))
        return node

    def alive_nodes(self) -> list[dict]:
        """The ALIVE nodes as the state API reports them; [] while the dashboard is not up.

        Asked from a subprocess: this process may have imported Ray before token auth was switched on.
        """
        out = subprocess.run(
            [sys.executable, "-c", _LIST_NODES, self.dashboard_url],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(n.process.poll() is not None for n in self.nodes):
                raise RuntimeError(f"a ray start exited: {[n.name for n in self.nodes if n.process.poll()]}")
            if len(self.alive_nodes()) == count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{count} Ray nodes did not come up in {timeout} s: {self.alive_nodes()}")

    def node_id(self, name: str) -> str:
        [node] = [n for n in self.alive_nodes() if f"moe_node_{name}" in n["resources_total"]]
        return node["node_id"]

    def kill(self, name: str) -> tuple[float, list[int]]:
        """Loses a node: SIGKILL to its process group, and to any process of it outside the group.

        Returns when (monotonic) and the pids killed."""
        [node] = [n for n in self.nodes if n.name == name]
        pids = node.processes()
        os.killpg(node.pgid, signal.SIGKILL)
        at = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait(timeout=30)
        self.nodes.remove(node)
        return at, pids

    def stop(self) -> None:
        """Stops every node: its process group, its descendants, anything still naming the temp dir."""
        descendants = [pid for node in self.nodes for pid in node.processes()]
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while any(n.process.poll() is None for n in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pgid, signal.SIGKILL)
        for pid in {*descendants, *pids_naming(self.temp_dir)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc/PID/stat; the command may contain spaces)."""
    out = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def pids_naming(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
