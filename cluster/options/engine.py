"""The engine's options, each defined once.

`EngineOptions` is every knob of a model instance. `EngineConfig` adds the model directory (checked to
exist where the engine starts), `ServeOptions` (cluster/options/serve.py) adds the Serve application's
own fields, and the CLI flags (cluster/options/flags.py) and the Helm schema are generated from these
fields, so no option is spelled twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import torch

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class EngineOptions(BaseModel):
    """What a user tunes about one model instance (router + expert actors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expert_shards: int = Field(1, ge=1, description="expert actors per model instance")
    placement: Literal["contiguous", "round_robin"] = Field(
        "contiguous", description="which shard owns which expert"
    )
    redundant_experts: int = Field(
        0,
        ge=0,
        description="extra expert slots spread over the shards, each holding a replica of a hot expert; at "
        "most num_experts x (expert_shards - 1)",
    )
    eplb: bool = Field(
        True, description="rebalance the replicas online from the observed load (when redundant_experts > 0)"
    )
    eplb_interval_s: float = Field(30.0, gt=0, description="seconds between two online rebalancings")
    eplb_window_s: float = Field(
        60.0, gt=0, description="seconds of routed load each rebalancing looks at (a sliding window)"
    )
    device: Device = Field("auto", description="auto: cuda when the cluster has a GPU per actor")
    dtype: Dtype = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU")
    router_cpus: float = Field(1.0, gt=0, description="CPUs of the router actor")
    expert_cpus: float = Field(1.0, gt=0, description="CPUs of each expert actor")
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens in one engine step")
    max_model_len: int | None = Field(
        None, ge=2, description="prompt + output tokens of one sequence; default: the model's context length"
    )
    max_waiting: int = Field(256, ge=0, description="requests queued beyond max_num_seqs before 429")
    kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="KV cache budget; default (CPU): max_num_seqs sequences of up to 4,096 tokens, and at "
        "least one whole max_model_len sequence",
    )
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    prefix_caching: bool = Field(
        True, description="reuse the KV blocks of prompt prefixes computed before (automatic prefix caching)"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of GPU memory for weights + KV cache"
    )
    transport: Literal["auto", "shm", "gloo"] = Field(
        "auto", description="CPU data plane: auto = shared memory within a node, gloo across nodes"
    )
    collective_timeout_s: float = Field(60.0, gt=0, description="a stalled expert group fails after this")
    placement_strategy: PlacementStrategy = Field(
        "PACK", description="placement group strategy of an instance's bundles"
    )
    ready_timeout_s: float = Field(300.0, gt=0, description="seconds for an instance to come up")
    overlap: bool | None = Field(
        None,
        description="two-batch overlap: steps of 2+ sequences and 8+ tokens run as two micro-batches, the "
        "router computing one while the expert actors compute the other; unset: on where every expert "
        "rank shares memory with the router (measured faster, benchmarks/results/"
        "engine_vs_transformers-20261202T1737Z.json), off over gloo (measured slower) and NCCL (not "
        "measured yet)",
    )
    metrics: bool = Field(True, description="export moe_* metrics through Ray's metrics agent")
    expert_layer_metrics: bool = Field(
        False, description="also a tokens series per (layer, expert): layers x experts series per instance"
    )


class EngineConfig(EngineOptions):
    """EngineOptions for one model directory."""

    model_path: Path

    @field_validator("model_path")
    @classmethod
    def _model_dir_exists(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
        return path.resolve()

    @model_validator(mode="after")
    def _experts_fit(self) -> EngineConfig:
        from experts.placement import check_layout
        from router.config import ConfigError, ModelConfig

        try:
            experts = ModelConfig.from_model_dir(self.model_path).num_experts
        except ConfigError:
            return self  # not a model the engine reads: its own checks say so where it starts
        check_layout(experts, self.expert_shards, self.redundant_experts)
        return self

    @property
    def use_gpu(self) -> bool:
        """Resolved by whoever starts the instance (Engine, the Serve app) before actors see it."""
        return self.device == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.use_gpu else torch.float32
        return getattr(torch, self.dtype)


def engine_options(source: BaseModel) -> dict:
    """The EngineOptions fields of any options model that extends them (ServeOptions, CLI args)."""
    return {name: getattr(source, name) for name in EngineOptions.model_fields}
