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

Some options pay for one model and cost another, so they are not defaults but choices of an
experiment's config (``config.train.compiler_options``, passed to :func:`jit`). XLA's newer
"fusion emitters" (``xla_cpu_use_fusion_emitters``, on by default) compile QM9's scanned training
step about 6 s slower than the legacy emitters (medians 31.8 s against 25.7 s on a 2-core
CPU), with more memory and no faster step, while the N-body step is 1.6x faster with them
(``benchmarks/README.md``): the QM9 configs turn them off.
Options passed to :func:`jit` follow the same rules as the library's own: an ``xla_cpu_*`` option
applies on the CPU backend only, and an option that ``XLA_FLAGS`` sets is left to ``XLA_FLAGS``.
"""

from __future__ import annotations

import functools
import os
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

__all__ = ["CPU_OPTIONS", "DISABLE_VARIABLE", "check_options", "compiler_options", "jit",
           "resolve_options"]

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
"""What :func:`compiler_options` returns on CPU: YNNPACK library fusions for dots only."""

DISABLE_VARIABLE = "SEGNN_XLA_DEFAULTS"
"""Set to ``1`` to compile with XLA's defaults (:func:`compiler_options` then returns ``{}``;
options a caller or a config passes explicitly still apply)."""


def compiler_options(backend: Optional[str] = None) -> dict:
    """The options this library compiles with on ``backend`` (default: JAX's default backend).

    ``{}`` off CPU, when :data:`DISABLE_VARIABLE` is ``1``, or when the installed jaxlib does not
    accept them; an option that ``XLA_FLAGS`` already sets is left out.
    """
    if os.environ.get(DISABLE_VARIABLE, "") == "1":
        return {}
    backend = backend or jax.default_backend()
    if backend != "cpu" or not _cpu_accepts_options():
        return {}
    return _without_user_flags(CPU_OPTIONS)


def resolve_options(extra: Optional[Mapping] = None, backend: Optional[str] = None) -> dict:
    """The options :func:`jit` compiles with: :func:`compiler_options` updated with ``extra``
    (a caller's or a config's options win over the library's), less the ``xla_cpu_*`` ones off
    the CPU backend and those that ``XLA_FLAGS`` sets (the user's environment wins).
    """
    backend = backend or jax.default_backend()
    options = {**compiler_options(backend), **dict(extra or {})}
    if backend != "cpu":
        options = {k: v for k, v in options.items() if not k.startswith("xla_cpu_")}
    return _without_user_flags(options)


def check_options(options: Optional[Mapping]) -> None:
    """Raises ``ValueError`` naming the first option of ``options`` that XLA does not accept
    (an unknown name, or a value of the wrong kind), by compiling a trivial function with each.

    XLA would otherwise refuse them only when the first real function compiles.
    """
    for name, value in (options or {}).items():
        if not isinstance(name, str) or not name.startswith("xla_"):
            raise ValueError(f"{name!r}: XLA option names start with 'xla_'")
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"{name}: expected a bool, number or string, got {value!r}")
        single = resolve_options({name: value})
        if name not in single:
            continue  # not for this backend, or left to XLA_FLAGS
        try:
            jax.jit(jnp.sum, compiler_options=single).lower(jnp.zeros(2)).compile()
        except Exception as error:  # noqa: BLE001 -- XlaRuntimeError's module moved
            raise ValueError(f"{name}={value!r}: XLA refuses it: {error}") from None


def _without_user_flags(options: Mapping) -> dict:
    named = {flag.lstrip("-").split("=", 1)[0] for flag in os.environ.get("XLA_FLAGS", "").split()}
    return {name: value for name, value in options.items() if name not in named}


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
    """``jax.jit(fun, **kwargs)`` compiled with :func:`resolve_options` of the caller's own
    ``compiler_options`` (the library's options updated with the caller's).

    JAX accepts compile options only on a top-level ``jit``: called inside another trace (a
    user's own ``jax.jit``, ``lax.scan`` over training steps), the function runs as a plain
    ``jax.jit`` and the outer compilation's options apply. ``lower``, ``trace`` and
    ``eval_shape`` are those of the top-level version.
    """
    options = resolve_options(kwargs.pop("compiler_options", None))
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
