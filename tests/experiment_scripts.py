"""The scripts under experiments/ are not a package: tests load them from their files."""

import importlib.util
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(relative_path: str) -> ModuleType:
    """The module of ``experiments/<relative_path>``, e.g. ``"nbody/ensemble.py"``."""
    path = EXPERIMENTS / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
