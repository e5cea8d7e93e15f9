"""The table, roofline and verdicts of benchmarks/engine_vs_transformers.py."""

from __future__ import annotations

from collections.abc import Callable

TARGETS = {  # issue 12, on this machine
    "1 actor vs transformers (fp32, 16 prompts)": 1.5,
    "2 actors vs 1 actor (fp32, 16 prompts)": 1.2,
    "1 actor vs transformers (fp32, 1 prompt)": 1.0,
    "exchange share of step, at most (fp32, 16 prompts, 1 actor)": 0.25,
    "share of roofline (fp32, 64 prompts, best engine)": 0.40,
}


def touched_weight_bytes(config: dict, batch: int, itemsize: int) -> float:
    """Weight bytes one decode step of `batch` sequences reads: every non-expert weight once, and per MoE
    layer the distinct experts its tokens pick, E * (1 - (1 - k/E)^B) in expectation."""
    h, heads, kv, dim = (
        config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    layers, dense = config["num_hidden_layers"], config["num_dense_layers"]
    experts, k, inter = config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]
    attention = h * (3 * heads * dim + 2 * kv * dim)  # q, gate, o; k, v
    shared = 3 * h * inter * config["num_shared_experts"]
    non_expert = layers * attention + dense * 3 * h * config["intermediate_size"]
    non_expert += (layers - dense) * shared + config["vocab_size"] * h
    gate_bytes = (layers - dense) * h * experts * 4  # fp32 gates
    distinct = experts * (1 - (1 - k / experts) ** batch)
    routed = (layers - dense) * distinct * 3 * h * inter
    return (non_expert + routed) * itemsize + gate_bytes


def roofline_tokens_per_s(config: dict, batch: int, itemsize: int, bandwidth: float) -> float:
    return batch * bandwidth / touched_weight_bytes(config, batch, itemsize)


def table_rows(results: list, bounds: dict, mismatch: Callable[[list, list], str]) -> list[dict]:
    def find(name: str, dtype: str, prompts: int):
        return next((r for r in results if (r.name, r.dtype, r.prompts) == (name, dtype, prompts)), None)

    rows = []
    for r in results:
        hf = find("transformers", r.dtype, r.prompts)
        one = (
            find(r.name.replace("2 actors", "1 actor"), r.dtype, r.prompts) if "2 actors" in r.name else None
        )
        steps = r.stats.get("steps") or 0
        step_s = r.stats.get("step_seconds", 0.0)
        fp32_hf = find("transformers", "float32", r.prompts)
        rows.append(
            {
                "name": r.name,
                "dtype": r.dtype,
                "prompts": r.prompts,
                "seconds": r.seconds,
                "tokens_per_s": r.tokens_per_s(),
                "vs_transformers": r.tokens_per_s() / hf.tokens_per_s(),
                "vs_one_actor": r.tokens_per_s() / one.tokens_per_s() if one else None,
                "exchange_share": r.stats["exchange_seconds"] / step_s if step_s else None,
                "expert_busy": (
                    r.stats["expert_compute_seconds"] / step_s
                    if step_s and "expert_compute_seconds" in r.stats
                    else None
                ),
                "step_ms": 1e3 * step_s / steps if steps else None,
                "overhead_ms_per_step": 1e3 * (r.seconds - step_s) / steps if steps else None,
                "split_steps": r.stats.get("split_steps"),
                "steps": steps,
                "roofline_tokens_per_s": bounds[r.dtype, r.prompts],
                "share_of_roofline": r.tokens_per_s() / bounds[r.dtype, r.prompts],
                "mismatch_vs_transformers": mismatch(hf.outputs, r.outputs),
                "mismatch_vs_fp32_transformers": mismatch(fp32_hf.outputs, r.outputs) if fp32_hf else None,
                "stats": r.stats,
            }
        )
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def format_table(rows: list[dict]) -> str:
    header = [
        "",
        "dtype",
        "prompts",
        "tok/s",
        "vs HF",
        "vs 1 actor",
        "exch share",
        "expert busy",
        "step ms",
        "overhead ms",
        "roofline",
        "tokens",
    ]
    body = [
        [
            r["name"],
            r["dtype"],
            str(r["prompts"]),
            _fmt(r["tokens_per_s"], ".1f"),
            _fmt(r["vs_transformers"], ".2f", "x"),
            _fmt(r["vs_one_actor"], ".2f", "x"),
            _fmt(r["exchange_share"], ".0%"),
            _fmt(r["expert_busy"], ".0%"),
            _fmt(r["step_ms"], ".2f"),
            _fmt(r["overhead_ms_per_step"], ".2f"),
            _fmt(r["share_of_roofline"], ".0%"),
            "same" if not r["mismatch_vs_transformers"] else r["mismatch_vs_transformers"].split(",")[0],
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    def get(name: str, prompts: int, dtype: str = "float32") -> dict | None:
        return next(
            (r for r in rows if (r["name"], r["prompts"], r["dtype"]) == (name, prompts, dtype)), None
        )

    one, two = "engine 1 actor, overlap on", "engine 2 actors, overlap on"
    engines = [
        r for r in rows if r["name"].startswith("engine") and r["prompts"] == 64 and r["dtype"] == "float32"
    ]
    measured = {
        "1 actor vs transformers (fp32, 16 prompts)": (get(one, 16) or {}).get("vs_transformers"),
        "2 actors vs 1 actor (fp32, 16 prompts)": (get(two, 16) or {}).get("vs_one_actor"),
        "1 actor vs transformers (fp32, 1 prompt)": (get(one, 1) or {}).get("vs_transformers"),
        "exchange share of step, at most (fp32, 16 prompts, 1 actor)": (get(one, 16) or {}).get(
            "exchange_share"
        ),
        "share of roofline (fp32, 64 prompts, best engine)": max(
            (r["share_of_roofline"] for r in engines), default=None
        ),
    }
    out = []
    for name, target in TARGETS.items():
        value = measured[name]
        if value is None:
            out.append(f"target {name}: not measured in this run")
            continue
        met = value <= target if "at most" in name else value >= target
        out.append(f"target {name} {target:.2f}: {value:.2f}, {'met' if met else 'MISSED'}")
    return out
