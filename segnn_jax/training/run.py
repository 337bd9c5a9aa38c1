"""The run directory: config, versions, metrics log, optional TensorBoard, learning-curve plot.

Layout::

    run_dir/
        config.json        the operative config (after overrides and defaults)
        run_info.json      versions, git revision, parameter count, data statistics, devices
        metrics.jsonl      one JSON object per event: {"event": "train"|"eval"|..., "step", ...}
        learning_curves.png
        checkpoints/       see segnn_jax.training.checkpoint
        tensorboard/       only if tensorboardX or TensorFlow is importable (else skipped)
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import jax
import numpy as np

from segnn_jax.training.checkpoint import atomic_write_text
from segnn_jax.training.config import to_dict

__all__ = [
    "RunDirectory",
    "count_parameters",
    "git_revision",
    "plot_learning_curves",
    "read_metrics",
    "summary_table",
    "versions",
]


def versions() -> Dict[str, str]:
    """Versions of Python and of the numerical packages ("not installed" where absent)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "dm-haiku", "e3nn-jax", "jraph", "optax", "numpy",
                 "orbax-checkpoint"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def git_revision(path: Union[str, Path, None] = None) -> str:
    """The git commit of the checkout holding ``path`` (this package by default), with ``+dirty``
    when there are uncommitted changes, or ``"unknown"`` outside a git checkout."""
    path = Path(path or Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def count_parameters(params: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)) or isinstance(value, jax.Array):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


class _TensorBoard:
    """Scalar logging through tensorboardX or tf.summary, whichever imports; a no-op otherwise."""

    def __init__(self, logdir: Path):
        self._writer = self._tf = None
        try:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(logdir))
            return
        except ImportError:
            pass
        try:
            import tensorflow as tf

            self._tf = tf
            self._writer = tf.summary.create_file_writer(str(logdir))
        except ImportError:
            self._writer = None

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            return
        if self._tf is None:
            for k, v in values.items():
                self._writer.add_scalar(f"{prefix}/{k}", v, step)
            self._writer.flush()
        else:
            with self._writer.as_default():
                for k, v in values.items():
                    self._tf.summary.scalar(f"{prefix}/{k}", v, step=step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class RunDirectory:
    """Writes the artefacts of one training run.

    Args:
        path: the run directory (created if needed).
        tensorboard: also log scalars to ``path/tensorboard`` when tensorboardX or TensorFlow is
            importable; silently skipped when neither is.
    """

    def __init__(self, path: Union[str, Path], *, tensorboard: bool = True):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoint_dir = self.path / "checkpoints"
        self._tb = _TensorBoard(self.path / "tensorboard") if tensorboard else None

    def read_config(self) -> Optional[Dict[str, Any]]:
        """The ``config.json`` of an earlier attempt, or None if there is none or it is unreadable
        (it is rewritten at every start)."""
        try:
            return json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return None

    def write_config(self, config: Any) -> Dict[str, Any]:
        """Writes the operative config (dict or ConfigDict) as ``config.json``; returns it as
        written (plain JSON types), comparable with :meth:`read_config`."""
        text = json.dumps(_jsonable(to_dict(config)), indent=2, sort_keys=True)
        atomic_write_text(self.path / "config.json", text)
        return json.loads(text)

    def write_info(self, *, num_parameters: Optional[int] = None,
                   data_stats: Optional[Mapping[str, Any]] = None, **extra: Any) -> None:
        """Writes ``run_info.json``: versions, git revision, devices, parameters, data stats."""
        info = {
            "versions": versions(),
            "git_revision": git_revision(),
            "command": sys.argv,
            "hostname": platform.node(),
            "devices": [str(d) for d in jax.devices()],
            "process_count": jax.process_count(),
            "num_parameters": num_parameters,
            "data_stats": dict(data_stats or {}),
            **extra,
        }
        atomic_write_text(self.path / "run_info.json",
                          json.dumps(_jsonable(info), indent=2, sort_keys=True))

    def log(self, event: str, **values: Any) -> None:
        """Appends one event to ``metrics.jsonl`` (and numeric values to TensorBoard)."""
        record = {"event": event, **_jsonable(values)}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None and "step" in values:
            scalars = {k: float(v) for k, v in values.items()
                       if isinstance(v, (int, float)) and k not in ("step", "epoch")}
            self._tb.scalars(event, scalars, int(values["step"]))

    def truncate_metrics(self, n_lines: int) -> None:
        """Keeps the first ``n_lines`` events (on resume: drops those after the checkpoint)."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)[:n_lines]
        atomic_write_text(self.metrics_path, "".join(lines))

    def num_metrics_lines(self) -> int:
        if not self.metrics_path.exists():
            return 0
        return len(self.metrics_path.read_text().splitlines())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """The events of a ``metrics.jsonl`` file (or of the one in a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_learning_curves(events: Iterable[Mapping[str, Any]], path: Union[str, Path], *,
                         metric: str = "loss") -> Optional[Path]:
    """Plots train/validation/test ``metric`` against the step into a PNG (log scale if positive).

    Returns:
        The PNG path, or ``None`` if matplotlib is not installed or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves: Dict[str, List] = {}
    for e in events:
        name = e.get("split", e.get("event"))
        if e.get("event") in ("train", "eval") and isinstance(e.get(metric), (int, float)):
            curves.setdefault(name, []).append((e["step"], e[metric]))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if name != "train" else None, ms=3, label=name)
    values = [v for pts in curves.values() for _, v in pts]
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A small fixed-width table: one row per split, one column per metric.

    >>> print(summary_table({"val": {"loss": 0.5}, "test": {"loss": 0.25}}))
    split       loss
    val      0.50000
    test     0.25000
    """
    columns = sorted({k for r in rows.values() for k in r})
    width = max([10] + [len(c) + 2 for c in columns])
    first = max([6] + [len(s) + 1 for s in rows])
    lines = ["split".ljust(first) + "".join(c.rjust(width) for c in columns)]
    for split, values in rows.items():
        cells = "".join((f"{values[c]:.5g}" if c == "count" else f"{values[c]:.5f}").rjust(width)
                        if c in values else "-".rjust(width) for c in columns)
        lines.append(split.ljust(first) + cells)
    return "\n".join(lines)
