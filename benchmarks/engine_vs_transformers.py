"""Tokens/s of transformers `generate` against the engine, side by side in one run.

One random AFMoE checkpoint (small, but big enough that expert compute matters), greedy decoding of a
fixed number of new tokens (EOS ignored on both sides), for every combination of: dtype (fp32, bf16;
transformers in the same dtype), prompts in one batch (1, 8, 16, 64; 8 tokens is where steps start to
split), and engine (1 and 2 expert actors, two-batch overlap on and off, plus the same engine core with
every expert in this process, one thread, as a no-transport reference). Per row: tokens/s and ratios,
the router's step time split into exchange wait and the rest, the per-step overhead outside the model
forward, the share of the step the busiest expert actor spent computing, and a roofline column: tokens/s
against the bound set by the weight bytes a decode step touches over the memory read bandwidth measured in
this run.

    python -m benchmarks.engine_vs_transformers [--prompts 1,8,16,64] [--new-tokens 32] [--json PATH]

The transport is a parameter (--transport, when the engine has that option: auto|shm|gloo), and so are the
router actor's CPUs, its torch threads (--router-cpus 1,2; 1 unless given).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from benchmarks.engine_rows import format_table, roofline_tokens_per_s, table_rows, verdicts
from benchmarks.machine import machine_record, read_bandwidth
from benchmarks.results import results_path
from cluster.demo import write_afmoe_checkpoint
from cluster.engine import Engine
from cluster.options.engine import EngineOptions
from router.sampling import SamplingParams
from router.step_stats import StepTotals
from tests.toolkit import local_core

BENCH_CONFIG: dict = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 8,
    "num_dense_layers": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 64,
    "num_experts_per_tok": 4,
    "num_shared_experts": 1,
    "sliding_window": 128,
    "global_attn_every_n_layers": 4,
}
FIRST_PLAIN_ID = 5  # ids 0..4 are the demo tokenizer's special tokens
TORCH_THREADS = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Result:
    name: str
    dtype: str
    prompts: int
    seconds: float
    outputs: list[list[int]]
    stats: dict = field(default_factory=dict)

    def tokens_per_s(self) -> float:
        return sum(len(o) for o in self.outputs) / self.seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="1,8,16,64", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--shards", default="1,2", help="comma-separated expert actor counts")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--overlap", default="on,off", help="two-batch overlap settings to run")
    parser.add_argument("--transport", default=None, help="engine transport option, where it exists")
    parser.add_argument(
        "--router-cpus",
        default="1",
        help="comma-separated CPUs (torch threads) for the router actor; each expert actor has 1",
    )
    parser.add_argument("--min-len", type=int, default=8, help="shortest prompt, in tokens")
    parser.add_argument("--max-len", type=int, default=64, help="longest prompt, in tokens")
    parser.add_argument(
        "--hf-experts",
        default="eager",
        help="transformers experts_implementation (eager: its fastest on CPU, so the fair baseline)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the checkpoint and the prompts")
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    args.prompts = [int(n) for n in args.prompts.split(",")]
    args.shards = [int(n) for n in args.shards.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.overlap = [o == "on" for o in args.overlap.split(",")]
    args.router_cpus = [int(n) for n in args.router_cpus.split(",")]
    if min(args.prompts + args.shards + args.router_cpus) < 1 or not set(args.dtypes) <= set(DTYPES):
        parser.error("need positive --prompts, --shards, --router-cpus and dtypes among " + ",".join(DTYPES))
    return args


def make_prompts(count: int, vocab_size: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """`count` prompts of random lengths in [min_len, max_len], ids outside the special tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen).tolist()
    return [torch.randint(FIRST_PLAIN_ID, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.int64)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.int64)
    return ids, mask


def hf_generate(model: transformers.AfmoeForCausalLM, prompts: list[list[int]], new_tokens: int) -> list:
    """Greedy, `new_tokens` per prompt; run_transformers clears the model's EOS ids, so that EOS neither stops
    nor is suppressed, as with the engine's ignore_eos (eos_token_id=None here would fall back to them)."""
    pad_id = model.config.pad_token_id
    ids, mask = left_pad(prompts, pad_id)
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, ids.shape[1] :].tolist()


def mismatch(reference: list[list[int]], other: list[list[int]]) -> str:
    """'' if identical, else how many sequences differ and where the first one does."""
    diffs = [
        (i, next((j for j, (a, b) in enumerate(zip(r, o, strict=False)) if a != b), min(len(r), len(o))))
        for i, (r, o) in enumerate(zip(reference, other, strict=True))
        if r != o
    ]
    if not diffs:
        return ""
    prompt, pos = diffs[0]
    return f"{len(diffs)}/{len(reference)} sequences differ, first: prompt {prompt} at new token {pos}"


def run_transformers(
    path: Path, prompts: list[list[int]], counts: list[int], new: int, dtype: str, experts: str
) -> list[Result]:
    torch.set_num_threads(TORCH_THREADS)
    model = transformers.AfmoeForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], experts_implementation=experts
    ).eval()
    model.generation_config.eos_token_id = None
    hf_generate(model, prompts[:2], 2)  # warm-up
    results = []
    for batch in counts:
        start = time.perf_counter()
        outputs = hf_generate(model, prompts[:batch], new)
        results.append(Result("transformers", dtype, batch, time.perf_counter() - start, outputs))
    del model
    gc.collect()
    return results


