"""The data-plane protocol the router and expert ranks speak; `cluster` implements it (shm, gloo, NCCL).

Rank 0 is the router; ranks 1..N are expert shards 0..N-1. Traffic is point to point and only between
the router and each expert rank. A message is a head of HEAD_LEN ints and, when head[ROWS] > 0, that
many payload rows; messages between two ranks arrive in the order they were sent. There is no step
header and no counts collective: a dispatch message's head carries its own row count and layer, so per
MoE layer and micro-batch each direction is one message per expert rank that has rows to compute.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol

import torch

ROUTER_RANK = 0
HEAD_LEN = 4
# Head fields.
OP, LAYER, ROWS, TAG = range(HEAD_LEN)


class Op(IntEnum):
    STOP = 0  # the expert loop ends
    DISPATCH = 1  # router -> expert: rows of one MoE layer (head[LAYER]) for one micro-batch (head[TAG])
    COMBINE = 2  # expert -> router: one partial sum per dispatched row, same LAYER and TAG
    HEARTBEAT = 3  # sent while idle, so expert ranks waiting for work never hit the timeout
    SWITCH = 4  # router -> expert: use the slots prepared for placement version head[LAYER] from now on
    FLUSH = 5  # router -> expert, echoed back: every answer to what was sent before it came first


class Transport(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def send(self, dst: int, head: list[int], payload: torch.Tensor | None = None) -> None:
        """Sends one message to `dst`: `head` (HEAD_LEN ints, head[ROWS] = payload rows) and `payload`.

        Returns without waiting for the peer to read it. The caller must not modify `payload` afterwards
        (an asynchronous transport may still be reading it).
        """

    def recv(self, src: int, width: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
        """The next message from `src`: its head and its payload as [head[ROWS], width] of `dtype`.

        The payload may be a view of the transport's own buffer, valid until the next recv from `src`.
        Raises TransportError when `src` is dead or nothing arrives within the transport's timeout.
        """

    def close(self) -> None: ...


def head(op: Op, layer: int = 0, rows: int = 0, tag: int = 0) -> list[int]:
    return [int(op), layer, rows, tag]
