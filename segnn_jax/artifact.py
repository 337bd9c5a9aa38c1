"""Portable trained models: one versioned, checksummed file holding a model and what it needs.

A ``.segnn`` artifact is a zip archive (no pickle anywhere) of three members::

    segnn_artifact.json   the header: format name and version, library version, creation time,
                          and the SHA-256 of the two members below; read and checked first
    model.json            task, the validated config, the run's side files (e.g. the QM9
                          training standardisation), where the parameters came from, and the
                          list of arrays: tree ("params" | "model_state"), key path, shape, dtype
    arrays.npz            the arrays, NumPy's format, loaded with allow_pickle=False

Loading refuses, with a message that names the file and the problem: a file that is not a zip or
is truncated, an unknown format, a newer format version, an artifact of an incompatible library
version (another major version; for 0.x another minor version, as semantic versioning allows 0.x
to break), a member whose SHA-256 does not match the header (tampered or corrupt), and arrays that
do not match their description. The checksums detect corruption and casual edits; they are not a
signature (whoever can write the file can rewrite its header too).

Usage::

    segnn export runs/paper model.segnn                 # best checkpoint of a run
    model = segnn_jax.load_artifact("model.segnn")      # TrainedModel
    outputs = model.apply(graph)                        # the task's forward on raw graphs
    values = model.predict_graphs(graphs)               # in the task's units, padding handled
    data = model.export_inference(padded_graph)         # optional: a jax.export module (bytes)

Parameters are stored bit for bit (float32 stays float32), so the loaded model's predictions are
identical to those of the run it was exported from.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import io
import json
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_FORMAT_VERSION",
    "ArtifactError",
    "IncompatibleArtifactError",
    "TrainedModel",
    "export_run",
    "load_artifact",
    "load_trained",
    "save_artifact",
]

ARTIFACT_FORMAT = "segnn_jax.artifact"
ARTIFACT_FORMAT_VERSION = 1
_HEADER, _MODEL, _ARRAYS = "segnn_artifact.json", "model.json", "arrays.npz"
_TREES = ("params", "model_state")
_VERSION = re.compile(r"^(\d+)\.(\d+)")

PathLike = Union[str, Path]


class ArtifactError(ValueError):
    """An artifact cannot be used: not an artifact, truncated, tampered with or inconsistent."""


class IncompatibleArtifactError(ArtifactError):
    """An artifact of another format version or of an incompatible library version."""


def _library_version() -> str:
    import segnn_jax

    return segnn_jax.__version__


def _compatible(saved: str, current: str) -> bool:
    """Same major version; for 0.x also the same minor version."""
    a, b = _VERSION.match(saved), _VERSION.match(current)
    if a is None or b is None:
        return False
    if a.group(1) != b.group(1):
        return False
    return a.group(1) != "0" or a.group(2) == b.group(2)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Parameter trees <-> flat arrays


def _flatten_tree(tree: Any, tree_name: str) -> List[Tuple[List[str], np.ndarray]]:
    """``[(key path, array)]`` of a nested dict of arrays (Haiku parameters and state)."""
    out = []

    def visit(node, path):
        if isinstance(node, Mapping):
            for key in sorted(node):
                if not isinstance(key, str):
                    raise TypeError(f"{tree_name}{path}: dict keys must be strings, got {key!r}")
                visit(node[key], path + [key])
        else:
            array = np.asarray(node)
            if array.dtype.kind not in "biuf" or array.dtype.byteorder == ">":
                raise TypeError(f"{tree_name}/{'/'.join(path)}: cannot store dtype {array.dtype}")
            out.append((path, array))

    visit(tree, [])
    return out


def _unflatten_tree(entries: Sequence[Tuple[List[str], np.ndarray]]) -> Dict[str, Any]:
    root: Dict[str, Any] = {}
    for path, array in entries:
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return root


# --------------------------------------------------------------------------------------------------
# The trained model


class TrainedModel:
    """A task's model with its parameters, ready for inference.

    Attributes:
        task: the task's name (``segnn_jax.tasks.TASKS``).
        config: the validated config of the run.
        params, model_state: Haiku parameters and state (nested dicts of NumPy arrays).
        side_files: ``{file name: JSON}`` the task's predictions need (e.g. the QM9
            standardisation; :data:`segnn_jax.tasks.inference.SIDE_FILES`).
        info: where it came from (run directory, checkpoint step, library version, git revision,
            and for a loaded artifact its path and checksum).
    """

    def __init__(self, task: str, config: Mapping[str, Any], params: Any, model_state: Any, *,
                 side_files: Optional[Mapping[str, Any]] = None,
                 info: Optional[Mapping[str, Any]] = None):
        from segnn_jax.tasks import get_task

        self.task = task
        self.task_module = get_task(task)
        self.config = self.task_module.validate_config(config)
        self.params = params
        self.model_state = model_state
        self.side_files = dict(side_files or {})
        self.info = dict(info or {})

    def __repr__(self) -> str:
        from segnn_jax.training import count_parameters

        return (f"TrainedModel(task={self.task!r}, model={self.config['model']['name']!r}, "
                f"parameters={count_parameters(self.params)})")

    @classmethod
    def from_run(cls, run_dir: PathLike) -> "TrainedModel":
        """The best checkpoint of a run directory (EMA parameters when the run evaluated with
        them), restored through the task's ``restore_params``.

        Raises:
            FileNotFoundError: not a run directory, or a side file is missing.
            CheckpointError: no usable checkpoint.
        """
        from segnn_jax.tasks import get_task, inference
        from segnn_jax.training import git_revision

        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory: {config_path} is missing")
        raw = json.loads(config_path.read_text())
        task = str(raw.get("task", ""))
        module = get_task(task)
        cfg = module.validate_config(raw)
        example = inference.example_graph(task, cfg)
        params, model_state, step = module.restore_params(cfg, run_dir, example)
        run_info_path = run_dir / "run_info.json"
        run_info = json.loads(run_info_path.read_text()) if run_info_path.is_file() else {}
        info = {"run_dir": str(run_dir.resolve()), "checkpoint_step": int(step),
                "trained_at_git_revision": run_info.get("git_revision", "unknown"),
                "library_version": _library_version(),
                "exported_at_git_revision": git_revision()}
        return cls(task, cfg, params, model_state,
                   side_files=inference.run_side_files(task, run_dir), info=info)

    @functools.cached_property
    def transformed(self):
        """The Haiku-transformed forward of the task (``task.make_model(config)``).

        Raises:
            TypeError: a task whose network is not built from its config alone (the potential:
                use ``segnn_jax.ase_calculator.SEGNNCalculator.load`` or its ``predict``).
        """
        make_model = getattr(self.task_module, "make_model", None)
        if make_model is None:
            raise TypeError(f"the {self.task} task has no generic forward; use its own loader "
                            f"(e.g. SEGNNCalculator.load for a potential) or predict")
        return make_model(self.config)

    @functools.cached_property
    def _apply(self):
        from segnn_jax.compile_options import jit

        model = self.transformed
        return jit(lambda params, state, graph: model.apply(params, state, None, graph, False)[0])

    def apply(self, graph) -> np.ndarray:
        """The task's forward (evaluation mode) on a batch of raw graphs, as the task builds them
        (padded or not); jitted, compiled once per shape. Returns the raw output (e.g. QM9's
        standardised value per graph, N-body's positions per node)."""
        return np.asarray(self._apply(self.params, self.model_state, graph))

    def predict_graphs(self, graphs: Sequence[Any]) -> List[np.ndarray]:
        """Outputs in the task's units for a list of single graphs: one array per graph (graph
        tasks: its value, node tasks: ``[n_nodes, ...]``), batched and padded together."""
        from segnn_jax.graph import batch_graphs, pad_graph
        from segnn_jax.tasks.inference import to_physical

        if not graphs:
            return []
        batch = batch_graphs(list(graphs))
        n_node = np.asarray(batch.n_node)
        padded = pad_graph(batch, int(n_node.sum()) + 1, int(np.sum(batch.n_edge)),
                           len(n_node) + 1)
        outputs = to_physical(self.task, self.apply(padded), self.side_files)
        if self.config["model"]["task"] == "graph":
            return [outputs[g] for g in range(len(n_node))]
        bounds = np.concatenate([[0], np.cumsum(n_node)])
        return [outputs[bounds[g]:bounds[g + 1]] for g in range(len(n_node))]

    def export_inference(self, example_graph: Any, *,
                         platforms: Optional[Sequence[str]] = None) -> bytes:
        """The forward with these parameters, serialised with ``jax.export`` (StableHLO; the
        parameters are constants of the module), for batches shaped like ``example_graph``.

        Running it needs JAX only, not this library nor Haiku::

            forward = jax.export.deserialize(data)
            outputs = forward.call(*jax.tree.leaves(graph))   # graph padded to the same shapes

        Args:
            example_graph: a (padded) batch of the shapes and dtypes to serve.
            platforms: e.g. ``("cpu", "cuda")``; default the current backend.
        """
        import jax

        leaves, treedef = jax.tree.flatten(example_graph)
        model, params, state = self.transformed, self.params, self.model_state

        def forward(*graph_leaves):
            graph = jax.tree.unflatten(treedef, graph_leaves)
            return model.apply(params, state, None, graph, False)[0]

        specs = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in leaves]
        return bytes(jax.export.export(jax.jit(forward), platforms=platforms)(*specs).serialize())

    def save(self, path: PathLike) -> Path:
        """Writes this model as an artifact (:func:`save_artifact`)."""
        return save_artifact(self, path)


