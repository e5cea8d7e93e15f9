"""The `moe-cluster` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _model_path(arg: str | None) -> Path:
    from cluster.demo import demo_model_path

    return Path(arg) if arg else demo_model_path()


def cmd_demo_model(args: argparse.Namespace) -> int:
    from cluster.demo import write_demo_model

    print(write_demo_model(args.path))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from cluster.engine import Engine

    if not args.prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    with Engine(_model_path(args.model), expert_shards=args.expert_shards) as engine:
        completions = engine.generate(
            args.prompts,
            max_new_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
    for completion in completions:
        if args.json:
            record = {
                "token_ids": completion.token_ids,
                "text": completion.text,
                "finish_reason": completion.finish_reason,
            }
            print(json.dumps(record), flush=True)
        else:
            print(completion.text if completion.text is not None else completion.token_ids, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-model", help="write a small random AFMoE checkpoint with a tokenizer")
    demo.add_argument("path", type=Path)
    demo.set_defaults(run=cmd_demo_model)

    gen = sub.add_parser("generate", help="generate text on a local or joined Ray cluster")
    gen.add_argument("--model", help="Hugging Face model directory (default: the demo model)")
    gen.add_argument("--expert-shards", type=int, default=1)
    gen.add_argument("--prompt", dest="prompts", action="append", default=[], help="text prompt (repeatable)")
    gen.add_argument(
        "--prompt-ids", dest="prompts", action="append", type=_token_ids, help="comma-separated token ids"
    )
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    gen.set_defaults(run=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        print(f"moe-cluster: invalid configuration: {problems}", file=sys.stderr)
    except (ValueError, FileExistsError) as err:
        print(f"moe-cluster: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
