"""The dashboards and alert rules against the real thing: Ray's metrics agent scraped by Prometheus.

The session's Ray cluster exports metrics on its metrics export port; a Prometheus (Debian's package,
installed by .ci/run) scrapes it every second on loopback, labelling the target with `ray_io_cluster`
as KubeRay's PodMonitor does. After traffic through the demo app, every query of every panel of the
committed dashboards must return at least one series.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from cluster.cli.dashboards import dashboards
from tests.conftest import deploy_app, free_port
from tests.toolkit import wait_for

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = "moe-test"
RATE_INTERVAL = "5m"
APP = "metrics"
# Panels allowed to return nothing here, with the reason (an event this test does not cause).
EXCEPTIONS: dict[str, str] = {}


def tool(name: str) -> str:
    """Debian's prometheus package puts both binaries in /usr/bin; CI must have them."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs Debian's prometheus package)")
        pytest.skip(f"{name} is not installed: apt-get install prometheus")
    return path


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, PromQL with the dashboard variables filled in) of every target."""
    out = []
    for dashboard in dashboards().values():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$Cluster", CLUSTER).replace("$__rate_interval", RATE_INTERVAL)
                assert "$" not in expr.replace("$1", ""), f"unhandled variable in {expr}"
                out.append((dashboard["title"], panel["title"], expr))
    return out


def test_alert_rules_pass_their_promtool_unit_tests():
    promtool = tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", "alerts.yaml"], cwd=ROOT / "dashboards", capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"],
        cwd=ROOT / "dashboards",
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tests = yaml.safe_load((ROOT / "dashboards" / "alerts_test.yaml").read_text())["tests"]
    rules = yaml.safe_load((ROOT / "dashboards" / "alerts.yaml").read_text())["groups"][0]["rules"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == {rule["alert"] for rule in rules}, "every alert needs a test in which it fires"


@pytest.fixture(scope="module")
def prometheus(metrics_export_port, tmp_path_factory) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 scraping the Ray node's metrics export port, with the alert rules."""
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        # The shared test cluster's export grows with every engine the session has run (11.5 MB, 81
        # series per metric, in one CI run), and one scrape of it took over 1 s on a slower host.
        "global": {"scrape_interval": "5s", "scrape_timeout": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(ROOT / "dashboards" / "alerts.yaml")],
        "scrape_configs": [
            {
                "job_name": "ray",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{metrics_export_port}"], "labels": {"ray_io_cluster": CLUSTER}}
                ],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        up = wait_for(lambda: process.poll() is not None or _ready(url), 60, interval=0.5)
        if not up or process.poll() is not None:
            pytest.fail(f"prometheus did not start: {(work / 'prometheus.log').read_text()[-2000:]}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    assert body.get("status") == "success", f"{expr}: {body}"
    return body["data"]["result"]


def scrape_report(prometheus: str, metrics_export_port: int) -> str:
    """For a failure message: Prometheus's view of its target, and how many series of each moe metric
    the Ray metrics agent exports right now (which tells a scrape that failed from a series never set)."""
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=30).json()["data"]["activeTargets"]
    health = [
        {k: t.get(k) for k in ("health", "lastError", "lastScrapeDuration", "lastScrape")} for t in targets
    ]
    exported = httpx.get(f"http://127.0.0.1:{metrics_export_port}/metrics", timeout=30).text
    series = Counter(
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in exported.splitlines()
        if line.startswith(("ray_moe_", "ray_serve_num_ongoing"))
    )
    return (
        f"targets: {health}\nexported ({len(exported)} bytes), series per metric: {dict(series)}\n"
        f"metric export problems in the session's logs: {export_problems()}"
    )


def export_problems() -> dict[str, list[str]]:
    """The lines of the session's Ray logs where a process failed to hand its metrics to the agent, or the
    agent failed to take one (the last few per file)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    marks = ("Failed to export", "Collect took longer", "skipping it")
    found: dict[str, list[str]] = {}
    for path in sorted(logs.glob("*")):
        if path.is_file() and path.suffix in (".out", ".err", ".log"):
            lines = [
                line
                for line in path.read_text(errors="replace").splitlines()
                if any(m in line for m in marks)
            ]
            if lines:
                found[path.name] = lines[-3:]
    return found


def send_traffic(base: str, model: str) -> None:
    """Completions and chats, streamed and not, concurrent (batches > 1), a prompt sent twice (prefix
    cache hits), plus a 400 and a 404."""
    prompts = ["The experts", "Once upon a time", "A list of things", "Mixture of experts route"]

    def complete(i: int) -> int:
        body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": 12 + i % 5}
        url = f"{base}/v1/completions"
        if i % 2:
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as response:
                for _ in response.iter_lines():
                    pass
                return response.status_code
        return httpx.post(url, json=body, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(complete, range(16)))
    assert statuses == [200] * 16
    shared = {"model": model, "prompt": "The harbour town woke slowly. " * 8, "max_tokens": 4}
    for _ in range(2):  # one after the other: the second finds the first's prompt in the prefix cache
        assert httpx.post(f"{base}/v1/completions", json=shared, timeout=120).status_code == 200
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    assert httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120).status_code == 200
    bad = {"model": model, "prompt": "x", "max_tokens": -1}
    assert httpx.post(f"{base}/v1/completions", json=bad, timeout=60).status_code == 400
    wrong = {"model": "no-such-model", "prompt": "x", "max_tokens": 4}
    assert httpx.post(f"{base}/v1/completions", json=wrong, timeout=60).status_code == 404


@pytest.mark.slow
def test_every_panel_query_returns_series_after_traffic(
    prometheus, serve_http, demo_model, metrics_export_port
):
    """Queries run from before the deployment on: Ray 2.60 drops a gauge that nobody set for two
    report intervals (Serve's own gauges included), so some series exist only for a while after the
    events that set them; a query passes once it has returned a series."""
    options = {
        "model": str(demo_model),
        "expert_shards": 2,
        "redundant_experts": 2,  # and rebalancing every second: the rebalancing panels get series
        "eplb_interval_s": 1.0,
        "router_cpus": 0.5,
        "expert_cpus": 0.5,
        "max_model_len": 256,
        "max_num_seqs": 16,
    }
    queries = panel_queries()
    seen: set[str] = set()

    def poll() -> None:
        for *_, expr in queries:
            if expr not in seen and query(prometheus, expr):
                seen.add(expr)

    base = f"{serve_http}/{APP}"

    def deploy_and_send() -> str:
        deploy_app(APP, options)
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        send_traffic(base, model)
        return model

    def keep_one_stream_open(model: str, stop: threading.Event) -> int:
        """Streams one after the other until `stop`: Serve's ongoing-request gauges are set only while
        requests are in flight. Returns how many it sent (all 200)."""
        body = {"model": model, "prompt": "The experts", "max_tokens": 16, "stream": True}
        sent = 0
        while not stop.is_set():
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
                for _ in response.iter_lines():
                    pass
            assert response.status_code == 200
            sent += 1
        return sent

    by_status = f'sum by (status) (ray_moe_requests_total{{ray_io_cluster="{CLUSTER}"}})'

    def counts_by_status() -> dict[str, float]:
        return {s["metric"]["status"]: float(s["value"][1]) for s in query(prometheus, by_status)}

    wait_for(lambda: query(prometheus, "up == 1"), 60, interval=1)  # first scrape done
    before = counts_by_status()  # earlier tests of the session served through this cluster too
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        traffic = pool.submit(deploy_and_send)
        try:
            while not traffic.done():  # queries run while the traffic does, once a second
                poll()
                concurrent.futures.wait([traffic], timeout=1)
            stop = threading.Event()
            streams = pool.submit(keep_one_stream_open, traffic.result(), stop)

            def all_seen() -> bool:
                poll()
                return len(seen) == len(queries)

            try:
                wait_for(all_seen, 120, interval=2)
            finally:
                stop.set()
            kept_open = streams.result()
            missing = [(d, p, e) for d, p, e in queries if e not in seen and p not in EXCEPTIONS]
            listed = "\n".join(f"{d} / {p}: {e}" for d, p, e in missing)
            report = scrape_report(prometheus, metrics_export_port) if missing else ""
            assert not missing, f"queries without a series:\n{listed}\n{report}"
            now_empty = [p for _, p, e in queries if not query(prometheus, e)]
            print(f"panels whose series Ray had dropped again by the end: {sorted(set(now_empty))}")

            expected = {k: v for k, v in before.items() if v}
            for status, sent in {"200": 19.0 + kept_open, "400": 1.0, "404": 1.0}.items():
                expected[status] = expected.get(status, 0.0) + sent
            wait_for(lambda: counts_by_status() == expected, 60, interval=2)  # Ray reports every 10 s
            assert counts_by_status() == expected
            clusters = httpx.get(
                f"{prometheus}/api/v1/label/ray_io_cluster/values",
                params={"match[]": "ray_node_network_receive_speed"},
                timeout=30,
            ).json()["data"]
            assert clusters == [CLUSTER]  # what the dashboards' Cluster variable lists
            groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            alerts = yaml.safe_load((ROOT / "dashboards" / "alerts.yaml").read_text())
            expected = len(alerts["groups"][0]["rules"])
            healthy = all(r["health"] == "ok" for r in rules)
            assert len(rules) == expected and healthy, json.dumps(rules)[:2000]
        finally:
            concurrent.futures.wait([traffic])
            serve.delete(APP)
