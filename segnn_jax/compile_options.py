"""XLA compile options a SEGNN runs faster with, and :func:`jit`, which applies them.

On CPU, recent XLA hands not only matrix multiplies but also reductions and small dots to its
YNNPACK library ("library fusions"). At this model's shapes the library's reductions are several
times slower than XLA's own loop fusions: in the N-body training step, each backward of a gate
(a sum over the 3 components of ``[2000, 32, 3]`` times the sigmoid's derivative) took 0.6-0.8 ms
as a library fusion, a dozen of them per step (``benchmarks/profile_ops.py``). Restricting the
library to dot fusions made the N-body training step about 1.5x faster and the QM9 one about
1.2x (``benchmarks/revisions.py``, numbers in ``benchmarks/README.md``).

The option travels with each compilation (``jax.jit(..., compiler_options=...)``) rather than
through ``XLA_FLAGS``, so it needs no set-up before JAX starts and touches nothing else the
process compiles. It is applied only on the CPU backend and only where the installed jaxlib knows
it; a user's own ``XLA_FLAGS`` setting of the same option wins, and ``SEGNN_XLA_DEFAULTS=1``
turns the tuning off (XLA's defaults, for comparisons).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["CPU_OPTIONS", "DISABLE_VARIABLE", "compiler_options", "jit"]

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
"""What :func:`compiler_options` returns on CPU: YNNPACK library fusions for dots only."""

DISABLE_VARIABLE = "SEGNN_XLA_DEFAULTS"
"""Set to ``1`` to compile with XLA's defaults (:func:`compiler_options` then returns ``{}``)."""


def compiler_options(backend: Optional[str] = None) -> dict:
    """The options this library compiles with on ``backend`` (default: JAX's default backend).

    ``{}`` off CPU, when :data:`DISABLE_VARIABLE` is ``1``, when ``XLA_FLAGS`` already sets one
    of the options, or when the installed jaxlib does not accept them.
    """
    if os.environ.get(DISABLE_VARIABLE, "") == "1":
        return {}
    if any(name in os.environ.get("XLA_FLAGS", "") for name in CPU_OPTIONS):
        return {}
    backend = backend or jax.default_backend()
    return dict(CPU_OPTIONS) if backend == "cpu" and _cpu_accepts_options() else {}


@functools.lru_cache(maxsize=None)
def _cpu_accepts_options() -> bool:
    # An unknown option or enum value fails the compilation; older jaxlibs lack this one.
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            jax.jit(jnp.sum, compiler_options=CPU_OPTIONS).lower(jnp.zeros(2)).compile()
    except Exception:  # noqa: BLE001 -- XlaRuntimeError's module moved between jaxlib versions
        return False
    return True


def jit(fun, **kwargs):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` merged under the caller's own
    ``compiler_options`` (the caller's win).

    JAX accepts compile options only on a top-level ``jit``: called inside another trace (a
    user's own ``jax.jit``, ``lax.scan`` over training steps), the function runs as a plain
    ``jax.jit`` and the outer compilation's options apply. ``lower``, ``trace`` and
    ``eval_shape`` are those of the top-level version.
    """
    options = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    tuned = jax.jit(fun, compiler_options=options or None, **kwargs)
    if not options:
        return tuned
    plain = jax.jit(fun, **kwargs)

    @functools.wraps(fun)
    def call(*args, **call_kwargs):
        traced = any(isinstance(leaf, jax.core.Tracer)
                     for leaf in jax.tree_util.tree_leaves((args, call_kwargs)))
        return (plain if traced else tuned)(*args, **call_kwargs)

    call.lower, call.trace, call.eval_shape = tuned.lower, tuned.trace, tuned.eval_shape
    return call
