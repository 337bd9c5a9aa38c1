"""Experiment configs shipped with the package (``ml_collections`` config files).

Each module ``segnn_jax/configs/<name>.py`` defines ``get_config() -> ml_collections.ConfigDict``
whose ``task`` field names a task of :mod:`segnn_jax.tasks`. ``segnn train <name>`` loads it,
applies ``--config.a.b=value`` overrides and runs the task. A new config is a new file here;
nothing else needs registering. A path to a ``.py`` file with a ``get_config()`` works too.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import Any, Dict, List

from segnn_jax.training.config import ConfigError

__all__ = ["config_description", "list_configs", "load_config"]


def list_configs() -> List[str]:
    """Names of the configs shipped in this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if not m.name.startswith("_"))


def _module(name: str):
    path = Path(name)
    if path.suffix == ".py":
        if not path.is_file():
            raise ConfigError(f"config file {name} does not exist")
        spec = importlib.util.spec_from_file_location(f"segnn_user_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if name not in list_configs():
        raise ConfigError(f"unknown config {name!r}; shipped configs: {', '.join(list_configs())} "
                          "(or give a path to a .py file with get_config())")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == "ml_collections":
            raise ImportError("the configs need ml_collections: pip install 'segnn[experiments]'"
                              ) from e
        raise


def load_config(name: str) -> Any:
    """The ``ConfigDict`` of a shipped config name, or of a ``.py`` config file path.

    Raises:
        ConfigError: unknown name, missing file, or a module without ``get_config``/``task``.
    """
    module = _module(name)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {name!r} has no get_config() function")
    config = module.get_config()
    if "task" not in config:
        raise ConfigError(f"config {name!r} has no 'task' field naming its task")
    return config


def config_description(name: str) -> Dict[str, str]:
    """``{"task": ..., "summary": first line of the module docstring}`` of a shipped config."""
    module = _module(name)
    doc = (module.__doc__ or "").strip().splitlines()
    return {"task": str(module.get_config().task), "summary": doc[0] if doc else ""}
