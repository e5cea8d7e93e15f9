"""The Python API: one model instance on a Ray cluster (a router actor and its expert actors in one
placement group), driven with whole requests."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.instance.prompts import Prompt
from cluster.instance.resources import config_bundles, ensure_ray, resolve_device
from cluster.instance.router_actor import Completion, RouterActor
from cluster.options.engine import EngineConfig
from experts.checkpoint import CheckpointReader
from router.config import ModelConfig
from router.sampling import SamplingParams


class Engine:
    """`Engine(model_path, expert_shards=N)` or `Engine(EngineConfig(...))`; also a context manager."""

    def __init__(self, config: EngineConfig | str | Path, **options: Any) -> None:
        if not isinstance(config, EngineConfig):
            config = EngineConfig(model_path=Path(config), **options)
        elif options:
            config = config.model_copy(update=options)
        _check_checkpoint(config)
        required = config.router_cpus + config.expert_shards * config.expert_cpus
        self._started_ray = ensure_ray(required)
        self.config = config.model_copy(
            update={"device": resolve_device(config.device, config.expert_shards)}
        )
        self.use_gpu = self.config.use_gpu
        self._pg: PlacementGroup | None = None
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        cfg = self.config
        bundles = config_bundles(cfg)
        self._pg = placement_group(bundles, strategy=cfg.placement_strategy)
        ray.get(self._pg.ready(), timeout=cfg.ready_timeout_s)
        self.router = RouterActor.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=0),
            num_cpus=bundles[0]["CPU"],
            num_gpus=bundles[0].get("GPU", 0),
        ).remote(cfg)
        _get(self.router.info.remote())

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> list[Completion]:
        """A prompt is text or a list of token ids; returns one Completion per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            ignore_eos=ignore_eos,
        )
        return _get(self.router.generate.remote(list(prompts), [params] * len(prompts)))

    def logits(self, token_ids: Prompt) -> torch.Tensor:
        """fp32 prefill logits [len, vocab] for one prompt."""
        return _get(self.router.logits.remote(token_ids))

    def stats(self, reset: bool = False) -> dict:
        """The router's step and exchange counters (see RouterActor.stats); reset=True zeroes them."""
        return ray.get(self.router.stats.remote(reset))

    def expert_counters(self) -> list[dict]:
        """Per expert shard, what its actor served since it started: dispatches, rows, compute seconds."""
        return _get(self.router.expert_counters.remote())

    def info(self) -> dict:
        return _get(self.router.info.remote())

    def shutdown(self) -> None:
        router = getattr(self, "router", None)
        if router is not None:
            with contextlib.suppress(ray.exceptions.RayError, TimeoutError):  # killed below either way
                ray.get(router.stop.remote(), timeout=60)
            ray.kill(router)
            self.router = None
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _check_checkpoint(config: EngineConfig) -> None:
    """Fails in the caller's process, before any actor starts, on a checkpoint no actor could load."""
    model = ModelConfig.from_model_dir(config.model_path)
    CheckpointReader(config.model_path)
    if config.expert_shards > model.num_experts:
        raise ValueError(
            f"expert_shards={config.expert_shards} exceeds the model's {model.num_experts} experts"
        )


def _get(ref: ray.ObjectRef) -> Any:
    """ray.get that raises a request's own error (bad input) as itself, not wrapped in Ray's."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ValueError):
            raise err.cause from None
        raise
