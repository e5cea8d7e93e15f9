"""A plan as text for an operator."""

from __future__ import annotations

GB = 1e9


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def render(plan: dict) -> str:
    m, lay, mem, kv, ex = plan["model"], plan["layout"], plan["memory_per_gpu"], plan["kv"], plan["exchange"]
    lines = [
        f"model: {plan['source']}  ({m['parameters'] / 1e9:,.1f}B parameters, "
        f"{m['active_parameters_per_token'] / 1e9:,.1f}B active per token)",
        f"layout: {lay['gpus']} GPUs on {lay['nodes']} node(s) = 1 router + {lay['expert_shards']} expert "
        f"shards of up to {lay['experts_per_shard']} experts (at least {lay['min_gpus']} GPUs needed)",
        "",
        f"memory per GPU (usable {_gb(mem['usable_bytes'])}):",
        f"  router GPU:  weights {_gb(mem['router_weights_bytes'])} "
        f"+ KV cache {_gb(mem['router_kv_cache_bytes'])}",
        f"  expert GPU:  routed experts {_gb(mem['expert_shard_bytes'])} "
        f"(all routed experts {_gb(m['routed_expert_bytes'])}, one expert {m['expert_bytes'] / 1e6:,.1f} MB)",
        "",
        f"KV cache: {kv['bytes_per_token_per_layer'] / 1024:g} KiB per token per layer, "
        f"{_gb(kv['bytes_per_sequence'])} per {plan['max_model_len']}-token sequence; "
        f"{kv['sequences_fit']} sequences fit",
        "",
        f"exchange per token per MoE layer: {ex['rows_per_token_per_layer_expected']:.2f} rows expected; "
        f"dispatch {ex['dispatch_bytes_per_token_per_layer'] / 1024:,.1f} KiB "
        f"(max {ex['dispatch_bytes_per_token_per_layer_max'] / 1024:,.1f}), combine "
        f"{ex['combine_bytes_per_token_per_layer'] / 1024:,.1f} KiB "
        f"(max {ex['combine_bytes_per_token_per_layer_max'] / 1024:,.1f})",
        f"exchange per token per step (all MoE layers, both ways): "
        f"{ex['bytes_per_token_per_step'] / 1e6:,.2f} MB",
        "",
        "decode step (predicted):",
        f"  {'batch':>6} {'router':>9} {'experts':>9} {'exchange':>9} {'step':>9} {'tok/s':>9} "
        f"{'overlap':>9} {'tok/s':>9}  bound",
    ]
    for s in plan["decode"]:
        lines.append(
            f"  {s['batch']:>6} {s['router_ms']:>7.2f}ms {s['experts_ms']:>7.2f}ms "
            f"{s['exchange_ms']:>7.2f}ms "
            f"{s['step_ms']:>7.2f}ms {s['tokens_per_s']:>9,.0f} {s['overlapped_step_ms']:>7.2f}ms "
            f"{s['overlapped_tokens_per_s']:>9,.0f}  {s['bound']}"
        )
    lines += ["", "assumptions:", *(f"  - {a}" for a in plan["assumptions"])]
    return "\n".join(lines)
