"""What the metrics cost: the engine with metrics on and off, same prompts, one run.

One checkpoint (the engine benchmark's shape: 8 layers, 64 experts, top-4), two measurements:

- engines: two Engines (router actor + expert actors), one with `metrics=False` (no Ray metrics, no
  phase timing, no per-expert counts), one with the default `metrics=True` (and, optionally,
  `--expert-layer-metrics`), taking turns on the same batch;
- router loop: the router's EngineCore in this process (experts in-process too, no transport), driven
  the way the engine loop drives it, with and without EngineMetrics recording to Ray: the hot-path
  cost alone, without the noise of several processes sharing the cores.

The modes take turns on the same token-id prompts, greedy, EOS ignored, in ABBA order so that drift
in the machine's load hits both. The measure is tokens per CPU second of the processes doing the work
(this one; the router and expert actors): on a machine shared with other jobs wall time swings by 2x
from turn to turn, CPU time much less. Wall-clock tokens/s are reported too. The ratio of the medians
is the overhead. Target: metrics on at most 3% slower.

    python -m benchmarks.metrics_overhead [--prompts 16] [--new-tokens 64] [--rounds 6] [--shards 1]
                                          [--expert-layer-metrics] [--skip-engines] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch

from benchmarks.engine_vs_transformers import BENCH_CONFIG, FIRST_PLAIN_ID
from benchmarks.results import BenchmarkRun
from cluster.demo import write_afmoe_checkpoint
from cluster.engine import Engine
from cluster.metrics.engine import EngineMetrics
from router.engine_core import EngineCore
from router.sampling import SamplingParams
from tests.toolkit import local_core

TARGET_MAX_SLOWDOWN = 0.03
RECORDING: list[tuple[float, float]] = []  # (seconds in EngineMetrics.step_done, batch wall seconds)


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 96, (count,), generator=generator).tolist()
    return [torch.randint(FIRST_PLAIN_ID, vocab, (n,), generator=generator).tolist() for n in lengths]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of local processes so far (Linux /proc)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def timed(engine: Engine, batch: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(Output tokens per CPU second of the router and expert actors, per wall second) of one batch."""
    info = engine.info()
    pids = [info["pid"], *(e["pid"] for e in info["experts"])]
    cpu, started = cpu_seconds(pids), time.perf_counter()
    out = engine.generate(batch, max_new_tokens=new_tokens, ignore_eos=True)
    wall, cpu = time.perf_counter() - started, cpu_seconds(pids) - cpu
    assert all(len(c.token_ids) == new_tokens for c in out)
    return len(batch) * new_tokens / cpu, len(batch) * new_tokens / wall


def loop_tokens_per_s(
    core: EngineCore, metrics: EngineMetrics | None, batch: list[list[int]], new: int
) -> tuple[float, float]:
    """One batch through the core as EngineLoop drives it (arrivals, steps, step reports, idle);
    (tokens per CPU second of this process, per wall second). Adds the wall time spent in the
    EngineMetrics calls themselves to RECORDING."""
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    cpu, started = time.process_time(), time.perf_counter()
    recording = 0.0
    for i, prompt in enumerate(batch):
        if metrics is not None:
            metrics.request_arrived(f"r{i}", len(prompt))
        core.add_request(prompt, params, request_id=f"r{i}")
    while core.has_work():
        step_started = time.perf_counter()
        events = core.step()
        if metrics is not None:
            before = time.perf_counter()
            metrics.step_done(events, step_started)
            recording += time.perf_counter() - before
    if metrics is not None:
        metrics.idle()
        RECORDING.append((recording, time.perf_counter() - started))
    tokens = len(batch) * new
    return tokens / (time.process_time() - cpu), tokens / (time.perf_counter() - started)


def alternate(rounds: int, run: dict[str, Callable[[], tuple[float, float]]]) -> dict[str, list]:
    """Each mode's (tokens per CPU second, tokens per second) per round, in ABBA order."""
    rates: dict[str, list] = {mode: [] for mode in run}
    for turn in range(rounds):
        order = ("off", "on") if turn % 2 == 0 else ("on", "off")
        for mode in order:
            rates[mode].append(run[mode]())
            per_cpu, per_wall = rates[mode][-1]
            print(
                f"round {turn + 1} {mode:>3}: {per_cpu:8.1f} tokens/CPU-s {per_wall:8.1f} tokens/s",
                flush=True,
            )
    return rates


