"""Options of the training engine and their validation, done before the model compiles (XLA
options in ``compiler_options`` are tried on a trivial function).

Configs may be plain nested dicts or ``ml_collections.ConfigDict``; every error is a
:class:`ConfigError` whose message starts with the dotted name of the offending option, e.g.
``config.train.optimizer.learning_rate``.
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import Any, Dict, Mapping, Optional

from segnn_jax.compile_options import check_options
from segnn_jax.training.optim import OPTIMIZER_DEFAULTS

__all__ = [
    "ConfigError",
    "TRAIN_DEFAULTS",
    "check_budgets",
    "check_known_options",
    "default_train_config",
    "to_dict",
    "validate_train_config",
]


class ConfigError(ValueError):
    """An option of a config is unknown or has an invalid value; the message names the option."""


TRAIN_DEFAULTS: Dict[str, Any] = {
    "num_epochs": 10,
    "seed": 0,
    "eval_every": 1,
    "log_every": 50,
    "checkpoint_every_steps": 0,
    "keep_checkpoints": 2,
    "best_metric": "loss",
    "best_mode": "min",
    # Decay of the weight average (None: no average). The decay at step t is
    # min(ema_decay, (1 + t) / (10 + t)): the warm-up term is the smaller one for the first
    # 9 / (1 - ema_decay) - 10 steps (8,990 for 0.999), so shorter runs average the same whatever
    # the option (segnn_jax.training.step.make_train_step).
    "ema_decay": None,
    "eval_with_ema": True,
    "tensorboard": True,
    "progress_bar": True,
    "time_budget_s": None,
    # XLA options for compiling the training and evaluation steps, on top of the library's own
    # (segnn_jax.compile_options): option name -> value, e.g. the QM9 configs'
    # {"xla_cpu_use_fusion_emitters": False}. Any XLA option name is allowed; XLA checks them.
    "compiler_options": {},
    "optimizer": dict(OPTIMIZER_DEFAULTS),
}

FREE_FORM_OPTIONS = ("compiler_options",)
"""Sections of :data:`TRAIN_DEFAULTS` whose keys are not fixed (checked by their own rules)."""


def default_train_config() -> Dict[str, Any]:
    """A fresh copy of the engine's options with their defaults (a plain nested dict).

    Experiment config files put it under ``config.train``, e.g.
    ``config.train = ml_collections.ConfigDict(default_train_config())``.
    """
    return copy.deepcopy(TRAIN_DEFAULTS)


def to_dict(config: Any) -> Any:
    """Plain nested dicts/lists from a ConfigDict, dict, or anything else (returned as is)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def check_known_options(config: Any, reference: Any, *, name: str = "config") -> None:
    """Raises if ``config`` has an option (at any depth) that ``reference`` does not have.

    Args:
        config: the config given by the user.
        reference: the defaults that list every allowed option (a nested dict or ConfigDict).
        name: dotted prefix used in messages.

    Raises:
        ConfigError: naming the unknown option and the closest known one.
    """
    config, reference = to_dict(config), to_dict(reference)
    if not isinstance(config, Mapping) or not isinstance(reference, Mapping):
        return
    for key, value in config.items():
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference), n=1)
            hint = f"; did you mean {name}.{close[0]}?" if close else ""
            raise ConfigError(f"{name}.{key}: unknown option{hint}")
        if isinstance(reference[key], Mapping) and key not in FREE_FORM_OPTIONS:
            check_known_options(value, reference[key], name=f"{name}.{key}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _positive(config: Mapping, key: str, name: str, *, integer: bool = False,
              allow_zero: bool = False) -> None:
    value = config.get(key)
    if value is None:
        return
    x = _number(value, f"{name}.{key}")
    if integer and x != int(x):
        raise ConfigError(f"{name}.{key}: expected an integer, got {value!r}")
    if x < 0 or (x == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}.{key}: must be {bound}, got {value!r}")


