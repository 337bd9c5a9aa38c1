"""Optimisers and learning-rate schedules built from a config section.

The options (all in one flat section, see :data:`OPTIMIZER_DEFAULTS`):

* ``optimizer``: ``"adam"`` is Adam with *L2* weight decay as PyTorch's ``Adam(weight_decay=wd)``
  applies it (``wd * param`` is added to the gradient before the moment estimates, so the decay is
  rescaled by Adam like any gradient); ``"adamw"`` is decoupled decay as PyTorch's ``AdamW``
  (``param -= lr * wd * param`` next to the Adam step).
* ``learning_rate`` (> 0), ``weight_decay`` (>= 0), ``b1``, ``b2``, ``eps``.
* ``schedule``: ``"constant"``; ``"multistep"``, which multiplies the rate by ``decay_factor`` at
  each boundary, the boundaries given either as ``decay_epochs`` (absolute epochs, e.g. OC20's
  10/14/18) or as ``decay_fractions`` of the total number of steps (QM9's x0.1 at 80% and 90%);
  ``"cosine"``, which decays from ``learning_rate`` to ``min_learning_rate`` over the steps after
  the warm-up.
* ``warmup_epochs`` / ``warmup_steps``: linear warm-up, step s (0-based) uses
  ``(s + 1) / warmup_steps`` of the scheduled rate, so the first update is never a no-op.
* ``grad_clip_norm``: clip the gradient by its global norm before anything else (before the L2 term,
  as ``torch.nn.utils.clip_grad_norm_`` followed by ``optimizer.step()``); ``None`` disables it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["OPTIMIZER_DEFAULTS", "make_optimizer", "make_schedule"]

OPTIMIZER_DEFAULTS = {
    "optimizer": "adam",
    "learning_rate": 5e-4,
    "weight_decay": 0.0,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "schedule": "constant",
    "decay_factor": 0.1,
    "decay_fractions": (),
    "decay_epochs": (),
    "min_learning_rate": 0.0,
    "warmup_epochs": 0.0,
    "warmup_steps": 0,
    "grad_clip_norm": None,
}

_OPTIMIZERS = ("adam", "adamw")
_SCHEDULES = ("constant", "multistep", "cosine")


def _get(config: Mapping[str, Any], key: str) -> Any:
    value = config.get(key, None) if hasattr(config, "get") else None
    return OPTIMIZER_DEFAULTS[key] if value is None and key != "grad_clip_norm" else value


def _warmup_steps(config: Mapping[str, Any], steps_per_epoch: Optional[int]) -> int:
    steps = int(_get(config, "warmup_steps") or 0)
    epochs = float(_get(config, "warmup_epochs") or 0.0)
    if epochs > 0:
        if steps_per_epoch is None:
            raise ValueError("warmup_epochs needs steps_per_epoch")
        steps = max(steps, int(round(epochs * steps_per_epoch)))
    return steps


def _boundaries(config: Mapping[str, Any], total_steps: int,
                steps_per_epoch: Optional[int]) -> np.ndarray:
    epochs = tuple(_get(config, "decay_epochs") or ())
    fractions = tuple(_get(config, "decay_fractions") or ())
    if epochs and fractions:
        raise ValueError("give decay_epochs or decay_fractions, not both")
    if epochs:
        if steps_per_epoch is None:
            raise ValueError("decay_epochs needs steps_per_epoch")
        bounds = [int(e) * steps_per_epoch for e in epochs]
    else:
        bounds = [int(round(float(f) * total_steps)) for f in fractions]
    return np.asarray(sorted(bounds), dtype=np.int64)


def make_schedule(config: Mapping[str, Any], *, total_steps: int,
                  steps_per_epoch: Optional[int] = None) -> Callable[[Any], Any]:
    """The learning rate as a function of the (0-based) optimiser step.

    Args:
        config: optimiser section (see the module docstring); missing keys take the defaults.
        total_steps: number of optimiser steps of the whole run (for fractions and cosine).
        steps_per_epoch: needed when ``warmup_epochs`` or ``decay_epochs`` are used.

    Returns:
        ``schedule(step) -> learning rate``, traceable by ``jit`` and callable on Python ints.

    >>> s = make_schedule({"schedule": "multistep", "learning_rate": 1.0,
    ...                    "decay_fractions": (0.8, 0.9)}, total_steps=100)
    >>> [round(float(s(i)), 6) for i in (79, 80, 89, 90)]
    [1.0, 0.1, 0.1, 0.01]
    """
    name = _get(config, "schedule")
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}, expected one of {_SCHEDULES}")
    base = float(_get(config, "learning_rate"))
    factor = float(_get(config, "decay_factor"))
    warmup = _warmup_steps(config, steps_per_epoch)
    bounds = _boundaries(config, total_steps, steps_per_epoch) if name == "multistep" else None
    min_lr = float(_get(config, "min_learning_rate"))
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step)
        if name == "multistep":
            n_passed = jnp.sum(step >= jnp.asarray(bounds)) if len(bounds) else 0
            lr = base * jnp.power(factor, n_passed)
        elif name == "cosine":
            t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
            lr = min_lr + (base - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        else:
            lr = jnp.asarray(base)
        if warmup > 0:
            lr = lr * jnp.minimum(1.0, (step + 1) / warmup)
        return lr

    return schedule


def make_optimizer(config: Mapping[str, Any], *, total_steps: int,
                   steps_per_epoch: Optional[int] = None
                   ) -> Tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """An optax optimiser and its learning-rate schedule from an optimiser config section.

    Args:
        config: optimiser section (dict or ``ml_collections.ConfigDict``); see the module docstring.
        total_steps: optimiser steps of the whole run.
        steps_per_epoch: optimiser steps per epoch (for epoch-based warm-up and decay).

    Returns:
        ``(optimizer, schedule)``.

    Raises:
        ValueError: unknown optimiser or schedule, or inconsistent decay options.
    """
    name = _get(config, "optimizer")
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}, expected one of {_OPTIMIZERS}")
    schedule = make_schedule(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    wd = float(_get(config, "weight_decay"))
    b1, b2, eps = float(_get(config, "b1")), float(_get(config, "b2")), float(_get(config, "eps"))
    clip = config.get("grad_clip_norm", None) if hasattr(config, "get") else None
    parts = [optax.clip_by_global_norm(float(clip))] if clip is not None else []
    if name == "adam":
        # PyTorch Adam(weight_decay): g <- g + wd * p, then the Adam moments; the order matters.
        if wd > 0:
            parts.append(optax.add_decayed_weights(wd))
        parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                  optax.scale_by_learning_rate(schedule)]
    else:
        parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd))
    return optax.chain(*parts), schedule