def run_engine(
    path: Path, prompts: list[list[int]], counts: list[int], new: int, dtype: str, options: dict
) -> list[Result]:
    shards, overlap, router_cpus = options["expert_shards"], options["overlap"], options["router_cpus"]
    name = f"engine {shards} actor{'s' if shards > 1 else ''}, overlap {'on' if overlap else 'off'}"
    if router_cpus != 1:
        name += f", router {router_cpus} threads"
    results = []
    with Engine(path, expert_cpus=1, max_num_seqs=len(prompts), dtype=dtype, **options) as eng:
        eng.generate(prompts[:2], max_new_tokens=2, ignore_eos=True)  # warm-up
        dedicated = eng.info()["dedicated_cores"]
        for batch in counts:
            eng.stats(reset=True)
            computed = [c["compute_seconds"] for c in eng.expert_counters()]
            start = time.perf_counter()
            completions = eng.generate(prompts[:batch], max_new_tokens=new, ignore_eos=True)
            seconds = time.perf_counter() - start
            outputs = [c.token_ids for c in completions]
            stats = eng.stats()
            served = zip(eng.expert_counters(), computed, strict=True)
            stats["expert_compute_seconds"] = max(c["compute_seconds"] - before for c, before in served)
            stats["dedicated_cores"] = dedicated
            results.append(Result(name, dtype, batch, seconds, outputs, stats))
    return results


def run_in_process(
    path: Path, prompts: list[list[int]], counts: list[int], new: int, dtype: str
) -> list[Result]:
    """The engine core with LocalExperts in this process, one thread: the engine without a transport."""
    torch.set_num_threads(1)
    core = local_core(
        path,
        1,
        len(prompts),
        max_model_len=512,
        max_num_batched_tokens=2048,
        max_waiting=1024,
        dtype=DTYPES[dtype],
        profile=False,
    )
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    warm_up = prompts[:2]
    core.generate(warm_up, [SamplingParams(max_tokens=2, ignore_eos=True)] * len(warm_up))
    results = []
    for batch in counts:
        core.totals = StepTotals()
        start = time.perf_counter()
        seqs = core.generate(prompts[:batch], [params] * batch)
        seconds = time.perf_counter() - start
        stats = {
            "steps": core.totals.steps,
            "step_seconds": core.totals.forward_seconds,
            "exchange_seconds": 0.0,
        }
        results.append(
            Result("in-process core, 1 thread", dtype, batch, seconds, [s.output_ids for s in seqs], stats)
        )
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    record = machine_record()
    bandwidth = read_bandwidth(threads=TORCH_THREADS)
    one_core_bandwidth = read_bandwidth(threads=1)  # what one expert actor (one thread) can read
    transport = (
        {"transport": args.transport} if args.transport and "transport" in EngineOptions.model_fields else {}
    )
    wall = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        path = write_afmoe_checkpoint(Path(tmp) / "model", BENCH_CONFIG, seed=args.seed)
        config = json.loads((path / "config.json").read_text())
        prompts = make_prompts(max(args.prompts), config["vocab_size"], args.min_len, args.max_len, args.seed)
        for dtype in args.dtypes:
            results += run_transformers(path, prompts, args.prompts, args.new_tokens, dtype, args.hf_experts)
            results += run_in_process(path, prompts, args.prompts, args.new_tokens, dtype)
            for shards in args.shards:
                for overlap in args.overlap:
                    for router_cpus in args.router_cpus:
                        options = {
                            "expert_shards": shards,
                            "overlap": overlap,
                            "router_cpus": router_cpus,
                            **transport,
                        }
                        results += run_engine(path, prompts, args.prompts, args.new_tokens, dtype, options)
        bounds = {
            (d, n): roofline_tokens_per_s(config, n, DTYPES[d].itemsize, bandwidth)
            for d in args.dtypes
            for n in args.prompts
        }
    rows = table_rows(results, bounds, mismatch)
    wall = time.perf_counter() - wall
    print(f"checkpoint: {BENCH_CONFIG}; {args.new_tokens} new tokens per prompt, greedy, EOS ignored")
    print(
        f"transformers: {TORCH_THREADS} threads, experts {args.hf_experts}; engine: router"
        f" {args.router_cpus} CPUs + 1 CPU per expert actor; memory read bandwidth {bandwidth / 1e9:.1f}"
        f" GB/s with {TORCH_THREADS} threads, {one_core_bandwidth / 1e9:.1f} GB/s with 1"
    )
    print(format_table(rows))
    print("\n".join(verdicts(rows)))
    print(f"wall time {wall:.0f} s; load average {record['load_average']} at start, {os.getloadavg()} at end")
    path = args.json or results_path("engine_vs_transformers")
    report = {
        "machine": record,
        "load_average_end": os.getloadavg(),
        "read_bandwidth_bytes_per_s": bandwidth,
        "read_bandwidth_one_thread_bytes_per_s": one_core_bandwidth,
        "config": BENCH_CONFIG,
        "new_tokens": args.new_tokens,
        "prompt_lengths": [len(p) for p in prompts],
        "transport": transport.get("transport", "default"),
        "router_cpus": args.router_cpus,
        "wall_seconds": wall,
        "rows": rows,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
