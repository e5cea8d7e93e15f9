"""The README's pictures: the expert-load heatmap and the latency distributions of a benchmark run.

Starts a local Ray (metrics export port on loopback) and Serve, deploys the demo app with 2 expert
shards, and runs a serving benchmark: concurrent clients sending streaming completions for a while.
Meanwhile it reads Ray's metrics export once a second (the text Prometheus scrapes) and afterwards
renders, with matplotlib:

  docs/expert-load-heatmap.png     tokens routed to each expert per second, over time (the experts
                                   dashboard's heatmap: ray_moe_expert_tokens_total)
  docs/latency-distribution.png    time to first token, inter-token and end-to-end latency
                                   (ray_moe_*_seconds histograms)

    python scripts/observability_pictures.py [--seconds 60] [--clients 8] [--max-tokens 48] [--out docs]
"""

from __future__ import annotations

import argparse
import itertools
import re
import socket
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

LINE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
LATENCIES = {
    "Time to first token": "ray_moe_time_to_first_token_seconds_bucket",
    "Inter-token latency": "ray_moe_inter_token_latency_seconds_bucket",
    "End-to-end latency": "ray_moe_e2e_request_latency_seconds_bucket",
}
PROMPTS = [
    "The history of the river begins",
    "Once upon a time in a small village",
    "A list of things to pack for a trip:",
    "Mixture of experts models route each token",
]


def totals(text: str, metric: str, by: str) -> dict[str, float]:
    """Sums the samples of `metric` in Prometheus text per value of the label `by`."""
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        found = LINE.match(line)
        if found and found.group(1) == metric:
            labels = dict(LABEL.findall(found.group(2)))
            if by in labels:
                out[labels[by]] += float(found.group(3))
    return dict(out)


def quantile(bounds: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The q-quantile of a histogram with upper `bounds` (finite), interpolating inside a bucket."""
    cumulative = np.cumsum(counts)
    rank = q * cumulative[-1]
    i = int(np.searchsorted(cumulative, rank))
    lower = bounds[i - 1] if i else 0.0
    below = cumulative[i - 1] if i else 0.0
    return float(lower + (bounds[i] - lower) * (rank - below) / max(counts[i], 1))


def render_heatmap(seconds: list[float], per_expert: dict[int, list[float]], path: Path) -> None:
    """per_expert: tokens/s routed to each expert in each interval ending at seconds[i]."""
    experts = sorted(per_expert)
    grid = np.array([per_expert[e] for e in experts])
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(experts) + 1.8))
    edges = np.concatenate([[0.0], seconds])
    mesh = ax.pcolormesh(edges, np.arange(len(experts) + 1) - 0.5, grid, cmap="Oranges", shading="flat")
    ax.set_yticks(range(len(experts)), [str(e) for e in experts], fontsize=7)
    ax.set_xlabel("seconds into the benchmark")
    ax.set_ylabel("expert")
    ax.set_title("Expert load: (token, expert) pairs per second, summed over MoE layers")
    fig.colorbar(mesh, ax=ax, label="tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_latencies(histograms: dict[str, dict[float, float]], path: Path) -> None:
    """histograms: title -> {upper bound (inf last): cumulative count}, as Prometheus buckets are."""
    fig, axes = plt.subplots(1, len(histograms), figsize=(4.2 * len(histograms), 3.6))
    for ax, (title, buckets) in zip(np.atleast_1d(axes), histograms.items(), strict=True):
        bounds = np.array(sorted(buckets))
        counts = np.diff(np.array([buckets[b] for b in bounds]), prepend=0.0)
        finite, tail = bounds[:-1], counts[-1]
        lefts = np.concatenate([[finite[0] / 2], finite[:-1]])
        ax.bar(lefts, counts[:-1], width=finite - lefts, align="edge", color="tab:orange", edgecolor="white")
        ax.set_xscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("observations")
        for q, style in ((0.5, "--"), (0.99, ":")) if counts.sum() else ():
            value = quantile(finite, counts[:-1], q)
            label = f"p{round(q * 100)} {value:.3g}s"
            ax.axvline(value, color="black", linestyle=style, linewidth=1, label=label)
        note = f" ({int(tail)} above {finite[-1]:g}s)" if tail else ""
        ax.set_title(f"{title}{note}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Latency distribution of the benchmark run (engine side, Ray histogram buckets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client(base: str, model: str, max_tokens: int, until: float, counter: itertools.count) -> None:
    import httpx

    with httpx.Client(timeout=120) as http:
        while time.monotonic() < until:
            prompt = PROMPTS[next(counter) % len(PROMPTS)]
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
            with http.stream("POST", f"{base}/v1/completions", json=body) as response:
                for _ in response.iter_lines():
                    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args(argv)

    import httpx
    import ray
    from ray import serve

    from cluster.serve.app import build_app

    metrics_port, http_port = _free_port(), _free_port()
    ray.init(
        num_cpus=6,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        options = {"expert_shards": 2, "router_cpus": 0.5, "expert_cpus": 0.5, "max_model_len": 512}
        serve.run(build_app(options), name="pictures", route_prefix="/pictures")
        base = f"http://127.0.0.1:{http_port}/pictures"
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        started = time.monotonic()
        until, counter = started + args.seconds, itertools.count()
        clients = [
            threading.Thread(target=_client, args=(base, model, args.max_tokens, until, counter))
            for _ in range(args.clients)
        ]
        for thread in clients:
            thread.start()
        samples: list[tuple[float, dict[str, float]]] = []
        text = ""
        while any(thread.is_alive() for thread in clients) or len(samples) < 3:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
            samples.append(
                (time.monotonic() - started, totals(text, "ray_moe_expert_tokens_total", "expert"))
            )
            time.sleep(1.0)
        time.sleep(2.5)  # the last report from the workers
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    finally:
        serve.shutdown()
        ray.shutdown()

    experts = sorted({int(e) for _, seen in samples for e in seen})
    seconds, per_expert = [], {e: [] for e in experts}
    for (t0, before), (t1, after) in itertools.pairwise(samples):
        seconds.append(t1)
        for e in experts:
            per_expert[e].append((after.get(str(e), 0.0) - before.get(str(e), 0.0)) / (t1 - t0))
    args.out.mkdir(parents=True, exist_ok=True)
    render_heatmap(seconds, per_expert, args.out / "expert-load-heatmap.png")
    histograms = {
        title: {float(le): count for le, count in totals(text, metric, "le").items()}
        for title, metric in LATENCIES.items()
    }
    render_latencies(histograms, args.out / "latency-distribution.png")
    requests = next(iter(totals(text, "ray_moe_e2e_request_latency_seconds_count", "model").values()), 0)
    print(f"{int(requests)} requests in {args.seconds:.0f} s; pictures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
