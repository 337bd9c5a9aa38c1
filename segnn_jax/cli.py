"""The ``segnn`` command: train, evaluate and predict with any registered task.

Usage::

    segnn list                                        # tasks and shipped configs
    segnn train nbody_charged                         # the main job (data generated on first use)
    segnn train nbody_charged --config.train.num_epochs=1000 --run-dir runs/paper
    segnn train path/to/my_config.py --config.model.name=seconv_nonlinear
    segnn evaluate runs/paper --split test            # best checkpoint on a split, as JSON
    segnn predict runs/paper systems.npz -o out.npz   # N-body: positions/velocities/charges
    segnn predict runs/qm9_alpha molecules.xyz        # QM9: xyz or ASE-readable files -> CSV
    segnn export runs/paper paper.segnn               # best checkpoint as one portable file
    segnn predict paper.segnn systems.npz             # predict from the artifact alone

Overrides are ``--config.a.b=value`` (or ``--config.a.b value``). Each is parsed with the type of
the option's default (int, float, bool as true/false, str, tuples as ``0.8,0.9`` or ``(0.8, 0.9)``;
``None`` clears an option); an unknown option or a value of the wrong type stops the command with
a message naming the option, and the task then validates the whole config, all before any data is
generated or anything is compiled.

Exit codes: 0 success, 2 bad command line or config, 1 a missing run directory, an unusable
checkpoint or a bad input file (other failures raise with their traceback).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import difflib
import json
import logging
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

from segnn_jax.host_memory import retain_freed_memory_if_requested
from segnn_jax.training.config import ConfigError

__all__ = ["apply_overrides", "main", "parse_overrides"]

_PREFIX = "--config."


def parse_overrides(args: Sequence[str]) -> List[tuple]:
    """``["--config.a.b=1", "--config.c", "x"]`` -> ``[("a.b", "1"), ("c", "x")]``.

    Raises:
        ConfigError: an argument that is not a ``--config.`` override, or one without a value.
    """
    out, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith(_PREFIX):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like "
                              f"--config.train.num_epochs=10")
        key, sep, value = arg[len(_PREFIX):].partition("=")
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"config.{key}: no value given")
            value, i = args[i + 1], i + 1
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{arg!r}: malformed option name")
        out.append((key, value))
        i += 1
    return out


def _parse_bool(text: str, name: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {text!r}")


def _parse_sequence(text: str, name: str, default) -> tuple:
    stripped = text.strip()
    if stripped in ("", "()", "[]"):
        return type(default)() if isinstance(default, (list, tuple)) else ()
    try:
        value = ast.literal_eval(stripped if stripped[0] in "([" else f"({stripped},)")
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"{name}: expected a list such as 0.8,0.9, got {text!r}") from e
    if not isinstance(value, (list, tuple)):
        value = (value,)
    return list(value) if isinstance(default, list) else tuple(value)


def _parse_value(text: str, default: Any, name: str) -> Any:
    """``text`` converted to the type of ``default``."""
    if text.strip() in ("None", "null"):
        return None
    if isinstance(default, bool):
        return _parse_bool(text, name)
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {text!r}") from None
    if isinstance(default, str):
        return text
    if isinstance(default, (list, tuple)):
        return _parse_sequence(text, name, default)
    if default is None:
        # Options without a typed default (e.g. ema_decay=None): a Python literal, else a string.
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise ConfigError(f"{name}: options of type {type(default).__name__} cannot be overridden "
                      "from the command line")


def apply_overrides(config: Any, overrides: Sequence[tuple]) -> Any:
    """Applies ``(dotted_key, text)`` overrides to a ``ConfigDict`` in place and returns it.

    Raises:
        ConfigError: an unknown option (with the closest known name) or a value of the wrong type.
    """
    for key, text in overrides:
        parts = key.split(".")
        node, path = config, "config"
        for part in parts[:-1]:
            if not hasattr(node, "keys") or part not in node:
                _unknown(node, part, path)
            node, path = node[part], f"{path}.{part}"
            if not hasattr(node, "keys"):
                raise ConfigError(f"{path}: is a value, not a section; cannot set "
                                  f"config.{key}")
        leaf, name = parts[-1], f"config.{key}"
        if not hasattr(node, "keys") or leaf not in node:
            _unknown(node, leaf, path)
        if hasattr(node[leaf], "keys"):
            raise ConfigError(f"{name}: is a section; set one of its options, e.g. "
                              f"{name}.{next(iter(node[leaf].keys()), '...')}")
        value = _parse_value(text, node[leaf], name)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: {e}") from e
    return config


def _unknown(node: Any, key: str, path: str) -> None:
    known = list(node.keys()) if hasattr(node, "keys") else []
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {path}.{close[0]}?" if close else ""
    raise ConfigError(f"{path}.{key}: unknown option{hint}")


def _task_of_run(run_dir: Path):
    from segnn_jax.tasks import get_task

    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    return get_task(json.loads(path.read_text()).get("task", ""))


def _cmd_list(args) -> int:
    from segnn_jax.configs import config_description, list_configs
    from segnn_jax.tasks import TASKS, get_task

    print("tasks:")
    for name in sorted(TASKS):
        print(f"  {name:16s} {get_task(name).DESCRIPTION}")
    print("configs (segnn train <config>):")
    for name in list_configs():
        d = config_description(name)
        print(f"  {name:16s} [{d['task']}] {d['summary']}")
    return 0


def _cmd_train(args, extra: Sequence[str]) -> int:
    from segnn_jax.configs import load_config
    from segnn_jax.tasks import get_task

    overrides = parse_overrides(extra)
    config = apply_overrides(load_config(args.config), overrides)
    task = get_task(str(config.task))
    task.validate_config(config)  # the whole config, before any data or compilation
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{Path(args.config).stem}-{stamp}"
    print(f"run directory: {run_dir}", flush=True)
    command = " ".join(["segnn", "train", args.config, *extra, "--run-dir", str(run_dir)])
    results = task.train(config, run_dir, command=command)
    print(f"results: {run_dir / 'results.json'}")
    return 0 if results is not None else 1


def _cmd_evaluate(args) -> int:
    run_dir = Path(args.run_dir)
    result = _task_of_run(run_dir).evaluate(run_dir, args.split)
    print(json.dumps(result, indent=2))
    return 0


# Tasks whose predict accepts an artifact (a file) as well as a run directory.
_PREDICT_FROM_ARTIFACT = ("nbody", "qm9", "oc20", "potential")


def _cmd_predict(args) -> int:
    source = Path(args.run_dir)
    if source.is_file():
        from segnn_jax.artifact import ArtifactError, load_artifact

        model = load_artifact(source)
        if model.task not in _PREDICT_FROM_ARTIFACT:
            raise ArtifactError(f"{source}: predicting from an artifact is not supported for the "
                                f"{model.task} task yet; use its run directory")
        path = model.task_module.predict(model, args.input, args.output)
    else:
        path = _task_of_run(source).predict(source, args.input, args.output)
    print(f"predictions written to {path}")
    return 0


def _cmd_export(args) -> int:
    from segnn_jax.artifact import TrainedModel

    model = TrainedModel.from_run(Path(args.run_dir))
    path = model.save(args.output)
    print(f"{model!r} (checkpoint step {model.info['checkpoint_step']}) exported to {path}; "
          f"load it with segnn_jax.load_artifact({str(path)!r})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segnn", description="Steerable E(3) equivariant GNNs: train, evaluate, predict.",
        epilog="Example: segnn train nbody_charged --config.train.num_epochs=1000")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list tasks and shipped configs")
    train = sub.add_parser(
        "train", help="train with a config (overrides: --config.a.b=value)",
        description="Train with a shipped config name (see `segnn list`) or a .py config file. "
                    "Options are overridden with --config.a.b=value.")
    train.add_argument("config", help="config name (e.g. nbody_charged) or path to a .py file")
    train.add_argument("--run-dir", default=None,
                       help="run directory (default runs/<config>-<time>); resumed if it holds "
                            "checkpoints")
    evaluate = sub.add_parser("evaluate", help="evaluate a run's best checkpoint on a split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", default="test", choices=("train", "valid", "test"))
    predict = sub.add_parser(
        "predict", help="predict on new inputs with a run's best checkpoint or an artifact",
        description="RUN_DIR is a run directory or an artifact written by segnn export. The "
                    "input depends on the run's task. N-body: an .npz with "
                    "positions and velocities [S, N, 3] (or [N, 3]) and charges [S, N] "
                    "(charged) or optional masses [S, N] (gravity); output an .npz with the "
                    "predicted positions. QM9: an xyz or ASE-readable structure file (every "
                    "frame a molecule); output a CSV (or JSON with -o name.json) of the "
                    "predicted property. OC20: an ASE-readable file (every frame a system); "
                    "output a CSV of adsorption energies. Potential: an ASE-readable file; "
                    "output an extxyz with energies and forces.")
    predict.add_argument("run_dir")
    predict.add_argument("input")
    predict.add_argument("-o", "--output", default=None,
                         help="output file (default: next to the input, named by the task)")
    export = sub.add_parser(
        "export", help="write a run's best checkpoint as one portable artifact file",
        description="Writes config, parameters, the files predictions need, the library version "
                    "and SHA-256 checksums into one file (a zip of JSON and .npz, no pickle); "
                    "segnn_jax.load_artifact(path) loads it back for inference.")
    export.add_argument("run_dir")
    export.add_argument("output", help="the artifact to write, e.g. model.segnn")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``segnn`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("segnn_jax").setLevel(logging.INFO)
    retain_freed_memory_if_requested()  # before the first JAX computation; segnn_jax.host_memory
    from segnn_jax.artifact import ArtifactError
    from segnn_jax.tasks import TaskInputError, UnknownTaskError
    from segnn_jax.tasks.inference import UnsupportedTaskError
    from segnn_jax.training import CheckpointError

    try:
        if args.command == "list":
            return _cmd_list(args)
        if args.command == "train":
            return _cmd_train(args, extra)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "export":
            return _cmd_export(args)
        return _cmd_predict(args)
    except (ConfigError, UnknownTaskError) as e:
        print(f"segnn: config error: {e}", file=sys.stderr)
        return 2
    except (TaskInputError, FileNotFoundError, CheckpointError, ImportError, ArtifactError,
            UnsupportedTaskError) as e:
        print(f"segnn: error: {e}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