# --------------------------------------------------------------------------------------------------
# Writing and reading


def save_artifact(model: TrainedModel, path: PathLike) -> Path:
    """Writes ``model`` to ``path`` as one artifact file (written beside it, then renamed).

    Returns:
        The path.
    """
    import os
    import tempfile

    path = Path(path)
    entries, arrays = [], {}
    for tree_name, tree in (("params", model.params), ("model_state", model.model_state)):
        for key_path, array in _flatten_tree(tree, tree_name):
            name = f"a{len(arrays):05d}"
            arrays[name] = array
            entries.append({"name": name, "tree": tree_name, "path": key_path,
                            "shape": list(array.shape), "dtype": array.dtype.name})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    arrays_bytes = buffer.getvalue()
    model_bytes = json.dumps({
        "task": model.task, "config": model.config, "side_files": model.side_files,
        "source": {k: v for k, v in model.info.items() if k not in ("artifact", "checksum")},
        "arrays": entries}, indent=1, sort_keys=True).encode()
    header = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION,
              "library_version": _library_version(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "sha256": {_MODEL: _sha256(model_bytes), _ARRAYS: _sha256(arrays_bytes)}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(_HEADER, json.dumps(header, indent=1, sort_keys=True))
            archive.writestr(_MODEL, model_bytes)
            archive.writestr(_ARRAYS, arrays_bytes)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# What zipfile and its decompressors raise for a damaged archive: bad structure or CRC-32
# (BadZipFile), damaged compressed data (zlib.error, EOFError), offsets before the start of the
# file (OSError), garbage in the directory (ValueError, struct.error, UnicodeDecodeError), flags of
# features it lacks (NotImplementedError, RuntimeError for "encrypted").
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, struct.error,
               NotImplementedError, RuntimeError)


