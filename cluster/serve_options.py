"""Options of the Serve application: the `args` of a Serve config, KubeRay's serveConfigV2 included."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.config import EngineConfig

APP_IMPORT_PATH = "cluster.serve_app:build_app"


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    def to_serve(self, policy: str | None = None) -> dict[str, Any]:
        config = self.model_dump()
        if policy:
            config["policy"] = {"policy_function": policy}
        return config


class ServeOptions(BaseModel):
    """Everything `moe-cluster serve`, `serve-config` and the Helm chart can set."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model directory on every node; default: the demo model")
    served_model_name: str | None = None
    expert_shards: int = Field(1, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    router_cpus: float = Field(1.0, gt=0)
    expert_cpus: float = Field(1.0, gt=0)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int = Field(4096, ge=2)
    max_waiting: int = Field(256, ge=0)
    kv_cache_bytes: int | None = Field(None, ge=1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    collective_timeout_s: float = Field(60.0, gt=0, description="a stalled expert group fails after this")
    metrics: bool = True
    expert_layer_metrics: bool = False
    max_request_bytes: int = Field(1 << 20, ge=1024)
    api_keys_env: str = "MOE_CLUSTER_API_KEYS"
    api_key_file: str | None = None
    engine_autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    ingress_autoscaling: Autoscaling = Field(default_factory=lambda: Autoscaling(target_ongoing_requests=64))

    def model_path(self) -> Path:
        if self.model:
            return Path(self.model)
        from cluster.demo import demo_model_path

        return demo_model_path()

    def model_name(self) -> str:
        return self.served_model_name or (Path(self.model).name if self.model else "moe-cluster-demo")

    def engine_config(self) -> EngineConfig:
        """Built where the model is (in the engine replica), since it checks the directory."""
        return EngineConfig(
            model_path=self.model_path(),
            expert_shards=self.expert_shards,
            device=self.device,
            dtype=self.dtype,
            router_cpus=self.router_cpus,
            expert_cpus=self.expert_cpus,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            max_waiting=self.max_waiting,
            kv_cache_bytes=self.kv_cache_bytes,
            placement_strategy=self.placement_strategy,
            metrics=self.metrics,
            expert_layer_metrics=self.expert_layer_metrics,
        )

    def api_keys(self) -> set[str]:
        keys = {k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()}
        if self.api_key_file:
            keys |= {k.strip() for k in Path(self.api_key_file).read_text().splitlines() if k.strip()}
        return keys
