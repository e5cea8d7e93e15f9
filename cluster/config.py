"""What a user configures about an engine, validated before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: Path
    expert_shards: int = Field(1, ge=1, description="expert actors per model instance")
    placement: Literal["contiguous", "round_robin"] = "contiguous"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    router_cpus: float = Field(1.0, gt=0)
    expert_cpus: float = Field(1.0, gt=0)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int = Field(4096, ge=2)
    max_waiting: int = Field(1024, ge=0)
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="default: room for max_num_seqs full sequences"
    )
    block_size: int = Field(16, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory for weights + KV")
    collective_timeout_s: float = Field(60.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    ready_timeout_s: float = Field(300.0, gt=0)
    metrics: bool = Field(True, description="export moe_* metrics through Ray's metrics agent")
    expert_layer_metrics: bool = Field(
        False, description="also a tokens series per (layer, expert): layers x experts series per instance"
    )

    @field_validator("model_path")
    @classmethod
    def _model_dir_exists(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
        return path.resolve()

    @property
    def use_gpu(self) -> bool:
        if self.device == "auto":
            return torch.cuda.is_available()
        return self.device == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.use_gpu else torch.float32
        return DTYPES[self.dtype]
