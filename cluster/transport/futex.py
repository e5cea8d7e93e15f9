"""Linux futexes on shared memory, so a process can sleep until a peer changes a word it waits on.

Shared (not private) futexes are keyed by the page's backing file, so two processes that mapped the
same /dev/shm segment wait and wake on the same word. ctypes releases the GIL for the syscall.
"""

from __future__ import annotations

import ctypes
import platform
import threading

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = ctypes.CDLL(None, use_errno=True)
_fence_lock = threading.Lock()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def available() -> bool:
    return _SYS_FUTEX is not None


def wait(address: int, expected: int, timeout_s: float) -> None:
    """Sleeps while the u32 at `address` equals `expected`, at most `timeout_s` (spurious wakeups happen)."""
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _libc.syscall(
        _SYS_FUTEX,
        ctypes.c_void_p(address),
        _FUTEX_WAIT,
        ctypes.c_uint32(expected & 0xFFFFFFFF),
        ctypes.byref(ts),
        None,
        0,
    )


def wake(address: int) -> None:
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAKE, 1, None, None, 0)


def fence() -> None:
    """A full memory barrier between a store and a later load of another word (the store-load order x86
    does not keep): taking a lock is an atomic read-modify-write, which orders both."""
    _fence_lock.acquire()
    _fence_lock.release()