def validate_train_config(config: Any, *, name: str = "config.train") -> Dict[str, Any]:
    """Checks the engine's section and returns it as a plain dict with defaults filled in.

    Args:
        config: the ``train`` section (dict or ConfigDict); missing options take the defaults.
        name: dotted name of the section, used in messages.

    Returns:
        The section as a plain nested dict, completed with :data:`TRAIN_DEFAULTS`.

    Raises:
        ConfigError: unknown option, or an invalid value (non-positive learning rate or epoch count,
            negative weight decay, unknown optimiser or schedule, decay fractions outside (0, 1],
            ...).
    """
    config = to_dict(config) or {}
    check_known_options(config, TRAIN_DEFAULTS, name=name)
    full = default_train_config()
    full.update({k: v for k, v in config.items() if k != "optimizer"})
    full["optimizer"].update(config.get("optimizer", {}) or {})
    full["compiler_options"] = dict(full["compiler_options"] or {})
    try:
        check_options(full["compiler_options"])
    except ValueError as error:
        raise ConfigError(f"{name}.compiler_options: {error}") from None
    for key in ("num_epochs", "eval_every", "log_every", "keep_checkpoints"):
        _positive(full, key, name, integer=True)
    _positive(full, "checkpoint_every_steps", name, integer=True, allow_zero=True)
    _positive(full, "time_budget_s", name)
    if full["best_mode"] not in ("min", "max"):
        raise ConfigError(f"{name}.best_mode: expected 'min' or 'max', got {full['best_mode']!r}")
    if full["ema_decay"] is not None and not 0.0 <= _number(full["ema_decay"],
                                                            f"{name}.ema_decay") < 1.0:
        raise ConfigError(f"{name}.ema_decay: must be in [0, 1), got {full['ema_decay']!r}")
    opt, oname = full["optimizer"], f"{name}.optimizer"
    if opt["optimizer"] not in ("adam", "adamw"):
        raise ConfigError(
            f"{oname}.optimizer: expected 'adam' or 'adamw', got {opt['optimizer']!r}")
    if opt["schedule"] not in ("constant", "multistep", "cosine"):
        raise ConfigError(
            f"{oname}.schedule: expected 'constant', 'multistep' or 'cosine', "
            f"got {opt['schedule']!r}")
    _positive(opt, "learning_rate", oname)
    _positive(opt, "grad_clip_norm", oname)
    for key in ("weight_decay", "min_learning_rate", "warmup_epochs", "eps"):
        _positive(opt, key, oname, allow_zero=True)
    _positive(opt, "warmup_steps", oname, integer=True, allow_zero=True)
    for key in ("b1", "b2", "decay_factor"):
        if not 0.0 <= _number(opt[key], f"{oname}.{key}") <= 1.0:
            raise ConfigError(f"{oname}.{key}: must be in [0, 1], got {opt[key]!r}")
    fractions, epochs = list(opt["decay_fractions"] or ()), list(opt["decay_epochs"] or ())
    if fractions and epochs:
        raise ConfigError(f"{oname}.decay_epochs: give decay_epochs or decay_fractions, not both")
    for f in fractions:
        if not 0.0 < _number(f, f"{oname}.decay_fractions") <= 1.0:
            raise ConfigError(f"{oname}.decay_fractions: entries must be in (0, 1], got {f!r}")
    for e in epochs:
        if _number(e, f"{oname}.decay_epochs") < 0 or e != int(e):
            raise ConfigError(f"{oname}.decay_epochs: entries must be integers >= 0, got {e!r}")
    if opt["schedule"] == "multistep" and not (fractions or epochs):
        raise ConfigError(f"{oname}.decay_fractions: the multistep schedule needs decay_fractions "
                          "or decay_epochs")
    return full


def check_budgets(budgets: Mapping[str, Any], largest: Mapping[str, int], *,
                  name: str = "config.batch", padding: Optional[Mapping[str, int]] = None) -> None:
    """Checks that every single graph of a dataset fits into the padding budgets.

    Args:
        budgets: option name -> budget, e.g. ``{"max_nodes": 64, "max_edges": 512}``; ``None``
            budgets (derived later from the data) are skipped.
        largest: the same option names -> the largest size of one graph in the dataset.
        name: dotted name of the section holding the budgets, used in messages.
        padding: option name -> room the padding itself needs inside the budget (jraph padding needs
            one node and one graph); default 0.

    Raises:
        ConfigError: a budget that is not a positive integer, or smaller than the largest graph.
    """
    padding = padding or {}
    for key, budget in budgets.items():
        if budget is None:
            continue
        value = _number(budget, f"{name}.{key}")
        if value != int(value) or value <= 0:
            raise ConfigError(f"{name}.{key}: must be a positive integer, got {budget!r}")
        if key not in largest:
            continue
        need = int(largest[key]) + int(padding.get(key, 0))
        if value < need:
            extra = f" plus {padding[key]} for padding" if padding.get(key) else ""
            raise ConfigError(f"{name}.{key}={int(value)} is smaller than the largest graph of the "
                              f"dataset ({int(largest[key])}{extra}); raise it to at least {need}")
