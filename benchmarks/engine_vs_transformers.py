"""Tokens/s of transformers `generate` against the engine with 1 and 2 expert shards.

One run on one random AFMoE checkpoint (small, but big enough that expert compute matters) and one set of
token-id prompts; greedy decoding of a fixed number of new tokens (EOS ignored on both sides). Prints one
table: seconds, tokens/s, ratios, the share of the router's step time spent in the expert exchange, and a
check of the exchange volume per token and MoE layer; then whether the greedy tokens are identical.

    python benchmarks/engine_vs_transformers.py [--prompts 16] [--new-tokens 64] [--shards 1,2] [--json PATH]

Targets on a 2-core CPU machine: 1 shard >= 1.0x transformers; 2 shards >= 0.7x 1 shard.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from cluster.demo import write_afmoe_checkpoint
from cluster.engine import Engine

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
TARGET_ONE_SHARD_VS_HF = 1.0
TARGET_TWO_VS_ONE_SHARD = 0.7


@dataclass
class Result:
    name: str
    seconds: float
    outputs: list[list[int]]
    stats: dict = field(default_factory=dict)

    def tokens_per_s(self) -> float:
        return sum(len(o) for o in self.outputs) / self.seconds


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    new_tokens: int
    hidden_size: int
    moe_layers: int
    top_k: int

    def token_layers(self) -> int:
        """(token, MoE layer) pairs the engine exchanges: every prompt token and every fed-back new token."""
        tokens = sum(len(p) for p in self.prompts) + len(self.prompts) * (self.new_tokens - 1)
        return tokens * self.moe_layers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="number of prompts (one batch)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--shards", default="1,2", help="comma-separated expert shard counts for the engine")
    parser.add_argument("--min-len", type=int, default=8, help="shortest prompt, in tokens")
    parser.add_argument("--max-len", type=int, default=64, help="longest prompt, in tokens")
    parser.add_argument(
        "--hf-experts",
        default="eager",
        help="transformers experts_implementation; eager is its fastest on CPU (its default grouped_mm and "
        "batched_mm run 25-100x slower there), so it is the fair baseline",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the checkpoint and the prompts")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.shards = [int(s) for s in args.shards.split(",") if s.strip()]
    if not args.shards or min(args.shards) < 1:
        parser.error("--shards needs positive integers, e.g. 1,2")
    if not 1 <= args.min_len <= args.max_len:
        parser.error("need 1 <= --min-len <= --max-len")
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


def run_transformers(path: Path, work: Workload, experts: str) -> Result:
    torch.set_num_threads(TORCH_THREADS)
    model = transformers.AfmoeForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation=experts
    ).eval()
    model.generation_config.eos_token_id = None
    hf_generate(model, work.prompts, 2)  # warm-up
    start = time.perf_counter()
    outputs = hf_generate(model, work.prompts, work.new_tokens)
    seconds = time.perf_counter() - start
    experts = model.config._experts_implementation
    del model
    gc.collect()
    return Result("transformers", seconds, outputs, {"experts_implementation": experts})


def run_engine(path: Path, work: Workload, shards: int) -> Result:
    with Engine(
        path, expert_shards=shards, router_cpus=1, expert_cpus=1, max_num_seqs=len(work.prompts)
    ) as eng:
        eng.generate(work.prompts, max_new_tokens=2, ignore_eos=True)  # warm-up
        eng.stats(reset=True)
        start = time.perf_counter()
        completions = eng.generate(work.prompts, max_new_tokens=work.new_tokens, ignore_eos=True)
        seconds = time.perf_counter() - start
        stats = eng.stats()
    return Result(
        f"engine {shards} shard{'s' if shards > 1 else ''}",
        seconds,
        [c.token_ids for c in completions],
        stats,
    )


def exchange_check(result: Result, work: Workload, shards: int) -> tuple[str, bool]:
    """KB and rows per (token, MoE layer): rows in [1, min(shards, top_k)], payload = rows x hidden x 4 B."""
    stats = result.stats
    if not shards:
        return "", True
    token_layers = work.token_layers()
    rows = stats["rows_sent"] / token_layers
    kb = stats["payload_bytes"] / token_layers / 1024
    ok = (
        1.0 <= rows <= min(shards, work.top_k)
        and stats["payload_bytes"] == stats["rows_sent"] * work.hidden_size * 4
    )
    return f"{kb:.2f} KB, {rows:.2f} rows {'ok' if ok else 'BAD'}", ok


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


def table_rows(results: list[Result], work: Workload, shard_counts: list[int]) -> list[dict]:
    hf = results[0]
    one = next((r for r, n in zip(results[1:], shard_counts, strict=True) if n == 1), None)
    rows = []
    for result, shards in zip(results, [0, *shard_counts], strict=True):
        stats = result.stats
        share = stats["exchange_seconds"] / stats["step_seconds"] if stats.get("step_seconds") else None
        check, ok = exchange_check(result, work, shards)
        rows.append(
            {
                "name": result.name,
                "seconds": result.seconds,
                "tokens_per_s": result.tokens_per_s(),
                "vs_transformers": result.tokens_per_s() / hf.tokens_per_s(),
                "vs_one_shard": result.tokens_per_s() / one.tokens_per_s() if shards and one else None,
                "exchange_share": share,
                "exchange_check": check,
                "exchange_ok": ok,
                "identical": None if not shards else not mismatch(hf.outputs, result.outputs),
                "mismatch": mismatch(hf.outputs, result.outputs) if shards else "",
                "stats": stats,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = [
        "",
        "seconds",
        "tokens/s",
        "vs transformers",
        "vs 1 shard",
        "exchange share of step",
        "exchange per token-layer",
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    body = [
        [
            r["name"],
            fmt(r["seconds"], ".2f"),
            fmt(r["tokens_per_s"], ".1f"),
            fmt(r["vs_transformers"], ".2f") + "x",
            fmt(r["vs_one_shard"], ".2f") + ("x" if r["vs_one_shard"] else ""),
            fmt(r["exchange_share"], ".1%"),
            r["exchange_check"] or "-",
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdicts(rows: list[dict], shard_counts: list[int]) -> list[str]:
    by_shards = dict(zip(shard_counts, rows[1:], strict=True))
    out = []
    if 1 in by_shards:
        ratio = by_shards[1]["vs_transformers"]
        hit = "met" if ratio >= TARGET_ONE_SHARD_VS_HF else "MISSED"
        out.append(f"target 1 shard >= {TARGET_ONE_SHARD_VS_HF:.1f}x transformers: {ratio:.2f}x, {hit}")
    if 1 in by_shards and 2 in by_shards:
        ratio = by_shards[2]["vs_one_shard"]
        hit = "met" if ratio >= TARGET_TWO_VS_ONE_SHARD else "MISSED"
        out.append(f"target 2 shards >= {TARGET_TWO_VS_ONE_SHARD:.1f}x 1 shard: {ratio:.2f}x, {hit}")
    for row in rows[1:]:
        same = "yes" if row["identical"] else f"no ({row['mismatch']})"
        out.append(f"tokens identical, transformers vs {row['name']}: {same}")
    return out


def describe(work: Workload, hf: Result) -> str:
    lengths = [len(p) for p in work.prompts]
    cfg = BENCH_CONFIG
    return (
        f"checkpoint: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers "
        f"({work.moe_layers} MoE), "
        f"{cfg['num_experts']} experts top-{cfg['num_experts_per_tok']}, moe_intermediate "
        f"{cfg['moe_intermediate_size']}, fp32\n"
        f"workload: {len(work.prompts)} prompts of {min(lengths)}..{max(lengths)} tokens "
        f"(sum {sum(lengths)}), "
        f"{work.new_tokens} new tokens each, greedy, EOS ignored\n"
        f"transformers: torch threads {TORCH_THREADS}, experts_implementation "
        f"{hf.stats['experts_implementation']}; engine: router 1 CPU + 1 CPU per expert shard, "
        f"one torch thread each; machine: {os.cpu_count()} CPUs"
    )


def load_note(before: float, after: float) -> str:
    """Timings are only meaningful on an otherwise idle machine (with 2 torch threads, transformers slows down
    many times over on a busy one): say how busy it was. The load at the end includes this run's own."""
    cpus = os.cpu_count() or 1
    note = f"1-min load average: {before:.2f} at start, {after:.2f} at end, this run included ({cpus} CPUs)"
    if before > 0.5 * cpus:
        note += ": the machine was busy at the start, timings are unreliable"
    return note


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if os.environ.get("RAY_ADDRESS"):
        print("note: RAY_ADDRESS is set, the engine joins that cluster", file=sys.stderr)
    load_before = os.getloadavg()[0]
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        path = write_afmoe_checkpoint(Path(tmp) / "model", BENCH_CONFIG, seed=args.seed)
        config = json.loads((path / "config.json").read_text())
        work = Workload(
            make_prompts(args.prompts, config["vocab_size"], args.min_len, args.max_len, args.seed),
            args.new_tokens,
            config["hidden_size"],
            config["num_hidden_layers"] - config["num_dense_layers"],
            config["num_experts_per_tok"],
        )
        results = [run_transformers(path, work, args.hf_experts)]
        results += [run_engine(path, work, n) for n in args.shards]
    rows = table_rows(results, work, args.shards)
    wall = time.perf_counter() - wall
    print(describe(work, results[0]))
    print(format_table(rows))
    print("\n".join(verdicts(rows, args.shards)))
    print(f"wall time of the whole run: {wall:.1f} s")
    print(load_note(load_before, os.getloadavg()[0]))
    if args.json:
        report = {
            "config": BENCH_CONFIG,
            "prompt_lengths": [len(p) for p in work.prompts],
            "new_tokens": work.new_tokens,
            "wall_seconds": wall,
            "load_average": [load_before, os.getloadavg()[0]],
            "rows": rows,
            "workload": {k: v for k, v in asdict(work).items() if k != "prompts"},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
