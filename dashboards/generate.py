"""Dashboards as code: the two Grafana dashboards, built with grafana-foundation-sdk (Grafana 11 build).

    python -m dashboards.generate           # rewrites dashboards/*.json
    python -m dashboards.generate --check   # exits 1 if a committed file differs from what this builds

Like Ray's own dashboards, every query filters on `ray_io_cluster=~"$Cluster"` (set per cluster by
KubeRay's PodMonitor relabeling) and reads from the `$datasource` variable. Metric names are those Ray's
metrics agent exports: `ray_` + the name given in cluster/metrics/ (+ `_total` for counters).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as builder
from grafana_foundation_sdk.builders import heatmap, prometheus, timeseries
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    StackingConfig,
    VizLegendOptions,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    GraphThresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VisibilityMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    GridPos,
    Threshold,
    ThresholdsMode,
    VariableHide,
    VariableRefresh,
    VariableSort,
)

HERE = Path(__file__).parent
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
CLUSTER = 'ray_io_cluster=~"$Cluster"'
RATE = "$__rate_interval"
WIDTH, HEIGHT = 24, 8


def m(metric: str, matchers: str = "") -> str:
    """A selector with the cluster filter, e.g. m("ray_moe_requests_total", 'status=~"5.."')."""
    return f"{metric}{{{CLUSTER}{', ' + matchers if matchers else ''}}}"


def rate(metric: str, matchers: str = "") -> str:
    return f"rate({m(metric, matchers)}[{RATE}])"


def quantile(q: float, histogram: str, by: str = "") -> str:
    groups = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({groups}) ({rate(histogram + '_bucket')}))"


def per_step(numerator: str) -> str:
    """A rate divided by the engine steps per second: an average per step."""
    return f"{numerator} / scalar(sum({rate('ray_moe_step_duration_seconds_count')}))"


@dataclass
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    width: int = 8
    stacked: bool = False
    heatmap: bool = False
    thresholds: list[float] = field(default_factory=list)  # red from each value (dashed lines)


@dataclass
class Row:
    title: str
    panels: list[Panel]


def _timeseries(panel: Panel) -> timeseries.Panel:
    built = (
        timeseries.Panel()
        .fill_opacity(25 if panel.stacked else 8)
        .line_width(1)
        .legend(
            VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    if panel.stacked:
        built = built.stacking(StackingConfig().mode(StackingMode.NORMAL))
    if panel.thresholds:
        steps = [Threshold(value=None, color="green")] + [
            Threshold(value=v, color="red") for v in panel.thresholds
        ]
        built = built.thresholds(builder.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))
        built = built.thresholds_style(GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED))
    return built


def _heatmap() -> heatmap.Panel:
    return (
        heatmap.Panel()
        .calculate(False)
        .color(heatmap.HeatmapColorOptions().mode("scheme").scheme("Oranges").steps(64).exponent(0.5))
        .y_axis(heatmap.YAxisConfig().unit("none"))
        .rows_frame(heatmap.RowsHeatmapOptions().layout("auto"))
        .cell_gap(1)
        .show_value(VisibilityMode.NEVER)
    )


def build(title: str, uid: str, description: str, rows: list[Row]) -> builder.Dashboard:
    dash = (
        builder.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["moe-cluster"])
        .editable()
        .time("now-30m", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(
            builder.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
            .description("The Prometheus that scrapes the Ray cluster's metrics export port.")
        )
        .with_variable(
            builder.QueryVariable("Cluster")
            .description(
                "Filter queries to specific Ray clusters for KubeRay. When ingesting metrics across "
                "multiple Ray clusters, the ray_io_cluster label should be set per cluster (KubeRay's "
                "PodMonitor does)."
            )
            .datasource(DATASOURCE)
            .query("label_values(ray_node_network_receive_speed{}, ray_io_cluster)")
            .include_all(True)
            .all_value(".*")
            .refresh(VariableRefresh.ON_DASHBOARD_LOAD)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .hide(VariableHide.DONT_HIDE)
        )
    )
    panel_id, y = 1, 0
    for row in rows:
        dash = dash.with_row(builder.Row(row.title).id(panel_id).grid_pos(GridPos(h=1, w=WIDTH, x=0, y=y)))
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > WIDTH:
                x, y = 0, y + HEIGHT
            built = _heatmap() if panel.heatmap else _timeseries(panel)
            built = (
                built.id(panel_id)
                .title(panel.title)
                .description(panel.description)
                .datasource(DATASOURCE)
                .unit(panel.unit)
                .grid_pos(GridPos(h=HEIGHT, w=panel.width, x=x, y=y))
            )
            for i, (expr, legend) in enumerate(panel.targets):
                built = built.with_target(
                    prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
                )
            dash = dash.with_panel(built)
            panel_id, x = panel_id + 1, x + panel.width
        y += HEIGHT
    return dash


def overview() -> builder.Dashboard:
    requests = "ray_moe_requests_total"
    ttft, itl, e2e = (
        "ray_moe_time_to_first_token_seconds",
        "ray_moe_inter_token_latency_seconds",
        "ray_moe_e2e_request_latency_seconds",
    )
    http = "ray_serve_http_request_latency_ms"
    errors = rate(requests, 'status=~"5.."')
    routes = rate("ray_serve_num_http_requests_total", 'route!~"/-/.*"')
    kv_usage, target_replicas = "ray_moe_kv_cache_usage_ratio", "ray_serve_autoscaling_target_replicas"
    rows = [
        Row(
            "Traffic",
            [
                Panel(
                    "Requests by status",
                    "Finished OpenAI API requests per second by HTTP status (499: the client left "
                    "mid-stream; an error inside a started stream counts as its code).",
                    [(f"sum by (status) ({rate(requests)})", "{{status}}")],
                    "reqps",
                    stacked=True,
                ),
                Panel(
                    "Error ratio",
                    "Share of requests that ended with a 5xx status.",
                    [
                        (
                            f"(sum({errors}) or vector(0)) / sum({rate(requests)})",
                            "5xx / all",
                        )
                    ],
                    "percentunit",
                    thresholds=[0.05],
                ),
                Panel(
                    "HTTP requests per route (Ray Serve)",
                    "Ray Serve's own count at the HTTP proxy, per application and route.",
                    [
                        (
                            f"sum by (application, route) ({routes})",
                            "{{application}} {{route}}",
                        )
                    ],
                    "reqps",
                ),
            ],
        ),
        Row(
            "Latency",
            [
                Panel(
                    "Time to first token",
                    "From a request's arrival at the engine replica to its first token.",
                    [(quantile(q, ttft), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)],
                    "s",
                    thresholds=[2.0],
                ),
                Panel(
                    "Inter-token latency",
                    "Gap between consecutive tokens of decoding sequences (one observation per engine "
                    "step: every decoding sequence of a step waited the same gap).",
                    [(quantile(q, itl), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)],
                    "s",
                ),
                Panel(
                    "End-to-end latency",
                    "Engine: arrival to last token. Serve: the HTTP proxy's whole request, streams included.",
                    [(quantile(q, e2e), f"engine p{round(q * 100)}") for q in (0.5, 0.99)]
                    + [(f"{quantile(0.99, http)} / 1000", "Serve HTTP p99")],
                    "s",
                ),
            ],
        ),
        Row(
            "Throughput and batching",
            [
                Panel(
                    "Tokens per second",
                    "Prompt tokens prefilled and tokens generated, all replicas.",
                    [
                        (f"sum({rate('ray_moe_prompt_tokens_total')})", "prompt"),
                        (f"sum({rate('ray_moe_generation_tokens_total')})", "generated"),
                    ],
                    "short",
                ),
                Panel(
                    "Batch size",
                    "Sequences and tokens per engine step (continuous batching).",
                    [
                        (quantile(0.5, "ray_moe_batch_sequences"), "sequences p50"),
                        (quantile(0.99, "ray_moe_batch_sequences"), "sequences p99"),
                        (quantile(0.5, "ray_moe_batch_tokens"), "tokens p50"),
                    ],
                    "short",
                ),
                Panel(
                    "Engine step time",
                    "One engine step: schedule, model forward (with the expert exchange), sample.",
                    [
                        (quantile(q, "ray_moe_step_duration_seconds"), f"p{round(q * 100)}")
                        for q in (0.5, 0.99)
                    ]
                    + [(f"sum({rate('ray_moe_step_duration_seconds_count')})", "steps/s")],
                    "s",
                ),
            ],
        ),
        Row(
            "Capacity",
            [
                Panel(
                    "Running and waiting sequences",
                    "Sequences holding KV blocks and sequences waiting for admission (what the engine "
                    "autoscaler counts), all replicas.",
                    [
                        (f"sum({m('ray_moe_running_sequences')})", "running"),
                        (f"sum({m('ray_moe_waiting_sequences')})", "waiting"),
                    ],
                    "short",
                    width=6,
                    stacked=True,
                ),
                Panel(
                    "KV-cache usage",
                    "Fraction of KV-cache blocks in use, per model instance (engine replica).",
                    [(f"max by (model_instance) ({m(kv_usage)})", "{{model_instance}}")],
                    "percentunit",
                    width=6,
                    thresholds=[0.95],
                ),
                Panel(
                    "KV blocks in use",
                    "KV-cache blocks referenced by running sequences, per layer group (full attention, "
                    "sliding window), all replicas. Free blocks still hold cached prefixes.",
                    [(f"sum by (group) ({m('ray_moe_kv_cache_blocks_in_use')})", "{{group}}")],
                    "short",
                    width=6,
                    stacked=True,
                ),
                Panel(
                    "Prefix cache",
                    "Prompt tokens looked up in the prefix cache and found there (per second), and the hit "
                    "rate: the share of prompt tokens that were not computed again.",
                    [
                        (f"sum({rate('ray_moe_prefix_cache_queries_total')})", "queried tokens/s"),
                        (f"sum({rate('ray_moe_prefix_cache_hits_total')})", "hit tokens/s"),
                        (
                            f"sum({rate('ray_moe_prefix_cache_hits_total')}) / "
                            f"sum({rate('ray_moe_prefix_cache_queries_total')})",
                            "hit rate",
                        ),
                    ],
                    "short",
                    width=6,
                ),
                Panel(
                    "Preemptions",
                    "Sequences preempted for lack of KV blocks in the last 5 minutes, per model instance: "
                    "each one is recomputed later (same tokens, more latency). Steadily above zero: the "
                    "KV cache is too small for the load.",
                    [
                        (
                            f"max by (model_instance) (delta({m('ray_moe_preemptions')}[5m]))",
                            "{{model_instance}}",
                        )
                    ],
                    "short",
                    width=6,
                ),
                Panel(
                    "Replicas",
                    "Healthy Serve replicas per deployment and the autoscaler's target.",
                    [
                        (
                            f"sum by (application, deployment) ({m('ray_serve_deployment_replica_healthy')})",
                            "{{deployment}} healthy",
                        ),
                        (
                            f"sum by (application, deployment) ({m(target_replicas)})",
                            "{{deployment}} target",
                        ),
                    ],
                    "short",
                    width=6,
                ),
                Panel(
                    "Ongoing and queued requests (Ray Serve)",
                    "Requests in the HTTP proxies, and requests queued for a replica per deployment.",
                    [
                        (f"sum({m('ray_serve_num_ongoing_http_requests')})", "ongoing HTTP"),
                        (
                            f"sum by (deployment) ({m('ray_serve_deployment_queued_queries')})",
                            "queued {{deployment}}",
                        ),
                    ],
                    "short",
                    width=6,
                ),
            ],
        ),
    ]
    return build(
        "moe-cluster overview",
        "moe-cluster-overview",
        "Traffic, latency, throughput, batching, KV cache and replicas of the moe-cluster OpenAI API.",
        rows,
    )


def experts() -> builder.Dashboard:
    expert_tokens = rate("ray_moe_expert_tokens_total")
    exchange = rate("ray_moe_step_phase_seconds_total", 'phase="exchange"')
    expert_actors = m("ray_actors", 'Name="ExpertActor"')
    expert_compute = rate("ray_moe_expert_compute_seconds_total")
    # Zero-padded expert ids, so that the heatmap's rows sort numerically (up to 999 experts).
    padded = (
        f'label_replace(label_replace(sum by (expert) ({expert_tokens}), "expert", "00$1", "expert", '
        f'"(\\\\d)"), "expert", "0$1", "expert", "(\\\\d\\\\d)")'
    )
    rows = [
        Row(
            "Expert load",
            [
                Panel(
                    "Expert load over time",
                    "(token, expert) pairs routed to each expert per second, summed over MoE layers and "
                    "model instances. A bright row is a hot expert.",
                    [(padded, "{{expert}}")],
                    "short",
                    width=24,
                    heatmap=True,
                ),
                Panel(
                    "Per-layer imbalance",
                    "max / mean (token, expert) pairs per expert rank in each MoE layer (1 = balanced; "
                    "the slowest rank sets the layer's pace). Worst model instance shown.",
                    [(f"max by (layer) ({m('ray_moe_expert_imbalance')})", "layer {{layer}}")],
                    "short",
                    width=12,
                    thresholds=[1.5],
                ),
                Panel(
                    "Rows received per expert rank",
                    "Token rows each expert rank received per second (a token counts once per rank "
                    "and MoE layer), measured on the expert actors.",
                    [(f"sum by (shard) ({rate('ray_moe_expert_rows_total')})", "shard {{shard}}")],
                    "short",
                    width=12,
                ),
            ],
        ),
        Row(
            "Step time",
            [
                Panel(
                    "Router time per step, by phase",
                    "Average router time per engine step: attention blocks, dense compute (dense layers, "
                    "shared expert, norms, embedding, LM head), gates, the expert exchange (dispatch, "
                    "waiting for the experts, combine) and scheduling + sampling.",
                    [(per_step(f"sum by (phase) ({rate('ray_moe_step_phase_seconds_total')})"), "{{phase}}")],
                    "s",
                    stacked=True,
                ),
                Panel(
                    "Exchange vs expert compute per step",
                    "Router time in the exchange per step, and each expert rank's compute per step: the "
                    "difference is transport and waiting.",
                    [
                        (
                            per_step(f"sum({exchange})"),
                            "exchange (router)",
                        ),
                        (
                            per_step(f"sum by (shard) ({rate('ray_moe_expert_compute_seconds_total')})"),
                            "expert compute shard {{shard}}",
                        ),
                    ],
                    "s",
                ),
                Panel(
                    "Expert compute busy fraction",
                    "Share of wall time each expert rank spends computing its experts.",
                    [
                        (
                            f"sum by (model_instance, shard) ({expert_compute})",
                            "shard {{shard}}",
                        )
                    ],
                    "percentunit",
                ),
            ],
        ),
        Row(
            "Exchange",
            [
                Panel(
                    "Exchange bytes per second",
                    "Bytes the routers dispatch to expert ranks: activations (payload) and packed expert "
                    "ids and weights (meta). Combine returns one hidden vector per row as well.",
                    [(f"sum by (kind) ({rate('ray_moe_exchange_bytes_total')})", "{{kind}}")],
                    "Bps",
                    width=12,
                    stacked=True,
                ),
                Panel(
                    "Exchange bytes per step",
                    "Dispatch bytes per engine step.",
                    [(per_step(f"sum by (kind) ({rate('ray_moe_exchange_bytes_total')})"), "{{kind}}")],
                    "bytes",
                    width=12,
                ),
            ],
        ),
        Row(
            "Redundant experts and rebalancing",
            [
                Panel(
                    "Replicas per expert",
                    "Slots holding each logical expert, the fewest on any MoE layer (1 without redundant "
                    "experts); online rebalancing gives each layer's hot experts more. Fewest over model "
                    "instances shown.",
                    [(f"min by (expert) ({m('ray_moe_expert_replicas')})", "expert {{expert}}")],
                    "short",
                ),
                Panel(
                    "Rebalancings and bytes loaded",
                    "Online rebalancings of the expert placement since the replica started, and the "
                    "expert weight bytes they read into new slots.",
                    [
                        (f"sum by (model_instance) ({m('ray_moe_expert_rebalances')})", "rebalances"),
                        (
                            f"sum by (model_instance) ({m('ray_moe_expert_rebalance_bytes')})",
                            "bytes {{model_instance}}",
                        ),
                    ],
                    "short",
                ),
                Panel(
                    "Imbalance before and after the last rebalancing",
                    "Per MoE layer max / mean expert rank load, summed over the layers, on the last "
                    "rebalancing's window, with the old placement and with the new one. Worst model "
                    "instance shown.",
                    [(f"max by (when) ({m('ray_moe_expert_rebalance_imbalance')})", "{{when}}")],
                    "short",
                    thresholds=[1.25],
                ),
                Panel(
                    "Expert ranks in the group",
                    "Expert ranks serving now per model instance; below the expert shard count while a "
                    "rank is lost and its replacement loads.",
                    [
                        (
                            f"min by (model_instance) ({m('ray_moe_expert_ranks_in_group')})",
                            "{{model_instance}}",
                        )
                    ],
                    "short",
                ),
                Panel(
                    "Experts without a live replica, failovers",
                    "Logical experts that no serving rank holds (0 normally: above 0 their tokens wait "
                    "for a replacement actor), and the steps re-run on the surviving ranks.",
                    [
                        (f"max({m('ray_moe_experts_without_replica')})", "experts without replica"),
                        (f"sum({m('ray_moe_expert_failovers')})", "failovers"),
                    ],
                    "short",
                    thresholds=[1],
                ),
            ],
        ),
        Row(
            "Health",
            [
                Panel(
                    "Expert actor restarts",
                    "Expert actors replaced after a failure since the engine replica started (the group "
                    "is re-formed and the interrupted step retried).",
                    [(f"max by (model_instance) ({m('ray_moe_expert_restarts')})", "{{model_instance}}")],
                    "short",
                ),
                Panel(
                    "Model instances with all experts alive",
                    "Per engine replica 1 while every expert actor's loop runs.",
                    [
                        (f"sum({m('ray_moe_experts_alive')})", "all experts alive"),
                        (f"count({m('ray_moe_experts_alive')})", "instances"),
                    ],
                    "short",
                ),
                Panel(
                    "Expert actors by state (Ray)",
                    "Ray's own actor states for ExpertActor.",
                    [(f"sum by (State) ({expert_actors})", "{{State}}")],
                    "short",
                ),
            ],
        ),
    ]
    return build(
        "moe-cluster experts",
        "moe-cluster-experts",
        "Expert load, imbalance, the router's step time split, the expert exchange and expert health.",
        rows,
    )


DASHBOARDS = {"moe-cluster-overview.json": overview, "moe-cluster-experts.json": experts}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name]().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare with the committed files only")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write (default: dashboards/)")
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        text, path = render(name), args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run python -m dashboards.generate): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
