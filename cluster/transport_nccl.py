"""The data plane on GPUs: NCCL through cupy, all-to-all as grouped point-to-point calls.

The router creates the NCCL unique id and hands it to the expert actors through Ray. Every call is
enqueued on the current torch CUDA stream, so it orders with the surrounding torch kernels.
"""

from __future__ import annotations

import torch

from router.transport import HEADER_LEN, ROUTER_RANK, TransportError


def new_unique_id() -> tuple[int, ...]:
    from cupy.cuda import nccl

    return nccl.get_unique_id()


def _nccl_dtype(dtype: torch.dtype) -> int:
    from cupy.cuda import nccl

    table = {
        torch.float32: nccl.NCCL_FLOAT32,
        torch.float16: nccl.NCCL_FLOAT16,
        torch.bfloat16: nccl.NCCL_BFLOAT16,
        torch.int64: nccl.NCCL_INT64,
    }
    if dtype not in table:
        raise TransportError(f"NCCL transport does not carry {dtype}")
    return table[dtype]


class _Pending:
    def __init__(self, event: torch.cuda.Event, out: torch.Tensor) -> None:
        self._event, self._out = event, out

    def wait(self) -> torch.Tensor:
        torch.cuda.current_stream().wait_event(self._event)
        return self._out


class NcclTransport:
    def __init__(self, unique_id: tuple[int, ...], rank: int, world_size: int) -> None:
        from cupy.cuda import nccl

        self._nccl = nccl
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device())
        try:
            self.comm = nccl.NcclCommunicator(world_size, unique_id, rank)
        except nccl.NcclError as err:
            raise TransportError(f"NCCL communicator init failed: {err}") from err

    def _stream(self) -> int:
        return torch.cuda.current_stream().cuda_stream

    def broadcast_header(self, header: torch.Tensor | None) -> torch.Tensor:
        buf = (header if header is not None else torch.zeros(HEADER_LEN, dtype=torch.int64)).to(self.device)
        ptr = buf.data_ptr()
        self.comm.broadcast(ptr, ptr, HEADER_LEN, self._nccl.NCCL_INT64, ROUTER_RANK, self._stream())
        return buf.cpu()

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> _Pending:
        send = send.contiguous()
        out = send.new_empty(sum(recv_splits), *send.shape[1:])
        row = send[0].numel() if send.shape[0] else out[0].numel() if out.shape[0] else 0
        dtype = _nccl_dtype(send.dtype)
        stream = self._stream()
        size = send.element_size()
        send_off = recv_off = 0
        self._nccl.groupStart()
        for peer in range(self.world_size):
            if send_splits[peer]:
                self.comm.send(
                    send.data_ptr() + send_off * row * size, send_splits[peer] * row, dtype, peer, stream
                )
            if recv_splits[peer]:
                self.comm.recv(
                    out.data_ptr() + recv_off * row * size, recv_splits[peer] * row, dtype, peer, stream
                )
            send_off += send_splits[peer]
            recv_off += recv_splits[peer]
        self._nccl.groupEnd()
        event = torch.cuda.Event()
        event.record()
        return _Pending(event, out)

    def close(self) -> None:
        self.comm.destroy()
