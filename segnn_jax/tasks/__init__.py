"""Tasks: data -> graphs -> model -> loss, and the registry the ``segnn`` command looks tasks up in.

A task is a module that defines

* ``DESCRIPTION``: one line for ``segnn list``;
* ``validate_config(config) -> dict``: checks a whole config (raises ``ConfigError`` naming the
  option) before any data is touched or anything is compiled;
* ``train(config, run_dir, *, command=None) -> dict``: trains, writes the run directory, returns
  the results;
* ``evaluate(run_dir, split) -> dict``: evaluates a run's best checkpoint on a split;
* ``predict(model, input_path, output_path=None) -> Path``: predictions on new inputs, where
  ``model`` is a run directory (its best checkpoint), an artifact file (``segnn export``) or a
  loaded :class:`segnn_jax.artifact.TrainedModel` (:func:`segnn_jax.artifact.load_trained`).

Errors about the user's input derive from :class:`TaskInputError` (the command prints them without
a traceback); configs errors are ``segnn_jax.training.ConfigError``.

Adding a task is one line in :data:`TASKS` (plus its config files in :mod:`segnn_jax.configs`).
Modules are imported only when used, so listing tasks never pulls in a task's dependencies.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict

__all__ = ["TASKS", "TaskInputError", "UnknownTaskError", "get_task"]

TASKS: Dict[str, str] = {
    "nbody": "segnn_jax.tasks.nbody",
    "qm9": "segnn_jax.tasks.qm9",
    "oc20": "segnn_jax.tasks.oc20",
    "potential": "segnn_jax.tasks.potential",
}


class UnknownTaskError(ValueError):
    """A task name that is not in :data:`TASKS`."""


class TaskInputError(ValueError):
    """Base class of a task's errors about user input (e.g. a malformed file given to predict)."""


def get_task(name: str) -> ModuleType:
    """The module of a registered task.

    Raises:
        UnknownTaskError: ``name`` is not registered (the message lists the known tasks).
    """
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; registered tasks: "
                               f"{', '.join(sorted(TASKS))}")
    return importlib.import_module(TASKS[name])