def _read_members(path: Path) -> Tuple[Dict[str, Any], bytes, bytes]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such artifact file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            members = {n: archive.read(n) for n in (_HEADER, _MODEL, _ARRAYS) if n in names}
    except _ZIP_ERRORS as e:
        raise ArtifactError(f"{path}: not a segnn artifact, or truncated or corrupt "
                            f"(unreadable zip archive: {type(e).__name__}: {e})") from e
    missing = [n for n in (_HEADER, _MODEL, _ARRAYS) if n not in members]
    if missing:
        raise ArtifactError(f"{path}: not a segnn artifact (missing {', '.join(missing)})")
    try:
        header = json.loads(members[_HEADER])
    except ValueError as e:
        raise ArtifactError(f"{path}: unreadable header {_HEADER} ({e})") from e
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: unreadable header {_HEADER} (not a JSON object)")
    return header, members[_MODEL], members[_ARRAYS]


def _check_header(path: Path, header: Mapping[str, Any]) -> None:
    if header.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: not a segnn artifact (format {header.get('format')!r}, "
                            f"expected {ARTIFACT_FORMAT!r})")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{path}: invalid format_version {version!r}")
    if version > ARTIFACT_FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"{path}: artifact format version {version} is newer than this library reads "
            f"({ARTIFACT_FORMAT_VERSION}); upgrade segnn_jax (the artifact was written by "
            f"version {header.get('library_version')})")
    saved, current = str(header.get("library_version")), _library_version()
    if not _compatible(saved, current):
        raise IncompatibleArtifactError(
            f"{path}: written by segnn_jax {saved}, incompatible with this version {current} "
            f"(a different major version, or minor version before 1.0); load it with segnn_jax "
            f"{saved} or re-export it from its run directory")


