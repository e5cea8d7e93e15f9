"""Options of the Serve application: the `args` of a Serve config, KubeRay's serveConfigV2 included."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.options.engine import EngineConfig, EngineOptions, engine_options

# What `serve-config` writes as the application's import path. `cluster.serve_app:build_app`, written by
# earlier versions, still imports.
APP_IMPORT_PATH = "cluster.serve.app:build_app"


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


class ServeOptions(EngineOptions):
    """Everything `moe-cluster serve`, `serve-config` and the Helm chart can set."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    model: str | None = Field(None, description="model directory on every node; default: the demo model")
    served_model_name: str | None = None
    max_request_bytes: int = Field(1 << 20, ge=1024)
    api_keys_env: str = "MOE_CLUSTER_API_KEYS"
    api_key_file: str | None = None
    tool_call_parser: Literal["auto", "hermes", "trinity"] = Field(
        "auto", description="how tool calls are read from the model's text; auto: from the model (Trinity)"
    )
    engine_autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    ingress_autoscaling: Autoscaling = Field(default_factory=lambda: Autoscaling(target_ongoing_requests=64))

    def tool_parser(self) -> str:
        """auto is trinity: the models served (AFMoE) write Hermes-style calls after optional think tags."""
        return "trinity" if self.tool_call_parser == "auto" else self.tool_call_parser

    def model_path(self) -> Path:
        if self.model:
            return Path(self.model)
        from cluster.demo import demo_model_path

        return demo_model_path()

    def model_name(self) -> str:
        return self.served_model_name or (Path(self.model).name if self.model else "moe-cluster-demo")

    def engine_config(self) -> EngineConfig:
        """Built where the model is (in the engine replica), since it checks the directory."""
        return EngineConfig(model_path=self.model_path(), **engine_options(self))

    def check_model_here(self) -> None:
        """Where the model directory is visible (the CLI, the Serve app's builder on a node that has
        it), the engine config's checks against the model run now rather than in the replica."""
        if self.model_path().is_dir():
            self.engine_config()

    def api_keys(self) -> set[str]:
        keys = {k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()}
        if self.api_key_file:
            keys |= {k.strip() for k in Path(self.api_key_file).read_text().splitlines() if k.strip()}
        return keys
