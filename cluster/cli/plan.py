"""`moe-cluster plan`: memory, capacity and a decode roofline of a model on N GPUs (cluster/planner/)."""

from __future__ import annotations

import argparse
import json
import sys

from cluster.planner.models import BUILTIN, load_model
from cluster.planner.plan import Hardware, PlanError, Request, assumptions, make_plan
from cluster.planner.report import render
from router.config import ConfigError


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    hw = Hardware()
    plan = sub.add_parser("plan", help="how a model fits on N GPUs and what it delivers (a prediction)")
    plan.add_argument(
        "--model", required=True, help=f"model directory, config.json, or built-in: {', '.join(BUILTIN)}"
    )
    plan.add_argument("--gpus", type=_positive(int), required=True, help="GPUs of one model instance")
    plan.add_argument("--gpu-memory", type=_positive(float), default=hw.gpu_memory_gb, help="GB per GPU")
    plan.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16", help="weight dtype")
    plan.add_argument("--max-model-len", type=_positive(int), default=8192, help="tokens per sequence")
    plan.add_argument(
        "--batch", type=_positive(int), help="decode batch (default: sequences that fit, <= 256)"
    )
    plan.add_argument(
        "--gpu-memory-utilization", type=_positive(float), default=hw.memory_utilization, help="share used"
    )
    plan.add_argument("--hbm-bandwidth", type=_positive(float), default=hw.hbm_gbps, help="GB/s")
    plan.add_argument("--tflops", type=_positive(float), help="dense peak (default: H200, by dtype)")
    plan.add_argument("--nvlink-bandwidth", type=_positive(float), default=hw.nvlink_gbps, help="GB/s")
    plan.add_argument("--network-bandwidth", type=_positive(float), default=hw.network_gbps, help="Gbit/s")
    plan.add_argument("--gpus-per-node", type=_positive(int), default=hw.gpus_per_node)
    plan.add_argument("--exchange-latency-us", type=float, default=hw.exchange_latency_us)
    plan.add_argument("--json", action="store_true", help="the plan as one JSON object")
    plan.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.gpu_memory_utilization > 1:
        return _fail("--gpu-memory-utilization must be at most 1")
    hardware = Hardware(
        gpu_memory_gb=args.gpu_memory,
        memory_utilization=args.gpu_memory_utilization,
        hbm_gbps=args.hbm_bandwidth,
        tflops=args.tflops,
        nvlink_gbps=args.nvlink_bandwidth,
        network_gbps=args.network_bandwidth,
        gpus_per_node=args.gpus_per_node,
        exchange_latency_us=args.exchange_latency_us,
    )
    request = Request(args.gpus, args.dtype, args.max_model_len, batch=args.batch, hardware=hardware)
    try:
        cfg, source = load_model(args.model)
        plan = make_plan(cfg, request)
    except (PlanError, ConfigError) as err:
        return _fail(str(err))
    plan = {"source": source, "dtype": args.dtype, "max_model_len": args.max_model_len, **plan}
    plan["assumptions"] = assumptions(request)
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0


def _fail(message: str) -> int:
    print(f"moe-cluster plan: {message}", file=sys.stderr)
    return 2
