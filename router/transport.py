"""The data-plane protocol the router and expert ranks speak; `cluster` implements it (gloo, NCCL).

Rank 0 is the router; ranks 1..N are expert shards 0..N-1. Every rank takes part in every
collective: a step starts with a header broadcast from the router, then each MoE layer is one
counts exchange, one dispatch and one combine `all_to_all`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol

import torch

ROUTER_RANK = 0
HEADER_LEN = 4


class Op(IntEnum):
    STOP = 0
    FORWARD = 1
    HEARTBEAT = 2  # sent while idle, so expert ranks waiting for a header never hit the collective timeout


class PendingTensor(Protocol):
    def wait(self) -> torch.Tensor: ...


class Transport(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def broadcast_header(self, header: torch.Tensor | None) -> torch.Tensor:
        """Router passes an int64 [HEADER_LEN] tensor; the other ranks pass None and receive it."""

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> PendingTensor:
        """Rows of `send` go to ranks by `send_splits`; the result holds `recv_splits` rows per rank.

        Returns at once; `wait()` yields the received rows, so the caller can overlap compute.
        """

    def close(self) -> None: ...


def header(op: Op, num_tokens: int = 0, step: int = 0) -> torch.Tensor:
    return torch.tensor([int(op), num_tokens, step, 0], dtype=torch.int64)
