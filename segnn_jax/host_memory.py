"""Host-memory policy for CPU runs: keep freed buffers in the process instead of unmapping them.

XLA's CPU runtime allocates the scratch buffer of a compiled function (all its intermediates, one
block) on every call and frees it on return. glibc's ``malloc`` serves blocks larger than its
mmap threshold (32 MB at most) with a fresh ``mmap`` and returns them to the kernel on ``free``,
so every call of a training step page-faults and zeroes its whole scratch buffer again: the
N-body training step (a 40 MB buffer) took 9,800 minor page faults and 34 ms of kernel time per
step on the project's 2-core CPU, a third of its CPU time.

:func:`retain_freed_memory` tells glibc to serve large blocks from its heap and not to trim it,
so the next call reuses the pages of the last one. The price: memory freed by the process is
kept for reuse instead of returned to the system (the resident size stays at its peak), and all
threads allocate from one arena. Elsewhere than glibc (macOS, musl, an accelerator's device
memory) it does nothing.

It is opt-in. Since the library compiles with its own XLA options
(:mod:`segnn_jax.compile_options`), the N-body step's buffer stays under the threshold and the
one shared arena costs more than the faults it saves: interleaved on the 2-core CPU, the N-body
training step took 45.5 ms with glibc's defaults and 56.7 ms under this policy, while QM9's
(a 1 GB buffer, scanned layers) took 3.35 s and 3.13 s. The command-line entry points (``segnn``,
the benchmarks) apply it when :data:`REQUEST_VARIABLE` is ``1``
(:func:`retain_freed_memory_if_requested`); a library user calls :func:`retain_freed_memory` once
at start-up for large models.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["DISABLE_VARIABLE", "REQUEST_VARIABLE", "retain_freed_memory",
           "retain_freed_memory_if_requested"]

# mallopt parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

DISABLE_VARIABLE = "SEGNN_RETURN_FREED_MEMORY"
"""Set to ``1`` to keep glibc's default policy (:func:`retain_freed_memory` then does nothing)."""

REQUEST_VARIABLE = "SEGNN_RETAIN_FREED_MEMORY"
"""Set to ``1`` to have the command-line entry points apply :func:`retain_freed_memory`."""

_applied = False


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def retain_freed_memory() -> bool:
    """Keeps freed host memory in the process's heap for reuse (glibc only; idempotent).

    Sets glibc's ``M_MMAP_MAX`` to 0 (no block gets its own mapping, so none is unmapped on
    ``free``), ``M_TRIM_THRESHOLD`` to -1 (trimming off: the heap is never shrunk; mallopt(3))
    and ``M_ARENA_MAX`` to 1: XLA runs compiled code on its own threads, and a thread's own arena
    is made of 64 MB heaps, so a larger block (QM9's scratch buffer is about 1 GB) would be
    mapped anyway; in the one main arena it is not. It acts on allocations made afterwards, and
    the arena limit on threads started afterwards: call it before the first JAX computation.

    Returns:
        True if the policy is in force (now or from an earlier call), False where it does not
        apply: not glibc, or ``SEGNN_RETURN_FREED_MEMORY=1`` in the environment.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(DISABLE_VARIABLE, "").strip() not in ("", "0"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = all(libc.mallopt(parameter, value) == 1 for parameter, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1)))
    _applied = ok
    return ok


def retain_freed_memory_if_requested() -> bool:
    """:func:`retain_freed_memory` if :data:`REQUEST_VARIABLE` is ``1`` in the environment (what
    the ``segnn`` command and the benchmarks do at start-up); returns whether the policy is in
    force."""
    if os.environ.get(REQUEST_VARIABLE, "").strip() != "1":
        return _applied
    return retain_freed_memory()