def load_artifact(path: PathLike) -> TrainedModel:
    """Reads an artifact written by :func:`save_artifact` or ``segnn export``.

    Raises:
        FileNotFoundError: no such file.
        IncompatibleArtifactError: another format version or an incompatible library version.
        ArtifactError: not an artifact, truncated, a checksum mismatch (tampered or corrupt), or
            arrays that do not match their description; the message names the file.
    """
    path = Path(path)
    header, model_bytes, arrays_bytes = _read_members(path)
    _check_header(path, header)
    digests = header.get("sha256")
    if not isinstance(digests, dict):
        raise ArtifactError(f"{path}: the header has no checksums")
    for name, data in ((_MODEL, model_bytes), (_ARRAYS, arrays_bytes)):
        if digests.get(name) != _sha256(data):
            raise ArtifactError(f"{path}: {name} does not match its SHA-256 checksum in the "
                                f"header: the file was modified or is corrupt")
    try:
        description = json.loads(model_bytes)
        task, config = description["task"], description["config"]
        entries = description["arrays"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable {_MODEL} ({e})") from e
    try:
        with np.load(io.BytesIO(arrays_bytes), allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: unreadable {_ARRAYS} ({e})") from e
    trees: Dict[str, list] = {name: [] for name in _TREES}
    try:
        for entry in entries:
            array = arrays.get(entry["name"])
            where = f"{entry['tree']}/{'/'.join(entry['path'])}"
            if array is None or entry["tree"] not in trees:
                raise ArtifactError(f"{path}: array {where} is missing from {_ARRAYS}")
            if list(array.shape) != entry["shape"] or array.dtype.name != entry["dtype"]:
                raise ArtifactError(f"{path}: array {where} has shape {array.shape} and dtype "
                                    f"{array.dtype}, described as {entry['shape']} "
                                    f"{entry['dtype']}")
            trees[entry["tree"]].append((list(entry["path"]), array))
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: malformed array list in {_MODEL} ({e!r})") from e
    info = dict(description.get("source") or {}, artifact=str(path),
                checksum=_sha256((digests[_MODEL] + digests[_ARRAYS]).encode()),
                artifact_library_version=header.get("library_version"),
                created=header.get("created"))
    try:
        params, model_state = (_unflatten_tree(trees[name]) for name in _TREES)
    except (IndexError, AttributeError, TypeError) as e:  # empty or clashing key paths
        raise ArtifactError(f"{path}: malformed parameter key paths in {_MODEL} ({e!r})") from e
    return TrainedModel(task, config, params, model_state,
                        side_files=description.get("side_files"), info=info)


def load_trained(source: Union[PathLike, TrainedModel], *,
                 task: Optional[str] = None) -> TrainedModel:
    """A trained model from a run directory (its best checkpoint), an artifact file, or a
    :class:`TrainedModel` (returned as is): what the tasks' ``predict`` accept.

    Raises:
        ArtifactError: the model is not of ``task``; see also :func:`load_artifact` and
            :meth:`TrainedModel.from_run`.
    """
    if isinstance(source, TrainedModel):
        model = source
    elif Path(source).is_file():
        model = load_artifact(source)
    else:
        model = TrainedModel.from_run(source)
    if task is not None and model.task != task:
        where = model.info.get("artifact") or model.info.get("run_dir") or "the given model"
        raise ArtifactError(f"{where}: a model of the {model.task} task, not of {task}")
    return model


def export_run(run_dir: PathLike, path: PathLike) -> Path:
    """Writes the best checkpoint of a run directory as one artifact file (``segnn export``)."""
    return save_artifact(TrainedModel.from_run(run_dir), path)
