"""One-GPU device check (at most ~8 minutes on an H200): parity, expert compute vs rooflines, NCCL.

(a) the demo model in bf16 on the GPU against transformers fp32 on the CPU: greedy tokens for 8
    prompts and the largest logit difference, without and with two-batch overlap;
(b) one EP rank of a Trinity-Large-shaped MoE layer (hidden 3072, expert FFN 3072, 32 of 256 experts,
    top-4, random bf16 weights): expert compute time for 1..512 routed tokens against the HBM roofline
    (bytes of the touched experts' weights / HBM bandwidth) and the bf16 FLOP roofline;
(c) the NCCL transport at world size 1 (the code path runs end to end) and the NCCL version.
Prints a table; writes JSON under benchmarks/results/ (or --json PATH). Usage: python -m benchmarks.gpu_check
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.results import BenchmarkRun

HBM_BYTES_PER_S = 4.8e12  # H200
BF16_FLOPS = 989e12  # H200 dense bf16


def parity(new_tokens: int = 24, overlap: bool = False) -> dict:
    from transformers import AfmoeForCausalLM

    from cluster.demo import demo_model_path
    from experts.checkpoint import CheckpointReader
    from experts.placement import ModelPlacement
    from experts.shard import ExpertShard
    from router.config import ModelConfig
    from router.engine_core import EngineCore, default_cache_bytes
    from router.exchange import LocalExperts
    from router.kv_cache import KVCache
    from router.sampling import SamplingParams
    from router.scheduler import SchedulerConfig
    from router.weights import load_router_model

    path = demo_model_path()
    cfg, reader, dev = ModelConfig.from_model_dir(path), CheckpointReader(path), torch.device("cuda")
    model = load_router_model(reader, cfg, torch.bfloat16, dev)
    placement = ModelPlacement.uniform(len(cfg.moe_layers), cfg.num_experts, 1)
    shard = ExpertShard.load(reader, cfg.moe_layers, placement.slots_of(0), torch.bfloat16).to(dev)
    cache = KVCache(cfg, default_cache_bytes(cfg, 8, 512, 16, torch.bfloat16), 8, 16, torch.bfloat16, dev)
    experts = LocalExperts([shard], placement)
    scheduler = SchedulerConfig(8, 2048, 512)
    core = EngineCore(cfg, model, cache, experts, scheduler, overlap=overlap, overlap_min_tokens=2)
    prompts = [[5 + i, 17 + 3 * i, 9, 22 + i, 41, 7 + i][: 2 + i % 5] for i in range(8)]
    ref = AfmoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompts[5]])).logits[0]
        ref_tokens = []
        for p in prompts:
            ids = list(p)
            for _ in range(new_tokens):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
            ref_tokens.append(ids[len(p) :])
    ours = core.generate(prompts, [SamplingParams(max_tokens=new_tokens, ignore_eos=True)] * len(prompts))
    logits = core.prefill_logits(prompts[5])
    same = sum(s.output_ids == r for s, r in zip(ours, ref_tokens, strict=True))
    return {
        "prompts": len(prompts),
        "identical": same,
        "max_logit_diff": (logits - ref_logits).abs().max().item(),
        "split_steps": core.totals.split_steps,
    }


def expert_rooflines(tokens_list: tuple[int, ...] = (1, 8, 64, 128, 512), repeats: int = 50) -> list[dict]:
    from experts.shard import ExpertShard

    hidden, ffn, local, total, top_k = 3072, 3072, 32, 256, 4
    dev, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    gate_up = torch.randn(local, 2 * ffn, hidden, device=dev, dtype=dtype, generator=gen) * 0.02
    down = torch.randn(local, hidden, ffn, device=dev, dtype=dtype, generator=gen) * 0.02
    shard = ExpertShard([gate_up], [down])
    rows = []
    for tokens in tokens_list:
        # Tokens routed to this rank: each picks top-4 of 256 experts; keep the slots that land here.
        ids = torch.randint(0, total, (tokens, top_k), device=dev, generator=gen)
        local_ids = torch.where(ids < local, ids, -1)
        x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=gen)
        weights = torch.rand(tokens, top_k, device=dev, generator=gen)
        for _ in range(5):
            shard.forward(0, x, local_ids, weights)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            shard.forward(0, x, local_ids, weights)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        touched = int(torch.unique(local_ids[local_ids >= 0]).numel())
        pairs = int((local_ids >= 0).sum())
        weight_bytes = touched * 3 * hidden * ffn * 2
        flops = pairs * 2 * 3 * hidden * ffn
        hbm_s, flop_s = weight_bytes / HBM_BYTES_PER_S, flops / BF16_FLOPS
        rows.append(
            {
                "tokens": tokens,
                "pairs_here": pairs,
                "experts_touched": touched,
                "us": seconds * 1e6,
                "hbm_roofline_us": hbm_s * 1e6,
                "flop_roofline_us": flop_s * 1e6,
                "of_hbm_roofline": hbm_s / seconds if seconds else 0.0,
                "grouped_mm": shard.grouped,
            }
        )
    return rows


def nccl_world_one() -> dict:
    from cluster.transport.nccl import NcclTransport, nccl_version, new_unique_id

    transport = NcclTransport(new_unique_id(), 0, 1, timeout_s=30)
    payload = torch.arange(4096 * 8, device="cuda", dtype=torch.bfloat16).view(8, 4096)
    header = transport.broadcast_header(torch.tensor([1, 2, 3, 4]))
    start = time.perf_counter()
    out = transport.all_to_all(payload, [8], [8]).wait()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    ok = bool(torch.equal(out, payload)) and header.tolist() == [1, 2, 3, 4]
    transport.close()
    return {"nccl_version": nccl_version(), "round_trip_ok": ok, "all_to_all_us": elapsed * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    args = parser.parse_args()
    run = BenchmarkRun("gpu_check", args)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["parity"] = parity()
    result["parity_overlap"] = parity(overlap=True)  # two micro-batches per step on the GPU
    result["experts"] = expert_rooflines()
    result["nccl"] = nccl_world_one()
    print(f"device {result['device']}, torch {result['torch']}")
    p = result["parity"]
    print(
        f"(a) parity bf16 GPU vs fp32 CPU: {p['identical']}/{p['prompts']} greedy identical, "
        f"max logit diff {p['max_logit_diff']:.4f}"
    )
    print("(b) tokens  pairs  experts  time us  HBM roofline us  FLOP roofline us  % of HBM roofline")
    for r in result["experts"]:
        print(
            f"    {r['tokens']:6d} {r['pairs_here']:6d} {r['experts_touched']:8d} {r['us']:8.1f} "
            f"{r['hbm_roofline_us']:16.1f} {r['flop_roofline_us']:17.1f} {100 * r['of_hbm_roofline']:17.1f}"
        )
    o = result["parity_overlap"]
    print(
        f"    with two-batch overlap ({o['split_steps']} split steps): "
        f"{o['identical']}/{o['prompts']} identical"
    )
    n = result["nccl"]
    print(
        f"(c) NCCL {n['nccl_version']}: world-size-1 round trip ok={n['round_trip_ok']}, "
        f"all_to_all {n['all_to_all_us']:.1f} us"
    )
    run.write(result, args.json)


if __name__ == "__main__":
    main()
