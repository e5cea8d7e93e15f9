"""How a model lays out on N GPUs, what fits, and a roofline of one decode step. Torch-free.

Layout, as the engine places an instance: GPU 0 holds the router (every weight but the routed experts,
plus the KV cache); GPUs 1..N-1 each hold one expert shard (contiguous placement). The roofline takes
each part's time as max(bytes / HBM bandwidth, FLOPs / peak) and the exchange's as bytes over the
router GPU's links (NVLink to shards on its node, the network to the others) plus a fixed latency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cluster.planner import sizes
from router.config import ModelConfig

GB = 1e9
RESERVE_BYTES = 2 * 2**30  # per GPU: CUDA context, activations, the exchange's buffers


class PlanError(ValueError):
    """A request the planner cannot satisfy (too few GPUs, a model that fits on no GPU)."""


@dataclass(frozen=True)
class Hardware:
    gpu_memory_gb: float = 141.0  # H200
    memory_utilization: float = 0.9  # the engine's gpu_memory_utilization default
    hbm_gbps: float = 4800.0  # H200 HBM3e, GB/s
    tflops: float | None = None  # dense peak; None: H200's 989 bf16 / 1979 fp8
    nvlink_gbps: float = 450.0  # NVLink 4, one direction, GB/s
    network_gbps: float = 400.0  # one 400G NIC per GPU, Gbit/s
    gpus_per_node: int = 8
    exchange_latency_us: float = 15.0  # per all-to-all, each direction

    def peak_flops(self, dtype: str) -> float:
        return (self.tflops or (1979.0 if dtype == "fp8" else 989.0)) * 1e12

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gb * GB * self.memory_utilization - RESERVE_BYTES


@dataclass(frozen=True)
class Request:
    gpus: int
    dtype: str = "bf16"
    max_model_len: int = 8192
    block_size: int = 16
    batch: int | None = None  # decode batch of the prediction; None: the sequences that fit, at most 256
    hardware: Hardware = field(default_factory=Hardware)


@dataclass(frozen=True)
class DecodeStep:
    batch: int
    router_ms: float
    experts_ms: float
    exchange_ms: float
    step_ms: float  # router, exchange and experts one after another
    overlapped_step_ms: float  # ideal two-batch overlap: the slowest of the three
    tokens_per_s: float
    overlapped_tokens_per_s: float
    bound: str


def min_gpus(cfg: ModelConfig, dtype: str, hw: Hardware) -> int:
    """Fewest GPUs (router + shards) whose expert shards each fit one GPU."""
    p = sizes.count_params(cfg)
    per_expert = sizes.expert_bytes_all_layers(cfg, p, dtype)
    fits = int(hw.usable_bytes // per_expert)
    if fits < 1:
        raise PlanError(
            f"one expert across all MoE layers ({per_expert / GB:.1f} GB) exceeds a GPU's usable "
            f"{hw.usable_bytes / GB:.1f} GB: no shard count fits"
        )
    return 1 + -(-cfg.num_experts // fits)


def make_plan(cfg: ModelConfig, req: Request) -> dict:
    hw, dtype = req.hardware, req.dtype
    p = sizes.count_params(cfg)
    shards = req.gpus - 1
    needed = min_gpus(cfg, dtype, hw)
    router_bytes = sizes.router_weight_bytes(p, dtype)
    kv_seq = sizes.kv_bytes_per_sequence(cfg, req.max_model_len, req.block_size)
    kv_budget = hw.usable_bytes - router_bytes
    if kv_budget < kv_seq:
        raise PlanError(
            f"the router's weights ({router_bytes / GB:.1f} GB) and one {req.max_model_len}-token sequence's "
            f"KV cache ({kv_seq / GB:.2f} GB) exceed one GPU's usable {hw.usable_bytes / GB:.1f} GB"
        )
    if shards < 1 or req.gpus < needed:
        raise PlanError(
            f"{req.gpus} GPU(s) of {hw.gpu_memory_gb:g} GB cannot hold {cfg.num_experts} experts x "
            f"{len(cfg.moe_layers)} MoE layers in {dtype}: it needs at least {needed} GPUs "
            f"(1 router + {needed - 1} expert shards)"
        )
    per_expert = sizes.expert_bytes_all_layers(cfg, p, dtype)
    shard_experts = sizes.shard_sizes(cfg.num_experts, shards)
    fit = int(kv_budget // kv_seq)
    exchange = sizes.exchange_bytes(cfg, shards)
    batch = req.batch or min(fit, 256)
    steps = [decode_step(cfg, p, req, b, exchange) for b in sorted({1, batch})]
    return {
        "model": {
            "parameters": p.total,
            "routed_expert_parameters": p.routed,
            "router_parameters": p.router_total,
            "active_parameters_per_token": p.router_linear
            + len(cfg.moe_layers) * cfg.num_experts_per_tok * p.routed_per_expert,
            "routed_expert_bytes": sizes.routed_bytes(p, dtype),
            "expert_bytes": p.routed_per_expert * sizes.WEIGHT_BYTES[dtype],
        },
        "layout": {
            "gpus": req.gpus,
            "expert_shards": shards,
            "min_gpus": needed,
            "nodes": -(-req.gpus // hw.gpus_per_node),
            "experts_per_shard": max(shard_experts),
        },
        "memory_per_gpu": {
            "usable_bytes": int(hw.usable_bytes),
            "router_weights_bytes": router_bytes,
            "router_kv_cache_bytes": int(kv_budget),
            "expert_shard_bytes": max(shard_experts) * per_expert,
        },
        "kv": {
            "bytes_per_token_per_layer": cfg.kv_bytes_per_token_layer(sizes.KV_BYTES),
            "bytes_per_sequence": kv_seq,
            "sequences_fit": fit,
        },
        "exchange": {
            "rows_per_token_per_layer_expected": exchange.rows_expected,
            "dispatch_bytes_per_token_per_layer": exchange.dispatch_expected,
            "combine_bytes_per_token_per_layer": exchange.combine_expected,
            "dispatch_bytes_per_token_per_layer_max": exchange.dispatch_max,
            "combine_bytes_per_token_per_layer_max": exchange.combine_max,
            "bytes_per_token_per_step": (exchange.dispatch_expected + exchange.combine_expected)
            * len(cfg.moe_layers),
        },
        "decode": [asdict(s) for s in steps],
    }


def decode_step(
    cfg: ModelConfig, p: sizes.Params, req: Request, batch: int, exchange: sizes.ExchangeBytes
) -> DecodeStep:
    """One decode step of `batch` sequences at half of max_model_len each (the average over their lives)."""
    hw, dtype = req.hardware, req.dtype
    shards, moe = req.gpus - 1, len(cfg.moe_layers)
    flops = hw.peak_flops(dtype)
    hbm = hw.hbm_gbps * GB
    context = req.max_model_len // 2
    attention_flops = sizes.attention_flops(cfg, context)
    router_bytes = p.router_linear * sizes.WEIGHT_BYTES[dtype] + batch * sizes.kv_bytes_read(cfg, context)
    router_s = max(router_bytes / hbm, batch * (2 * p.router_linear + attention_flops) / flops)
    touched = sizes.touched_experts(cfg.num_experts, cfg.num_experts_per_tok, batch) / shards
    expert_bytes = moe * touched * p.routed_per_expert * sizes.WEIGHT_BYTES[dtype]
    expert_flops = 2 * batch * cfg.num_experts_per_tok * p.routed_per_expert * moe / shards
    experts_s = max(expert_bytes / hbm, expert_flops / flops)
    exchange_s = moe * sum(
        _link_seconds(batch * per_token, shards, hw)
        for per_token in (exchange.dispatch_expected, exchange.combine_expected)
    )
    parts = {"router": router_s, "experts": experts_s, "exchange": exchange_s}
    serial, overlapped = sum(parts.values()), max(parts.values())
    return DecodeStep(
        batch=batch,
        router_ms=router_s * 1e3,
        experts_ms=experts_s * 1e3,
        exchange_ms=exchange_s * 1e3,
        step_ms=serial * 1e3,
        overlapped_step_ms=overlapped * 1e3,
        tokens_per_s=batch / serial,
        overlapped_tokens_per_s=batch / overlapped,
        bound=max(parts, key=parts.get),
    )


def _link_seconds(total_bytes: float, shards: int, hw: Hardware) -> float:
    """One all-to-all direction: the router GPU's bytes split evenly over its shards (PACK order:
    the shards on its own node over NVLink, the rest over its NIC), both links in parallel."""
    local = min(shards, hw.gpus_per_node - 1)
    on_node, off_node = total_bytes * local / shards, total_bytes * (shards - local) / shards
    seconds = max(on_node / (hw.nvlink_gbps * GB), off_node / (hw.network_gbps / 8 * GB))
    return seconds + hw.exchange_latency_us * 1e-6


def assumptions(req: Request) -> list[str]:
    hw = req.hardware
    return [
        "GPU 0 holds the router (all non-expert weights + the KV cache); GPUs 1..N-1 one expert shard each",
        f"usable per GPU: {hw.memory_utilization:g} x {hw.gpu_memory_gb:g} GB minus "
        f"{RESERVE_BYTES / 2**30:g} GiB (CUDA context, activations, buffers)",
        f"{req.dtype} weights (fp8: linear weights in 1 byte, embeddings and norms bf16); KV cache and "
        "exchanged activations bf16",
        f"KV: full layers hold max_model_len tokens, sliding layers a ring of window-1, in blocks of "
        f"{req.block_size} tokens (as the engine allocates)",
        "routing uniform over experts (expected exchange rows and touched experts); real load is skewed",
        f"decode: one token per sequence at {req.max_model_len // 2} tokens of context "
        "(half of max_model_len)",
        f"roofline: HBM {hw.hbm_gbps:g} GB/s, {hw.peak_flops(req.dtype) / 1e12:g} TFLOP/s, NVLink "
        f"{hw.nvlink_gbps:g} GB/s per direction, network {hw.network_gbps:g} Gbit/s per GPU, "
        f"{hw.exchange_latency_us:g} us per all-to-all, {hw.gpus_per_node} GPUs per node (PACK)",
        "step = router + exchange + experts one after another; overlapped = the slowest of them "
        "(ideal two-batch overlap)",
        "a prediction, not a measurement: no part of it has run on GPUs",
    ]
