"""16 concurrent schema-constrained streams against the same load unconstrained, side by side.

Both phases run on one server (local Ray + Serve, the demo model, 1 expert shard), the same prompts and
max_tokens; the constrained phase asks for a JSON array of 400 digits, so that every stream runs to
max_tokens like the free one (ignore_eos). Rounds alternate the two phases; output tokens/s per phase and
their ratio (target >= 0.8) go to benchmarks/results/structured-<UTC time>.json (benchmarks/results.py).

    PYTHONPATH=. python -m benchmarks.structured [--clients 16] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.results import BenchmarkRun
from benchmarks.serving import PROMPTS, LocalServer, discover_model

TARGET_RATIO = 0.8
SCHEMA = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 400,
    "maxItems": 400,
}


async def one_stream(client, model: str, prompt: str, max_tokens: int, constrained: bool) -> tuple[int, str]:
    extra: dict = {"ignore_eos": True}
    fields: dict = {}
    if constrained:
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "digits", "schema": SCHEMA},
        }
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=1.0,
        seed=len(prompt),
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
        **fields,
    )
    text, tokens = "", 0
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
    return tokens, text


async def phase(url: str, model: str, clients: int, max_tokens: int, constrained: bool) -> dict:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                one_stream(client, model, PROMPTS[i % len(PROMPTS)], max_tokens, constrained)
                for i in range(clients)
            )
        )
        elapsed = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    if constrained:  # every output is a prefix of the digit array: "[d,d,d,..."
        bad = [text for _, text in results if not _digit_array_prefix(text)]
        assert not bad, f"constrained output off the schema: {bad[:2]}"
    return {
        "constrained": constrained,
        "seconds": elapsed,
        "output_tokens": tokens,
        "tokens_per_s": tokens / elapsed,
    }


def _digit_array_prefix(text: str) -> bool:
    body = text[1:]
    return text.startswith("[") and all(c.isdigit() for c in body[0::2]) and set(body[1::2]) <= {","}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from cluster.demo import demo_model_path

    run = BenchmarkRun("structured", args)
    options = {"model": str(demo_model_path()), "expert_shards": 1, "max_num_seqs": 32, "max_model_len": 512}
    with LocalServer(options, cpus=4) as server:
        model = asyncio.run(discover_model(server.url, "unused"))
        asyncio.run(phase(server.url, model, args.clients, 8, True))  # warm-up: compiles the schema once
        asyncio.run(phase(server.url, model, args.clients, 8, False))
        rounds = []
        for _ in range(args.rounds):
            free = asyncio.run(phase(server.url, model, args.clients, args.max_tokens, False))
            constrained = asyncio.run(phase(server.url, model, args.clients, args.max_tokens, True))
            rounds.append(
                {
                    "free": free,
                    "constrained": constrained,
                    "ratio": constrained["tokens_per_s"] / free["tokens_per_s"],
                }
            )
            free_rate, constrained_rate = free["tokens_per_s"], constrained["tokens_per_s"]
            print(f"free {free_rate:.1f} tok/s, constrained {constrained_rate:.1f} tok/s", flush=True)
    ratios = [r["ratio"] for r in rounds]
    out = {
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "schema": SCHEMA,
        "rounds": rounds,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "target": TARGET_RATIO,
        "target_met": statistics.median(ratios) >= TARGET_RATIO,
    }
    print(
        f"constrained / free output tokens/s: median {out['ratio_median']:.3f} "
        f"(min {out['ratio_min']:.3f}, max {out['ratio_max']:.3f}); target >= {TARGET_RATIO}"
    )
    run.write(out)


if __name__ == "__main__":
    main()
