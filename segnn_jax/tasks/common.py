"""Pieces every task shares: option checks and the padding budget of its loaders."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jraph

from segnn_jax import training
from segnn_jax.batching import (BatchBudget, bucket_budgets, estimate_budget_from_sizes,
                                graph_sizes)
from segnn_jax.tasks import models
from segnn_jax.training.config import ConfigError, check_known_options, to_dict

__all__ = ["batch_budget", "check_budget_options", "positive_int", "task_sections"]


def task_sections(config: Any, task: str, sections: Mapping[str, Mapping[str, Any]]
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The common start of every task's ``validate_config``.

    Checks that ``config`` names no unknown option (against ``sections`` plus the shared ``model``
    and ``train`` sections) and no other task, and fills in the defaults of ``sections``.

    Returns:
        ``(config as plain dicts, {section name: section with its defaults})``.

    Raises:
        ConfigError: an unknown option or another task, named by its dotted path.
    """
    config = to_dict(config) or {}
    reference = {"task": task, **sections, "model": models.default_model_config(),
                 "train": training.TRAIN_DEFAULTS}
    check_known_options(config, reference)
    if config.get("task", task) != task:
        raise ConfigError(f"config.task: expected {task!r}, got {config['task']!r}")
    return config, {name: dict(defaults, **(config.get(name) or {}))
                    for name, defaults in sections.items()}


def check_budget_options(batch: dict[str, Any]) -> None:
    """Checks a batch section's ``max_nodes``/``max_edges`` and ``buckets``; stores the buckets as
    a tuple of floats. Raises ConfigError naming the option."""
    training.check_budgets({k: batch[k] for k in ("max_nodes", "max_edges")}, {})
    try:
        bucket_budgets(BatchBudget(100, 100, 2), batch["buckets"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.batch.buckets: {e}") from e
    batch["buckets"] = tuple(float(f) for f in batch["buckets"])


def positive_int(section: Mapping[str, Any], key: str, name: str, *, optional: bool = False,
                 minimum: int = 1) -> None:
    """Raises ConfigError naming ``name.key`` unless it is an integer >= ``minimum`` (or None)."""
    value = section[key]
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name}.{key}: expected {expected}{' or None' if optional else ''}, "
                          f"got {value!r}")


def batch_budget(batch: Mapping[str, Any], graphs: Sequence[jraph.GraphsTuple],
                 batch_size: int) -> BatchBudget:
    """One padding budget for all the given graphs (training and evaluation batches share shapes).

    ``batch["max_nodes"]`` / ``batch["max_edges"]`` override the estimate from the graphs; a value
    smaller than the largest graph raises ConfigError naming the option.
    """
    n_node, n_edge = graph_sizes(graphs)
    training.check_budgets({"max_nodes": batch["max_nodes"], "max_edges": batch["max_edges"]},
                           {"max_nodes": int(n_node.max()), "max_edges": int(n_edge.max())},
                           padding={"max_nodes": 1})
    estimate = estimate_budget_from_sizes(n_node, n_edge, batch_size)
    return BatchBudget(batch["max_nodes"] or estimate.n_node, batch["max_edges"] or estimate.n_edge,
                       batch_size + 1)
