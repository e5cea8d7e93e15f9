"""The `moe-cluster` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from cluster.options.flags import add_engine_flags, engine_flags


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _model_path(arg: str | None) -> Path:
    from cluster.demo import demo_model_path

    return Path(arg) if arg else demo_model_path()


def cmd_demo_model(args: argparse.Namespace) -> int:
    from cluster.demo import FAMILIES, copy_demo_model, write_checkpoint

    if args.arch is None:
        print(copy_demo_model(args.path))
    elif args.arch not in FAMILIES:
        known = ", ".join(FAMILIES)
        print(f"moe-cluster demo-model: unknown --arch {args.arch!r}; known: {known}", file=sys.stderr)
        return 2
    else:
        print(write_checkpoint(args.path, {}, seed=args.seed, family=args.arch))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from cluster.engine import Engine

    if not args.prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    with Engine(_model_path(args.model), **engine_flags(args)) as engine:
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


def _serve_options(args: argparse.Namespace):
    """ServeOptions from --config (its keys, or a Serve config's first application's args), then flags."""
    import yaml

    from cluster.options.serve import ServeOptions

    values: dict = {}
    if args.config:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read --config {args.config}: {err}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of options")
        if "applications" in loaded:
            apps = loaded["applications"]
            if not (isinstance(apps, list) and apps and isinstance(apps[0], dict)):
                raise ValueError(f"{args.config}: 'applications' lists no application")
            loaded = apps[0].get("args") or {}
        values = dict(loaded)
    flags = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "tool_call_parser": getattr(args, "tool_call_parser", None),
        **engine_flags(args),
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    scaling = {
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests,
    }
    if any(v is not None for v in scaling.values()):
        engine = dict(values.get("engine_autoscaling") or {})
        engine.update({k: v for k, v in scaling.items() if v is not None})
        values["engine_autoscaling"] = engine
    options = ServeOptions.model_validate(values)
    options.check_model_here()
    return options


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ray import serve

    from cluster.instance.resources import ensure_ray
    from cluster.serve.app import build_app

    options = _serve_options(args)
    per_replica = options.router_cpus + options.expert_shards * options.expert_cpus
    started = ensure_ray(per_replica * options.engine_autoscaling.max_replicas + 1)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options.model_dump(mode="json")), name="moe-cluster", route_prefix="/")
        print(
            f"serving {options.model_name()} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True
        )
        stop.wait()
    finally:
        _stop_serving(started)
    return 0


SERVE_DRAIN_S = 5.0


def _stop_serving(started_ray: bool) -> None:
    """Gives Serve a few seconds to drain and shut down, then, if this process started Ray, stops it:
    Serve's own shutdown can wait 30 s and more on its controller, too long for SIGTERM. Where Serve
    did not finish, the process exits here."""
    import os
    import sys
    import threading

    import ray
    from ray import serve

    worker = threading.Thread(target=serve.shutdown, name="serve-shutdown", daemon=True)
    worker.start()
    worker.join(SERVE_DRAIN_S)
    drained = not worker.is_alive()
    if not drained:
        print(f"Serve did not shut down within {SERVE_DRAIN_S:.0f} s; stopping Ray", flush=True)
    if started_ray:
        ray.shutdown()
    if not drained:
        # serve.shutdown still runs on its thread: its next call into the shut-down worker would end
        # the process with status 1 (a CI run saw it), so the process ends here, with 0.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def cmd_serve_config(args: argparse.Namespace) -> int:
    import yaml

    from cluster.serve.app import serve_config

    text = yaml.safe_dump(serve_config(_serve_options(args), args.host, args.port), sort_keys=False)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import os

    # Ray Data reads it when it is imported, below: its progress log lines when stdout is no terminal.
    interval = str(max(1, round(args.progress_interval)))
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", interval)
    from cluster.batch.job import BatchOptions, run_batch

    options = BatchOptions(
        input=args.input,
        output=args.output,
        model=_model_path(args.model),
        replicas=args.replicas,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        overwrite=args.overwrite,
        engine_options=engine_flags(args),
        output_format=args.output_format,
        batch_size=args.batch_size,
    )
    print(run_batch(options).line(), flush=True)
    return 0


def cmd_dashboards_export(args: argparse.Namespace) -> int:
    from cluster.cli.dashboards import export

    for path in export(args.directory):
        print(path)
    return 0


def cmd_dashboards_push(args: argparse.Namespace) -> int:
    import os

    from cluster.cli.dashboards import PushError, push

    try:
        urls = push(args.grafana_url, args.token or os.environ.get("GRAFANA_TOKEN"), args.folder)
    except PushError as err:
        print(f"moe-cluster: {err}", file=sys.stderr)
        return 1
    for url in urls:
        print(url)
    return 0


def cmd_k8s(args: argparse.Namespace) -> int:
    from cluster.cli.k8s.command import run_command

    return run_command(args, _serve_options)


def _add_serve_flags(parser: argparse.ArgumentParser, host: str) -> None:
    parser.add_argument("--model", help="model directory on every node (default: the demo model)")
    parser.add_argument("--served-model-name")
    parser.add_argument(
        "--tool-call-parser",
        choices=("auto", "hermes", "trinity"),
        help="how tool calls are read (default: auto)",
    )
    add_engine_flags(parser)
    parser.add_argument("--min-replicas", type=int, help="engine replicas (whole model instances)")
    parser.add_argument("--max-replicas", type=int)
    parser.add_argument(
        "--target-ongoing-requests", type=float, help="running + waiting sequences per replica"
    )
    parser.add_argument("--config", help="YAML with ServeOptions keys, or a Serve config file")
    parser.add_argument("--host", default=host)
    parser.add_argument("--port", type=int, default=8000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo-model",
        help="copy the trained demo model (checkpoint and tokenizer) to PATH, or with --arch write a small "
        "random checkpoint of that family with the demo tokenizer",
    )
    demo.add_argument("path", type=Path)
    demo.add_argument(
        "--arch", help="a random model of this family: afmoe, mixtral, qwen3_moe, gpt_oss or deepseek_v3"
    )
    demo.add_argument("--seed", type=int, default=0, help="the random model's seed (with --arch)")
    demo.set_defaults(run=cmd_demo_model)

    gen = sub.add_parser("generate", help="generate text on a local or joined Ray cluster")
    gen.add_argument("--model", help="Hugging Face model directory (default: the demo model)")
    add_engine_flags(gen)
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

    serve_cmd = sub.add_parser("serve", help="serve the OpenAI-compatible API until SIGINT/SIGTERM")
    _add_serve_flags(serve_cmd, host="127.0.0.1")
    serve_cmd.set_defaults(run=cmd_serve)

    config_cmd = sub.add_parser("serve-config", help="write a Serve config file for `serve deploy` / KubeRay")
    _add_serve_flags(config_cmd, host="0.0.0.0")
    config_cmd.add_argument("-o", "--output", help="file to write (default: stdout)")
    config_cmd.set_defaults(run=cmd_serve_config)

    batch = sub.add_parser(
        "batch", help="JSONL or Parquet prompts in, completions out (Ray Data); a rerun resumes"
    )
    batch.add_argument(
        "--input",
        type=Path,
        required=True,
        help='a JSONL or Parquet file, or a directory of them; {"id", "prompt" or "messages"} per row',
    )
    batch.add_argument(
        "--output", type=Path, required=True, help="directory of part files; an existing one is resumed"
    )
    batch.add_argument("--output-format", choices=("jsonl", "parquet"), default="jsonl")
    batch.add_argument("--model", help="Hugging Face model directory (default: the demo model)")
    batch.add_argument("--replicas", type=int, default=1, help="model instances (Ray Data actor pool size)")
    batch.add_argument(
        "--batch-size", type=int, default=0, help="rows per call of an instance (default: 2 x max-num-seqs)"
    )
    batch.add_argument("--max-tokens", type=int, default=32, help="default for records without max_tokens")
    batch.add_argument("--temperature", type=float, default=0.0, help="default for records without one")
    batch.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    add_engine_flags(batch)
    batch.add_argument(
        "--progress-interval",
        type=float,
        default=5.0,
        help="seconds between Ray Data's progress log lines when stdout is not a terminal",
    )
    batch.set_defaults(run=cmd_batch)

    dashboards = sub.add_parser("dashboards", help="the Grafana dashboards and alert rules")
    dash_sub = dashboards.add_subparsers(dest="dashboards_command", required=True)
    export_cmd = dash_sub.add_parser("export", help="write the dashboards' JSON and alerts.yaml into DIR")
    export_cmd.add_argument("directory", type=Path, metavar="DIR")
    export_cmd.set_defaults(run=cmd_dashboards_export)
    push_cmd = dash_sub.add_parser("push", help="create or update the dashboards in a Grafana (HTTP API)")
    push_cmd.add_argument("--grafana-url", required=True, help="e.g. http://grafana:3000")
    push_cmd.add_argument("--token", help="service account token (default: $GRAFANA_TOKEN)")
    push_cmd.add_argument("--folder", help="folder title, created if missing (default: General)")
    push_cmd.set_defaults(run=cmd_dashboards_push)

    k8s = sub.add_parser("k8s", help="render, apply, inspect or delete the RayService (Kubernetes API)")
    from cluster.cli.k8s.command import add_arguments as add_k8s_arguments

    add_k8s_arguments(k8s, _add_serve_flags)
    k8s.set_defaults(run=cmd_k8s)

    from cluster.cli.plan import add_parser as add_plan_parser

    add_plan_parser(sub)
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
