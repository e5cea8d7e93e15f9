"""Serving benchmark: continuous batching against one request at a time, over the OpenAI HTTP API.

Two phases against the same server, with the same prompts, greedy decoding and the same max_tokens:

  A. serial:      1 client, one streaming completion after another
  B. concurrent:  N clients at once, M streaming completions each

For each phase: requests/s, output tokens/s, time to first token (TTFT) and inter-token latency (ITL)
p50/p99, measured on the client with the openai AsyncOpenAI client (streaming, one chunk per token). The
ratio of output tokens/s (B over A) is what continuous batching buys; the target is >= 4x at 16 clients.

By default the benchmark starts its own local Ray and Serve on 127.0.0.1 with the demo model (1 expert shard)
and shuts them down afterwards; `--url` targets a server that is already running instead.

    python -m benchmarks.serving [--clients 16] [--requests 4] [--serial-requests 8] [--max-tokens 64]
                                 [--url http://127.0.0.1:8000] [--model NAME] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.results import BenchmarkRun

TARGET_RATIO = 4.0
PROMPTS = [
    "The history of the river begins",
    "Once upon a time in a small village",
    "A list of things to pack for a trip:",
    "The experiment showed that",
    "In the beginning there was",
    "Dear friend, I am writing to tell you",
    "The recipe calls for three eggs and",
    "Mixture of experts models route each token",
]


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class PhaseResult:
    name: str
    clients: int
    requests: int
    failed: int
    seconds: float
    output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    tokens_per_request: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    errors: list[str]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks, q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def one_request(client, model: str, prompt: str, max_tokens: int) -> RequestResult:
    result = RequestResult(ok=False, start=time.perf_counter())
    last = None
    usage_tokens = None
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            # The server sends one chunk per generated token (possibly with empty text mid-character).
            result.output_tokens += len(chunk.choices)
            if last is None:
                result.ttft = now - result.start
            else:
                result.itls.append(now - last)
            last = now
            result.finish_reason = chunk.choices[0].finish_reason or result.finish_reason
        if usage_tokens is not None:
            result.output_tokens = usage_tokens
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens"
    except Exception as err:
        result.error = f"{type(err).__name__}: {err}"
    result.end = time.perf_counter()
    return result


async def run_phase(
    name: str, url: str, model: str, api_key: str, clients: int, per_client: int, max_tokens: int
) -> PhaseResult:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600) as client:

        async def worker(index: int) -> list[RequestResult]:
            out = []
            for n in range(per_client):
                prompt = PROMPTS[(index * per_client + n) % len(PROMPTS)]
                out.append(await one_request(client, model, prompt, max_tokens))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        seconds = time.perf_counter() - start

    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in good)
    ttfts = [r.ttft for r in good if r.ttft is not None]
    itls = [x for r in good for x in r.itls]

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    return PhaseResult(
        name=name,
        clients=clients,
        requests=len(results),
        failed=len(results) - len(good),
        seconds=seconds,
        output_tokens=tokens,
        requests_per_s=len(good) / seconds,
        output_tokens_per_s=tokens / seconds,
        tokens_per_request=tokens / len(good) if good else 0.0,
        ttft_p50_ms=ms(percentile(ttfts, 50)),
        ttft_p99_ms=ms(percentile(ttfts, 99)),
        itl_p50_ms=ms(percentile(itls, 50)),
        itl_p99_ms=ms(percentile(itls, 99)),
        errors=sorted({r.error for r in results if r.error})[:5],
    )


def format_table(phases: list[PhaseResult]) -> str:
    columns = [
        ("phase", "name", "s"),
        ("clients", "clients", "d"),
        ("requests", "requests", "d"),
        ("failed", "failed", "d"),
        ("wall s", "seconds", ".1f"),
        ("req/s", "requests_per_s", ".2f"),
        ("out tok/s", "output_tokens_per_s", ".1f"),
        ("tok/req", "tokens_per_request", ".1f"),
        ("TTFT p50 ms", "ttft_p50_ms", ".0f"),
        ("TTFT p99 ms", "ttft_p99_ms", ".0f"),
        ("ITL p50 ms", "itl_p50_ms", ".1f"),
        ("ITL p99 ms", "itl_p99_ms", ".1f"),
    ]

    def cell(phase: PhaseResult, attr: str, spec: str) -> str:
        value = getattr(phase, attr)
        return "-" if value is None else format(value, spec)

    rows = [[title for title, _, _ in columns]]
    rows += [[cell(p, attr, spec) for _, attr, spec in columns] for p in phases]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """Ray + Serve on 127.0.0.1 with the real app (cluster.serve.app:build_app), torn down on exit."""

    def __init__(self, options: dict, cpus: int) -> None:
        self.options, self.cpus = options, cpus
        self.url = ""

    def __enter__(self) -> LocalServer:
        import ray
        from ray import serve

        from cluster.serve.app import build_app

        if os.environ.get("RAY_ADDRESS"):
            print(
                "note: RAY_ADDRESS is set; ignoring it, the benchmark starts its own local Ray",
                file=sys.stderr,
            )
        ray.init(address="local", num_cpus=self.cpus, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(self.options), name="bench", route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


async def discover_model(url: str, api_key: str) -> str:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=2, timeout=60) as client:
        models = await client.models.list()
    return models.data[0].id


async def measure(args: argparse.Namespace, url: str) -> tuple[str, list[PhaseResult]]:
    model = args.model or await discover_model(url, args.api_key)
    # Warm-up (first-call costs: connections, allocator, lazy imports) outside the measurements.
    await run_phase("warm-up", url, model, args.api_key, 2, 1, min(args.max_tokens, 8))
    serial = await run_phase("serial", url, model, args.api_key, 1, args.serial_requests, args.max_tokens)
    concurrent = await run_phase(
        "concurrent", url, model, args.api_key, args.clients, args.requests, args.max_tokens
    )
    return model, [serial, concurrent]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="base URL of a running server (without /v1); default: start one here")
    parser.add_argument("--model", help="model name to request (default: the server's first model)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in phase B")
    parser.add_argument("--requests", type=int, default=4, help="requests per client in phase B")
    parser.add_argument("--serial-requests", type=int, default=8, help="requests in phase A (1 client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--expert-shards", type=int, default=1, help="self-started server only")
    parser.add_argument("--model-path", help="model directory for the self-started server (default: demo)")
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    for name in ("clients", "requests", "serial_requests", "max_tokens", "expert_shards"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = BenchmarkRun("serving", args)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    if args.url:
        url, where = args.url.rstrip("/"), f"server at {args.url}"
        model, phases = asyncio.run(measure(args, url))
    else:
        from cluster.demo import demo_model_path

        model_path = Path(args.model_path) if args.model_path else demo_model_path()
        options = {
            "model": str(model_path),
            "expert_shards": args.expert_shards,
            "max_num_seqs": max(64, args.clients),
            "max_model_len": 512,
        }
        cpus = max(os.cpu_count() or 1, 2 + args.expert_shards)
        with LocalServer(options, cpus) as server:
            where = (
                f"self-started Ray Serve at {server.url} ({model_path.name}, {args.expert_shards} shard(s))"
            )
            model, phases = asyncio.run(measure(args, server.url))
    wall = time.perf_counter() - started

    serial, concurrent = phases
    ratio = concurrent.output_tokens_per_s / serial.output_tokens_per_s if serial.output_tokens_per_s else 0.0
    met = ratio >= TARGET_RATIO
    print(f"{where}; model {model!r}; max_tokens {args.max_tokens}, temperature 0, streaming")
    print(format_table(phases))
    print(
        f"continuous batching: {ratio:.2f}x the serial output tokens/s with {concurrent.clients} clients"
        f" (target >= {TARGET_RATIO:.0f}x: {'met' if met else 'MISSED'})"
    )
    for phase in phases:
        for error in phase.errors:
            print(f"{phase.name} error: {error}")
    print(
        f"wall time of the whole run: {wall:.1f} s (load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs)"
    )
    report = {
        "where": where,
        "model": model,
        "max_tokens": args.max_tokens,
        "phases": [asdict(p) for p in phases],
        "ratio_output_tokens_per_s": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "wall_s": wall,
    }
    run.write(report, args.json)
    return 0 if not (serial.failed or concurrent.failed) else 1


if __name__ == "__main__":
    sys.exit(main())
