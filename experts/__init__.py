"""Expert shards of a sparse MoE model: placement, checkpoint loading and SwiGLU compute (plain torch)."""

from experts.checkpoint import CheckpointError, CheckpointReader
from experts.placement import ExpertPlacement, ModelPlacement
from experts.shard import ExpertShard

__all__ = ["CheckpointError", "CheckpointReader", "ExpertPlacement", "ExpertShard", "ModelPlacement"]