def summary(name: str, rates: dict[str, list]) -> dict:
    out: dict = {}
    for index, unit in enumerate(("tokens_per_cpu_s", "tokens_per_s")):
        off = statistics.median(r[index] for r in rates["off"])
        on = statistics.median(r[index] for r in rates["on"])
        pairs = [b[index] / a[index] for a, b in zip(rates["off"], rates["on"], strict=True)]
        out[unit] = {
            "off": [r[index] for r in rates["off"]],
            "on": [r[index] for r in rates["on"]],
            "ratio_on_over_off": on / off,
            "per_round_ratio": [min(pairs), max(pairs)],
        }
        print(
            f"{name}, {unit}: metrics off {off:.1f}, on {on:.1f}: on/off = {on / off:.3f} "
            f"(per round {min(pairs):.3f}..{max(pairs):.3f}); target >= {1 - TARGET_MAX_SLOWDOWN:.2f}",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="turns per engine (even: ABBA order)")
    parser.add_argument("--shards", type=int, default=1, help="expert actors per engine")
    parser.add_argument("--expert-layer-metrics", action="store_true", help="also per (layer, expert)")
    parser.add_argument("--skip-engines", action="store_true", help="only the in-process router loop")
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    run = BenchmarkRun("metrics_overhead", args)

    ray.init(num_cpus=2 * (1 + args.shards), include_dashboard=False, log_to_driver=False)
    result: dict = {"prompts": args.prompts, "new_tokens": args.new_tokens, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_afmoe_checkpoint(Path(tmp) / "model", BENCH_CONFIG, seed=3)
        batch = prompts(args.prompts, json.loads((model / "config.json").read_text())["vocab_size"])
        torch.set_num_threads(1)  # as the router actor runs (limit_threads)
        plain, core = (
            local_core(
                model,
                args.shards,
                args.prompts,
                max_model_len=512,
                max_num_batched_tokens=2048,
                max_waiting=1024,
                profile=profile,
            )
            for profile in (False, True)
        )
        metrics = EngineMetrics(
            core, "bench", "in-process", lambda: True, lambda: 0, args.expert_layer_metrics
        )
        loop_tokens_per_s(plain, None, batch[:4], 8)  # warm-up
        loop_tokens_per_s(core, metrics, batch[:4], 8)
        print("router loop in this process:", flush=True)
        rates = alternate(
            args.rounds,
            {
                "off": lambda: loop_tokens_per_s(plain, None, batch, args.new_tokens),
                "on": lambda: loop_tokens_per_s(core, metrics, batch, args.new_tokens),
            },
        )
        result["router_loop"] = summary("router loop", rates)
        share = sum(r for r, _ in RECORDING[1:]) / sum(w for _, w in RECORDING[1:])
        result["router_loop"]["step_done_share_of_wall"] = share
        print(f"router loop: EngineMetrics.step_done takes {share:.2%} of the wall time", flush=True)
        if not args.skip_engines:
            common = {"expert_shards": args.shards, "max_num_seqs": args.prompts, "max_model_len": 512}
            engines = {
                "off": Engine(model, metrics=False, **common),
                "on": Engine(model, metrics=True, expert_layer_metrics=args.expert_layer_metrics, **common),
            }
            try:
                for engine in engines.values():
                    timed(engine, batch[:4], 8)  # warm-up
                print(f"engines ({args.shards} expert actor(s) each):", flush=True)
                rates = alternate(
                    args.rounds,
                    {
                        mode: (lambda e=engine: timed(e, batch, args.new_tokens))
                        for mode, engine in engines.items()
                    },
                )
                result["engines"] = summary("engines", rates)
            finally:
                for engine in engines.values():
                    engine.shutdown()
    ray.shutdown()
    run.write(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
