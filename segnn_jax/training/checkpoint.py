"""Checkpoints: orbax-checkpoint payloads, checked by a SHA-256 manifest, latest/best retention.

Layout of a checkpoint directory::

    checkpoints/
        step_000001200/            orbax payload (orbax writes it to a temporary name, then renames)
            segnn_manifest.json    written last, atomically: leaf paths, shapes, dtypes, the SHA-256
                                   of every payload file, the step, the loop state, and the
                                   SHA-256 of all of these (the manifest checks itself)
        step_000001500/
        best.json                  {"step": ..., "metric": ...}, written atomically

A step directory without a manifest is an interrupted save and is ignored. On restore every payload
file is re-hashed, and so is the manifest; a missing, truncated or altered file (the manifest
included) raises :class:`CorruptCheckpointError`, and
:meth:`CheckpointManager.restore_latest` then falls back to the previous good checkpoint (the
manager keeps ``keep >= 2`` recent ones, plus the best).

The tree is stored flat (``leaf_00000``, ...) with its key paths in the manifest, so any pytree of
arrays (a :class:`~segnn_jax.training.TrainState` holding Haiku params and optax states) round-trips
without orbax knowing its types; restoring needs a template of the same structure (the freshly
initialised state). PRNG keys must be raw ``uint32`` arrays. Multi-host runs: only process 0 saves
(a shared file system is assumed), which orbax is told through ``active_processes={0}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import jax
import numpy as np

__all__ = ["CheckpointError", "CheckpointManager", "CorruptCheckpointError", "atomic_write_text"]

_log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{9})$")
_MANIFEST = "segnn_manifest.json"
_FORMAT = "segnn_jax.checkpoint/2"
# Manifests of format 1 have no digest of their own; they are still restored, checked as before.
_FORMAT_WITHOUT_DIGEST = "segnn_jax.checkpoint/1"
_MANIFEST_DIGEST = "manifest_sha256"


class CheckpointError(OSError):
    """A checkpoint cannot be used: missing, of another model, or corrupt."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are missing, truncated or altered (its hashes do not match)."""


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Writes ``text`` to ``path`` atomically: temporary file beside it, fsync, replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: Dict[str, Any]) -> str:
    """SHA-256 of a manifest's entries other than its own digest, in a canonical JSON form."""
    entries = {key: value for key, value in manifest.items() if key != _MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _payload_files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != _MANIFEST)


def _flatten(tree: Any) -> Tuple[List[str], List[np.ndarray]]:
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_paths]
    arrays = []
    for path, (_, leaf) in zip(paths, leaves_with_paths):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise TypeError(f"{path}: typed PRNG keys are not stored; use raw uint32 keys")
        arrays.append(np.asarray(jax.device_get(leaf)))
    return paths, arrays


class CheckpointManager:
    """Saves and restores training states under one directory, keeping the latest and the best.

    Args:
        directory: where the ``step_*`` directories live (created if needed).
        keep: number of most recent checkpoints to keep (>= 2, so that a corrupt latest one has a
            fallback); the best one is kept in addition.
    """

    def __init__(self, directory: Union[str, Path], *, keep: int = 2):
        if keep < 2:
            raise ValueError(
                f"keep must be >= 2 so that a corrupt checkpoint has a fallback, got {keep}")
        self.directory = Path(directory).resolve()  # orbax needs absolute paths
        self.keep = keep
        self._is_writer = jax.process_index() == 0
        if self._is_writer:
            self.directory.mkdir(parents=True, exist_ok=True)

    def check_writable(self, state: Any) -> None:
        """Fails now, not after an epoch of training, if checkpoints of ``state`` cannot be written.

        Writes and removes a probe file in the checkpoint directory, then compares the free space
        with what the retained checkpoints need (``keep`` recent + the best + one being written).

        Raises:
            CheckpointError: the directory is not writable, or too little space is free.
        """
        if not self._is_writer:
            return
        probe = self.directory / ".segnn_write_probe"
        try:
            atomic_write_text(probe, "probe")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(
                f"{self.directory}: cannot write checkpoints here "
                f"({e.strerror or type(e).__name__}: {e})") from e
        nbytes = sum(a.nbytes for a in _flatten(state)[1])
        needed = nbytes * (self.keep + 2)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointError(
                f"{self.directory}: {free / 1e6:.1f} MB free, but the checkpoints of this "
                f"{nbytes / 1e6:.1f} MB state need about {needed / 1e6:.1f} MB "
                f"({self.keep} recent, the best and one being written)")

    def _checkpointer(self):
        import orbax.checkpoint as ocp

        return ocp.StandardCheckpointer(
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=0, active_processes={0}))

    def _path(self, step: int) -> Path:
        return self.directory / f"step_{step:09d}"

    def steps(self) -> List[int]:
        """Steps of the committed checkpoints (those with a manifest), ascending."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / _MANIFEST).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def best(self) -> Optional[Dict[str, Any]]:
        """``{"step": int, "metric": float}`` of the best checkpoint, or ``None``."""
        path = self.directory / "best.json"
        if not path.is_file():
            return None
        try:
            best = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}: unreadable best-checkpoint pointer ({e})") from e
        if not (isinstance(best, dict) and type(best.get("step")) is int
                and type(best.get("metric")) in (int, float)):
            raise CorruptCheckpointError(f"{path}: malformed best-checkpoint pointer {best!r}")
        return best

    def save(self, state: Any, *, step: int, loop_state: Optional[Dict[str, Any]] = None,
             best_metric: Optional[float] = None) -> Optional[Path]:
        """Writes a checkpoint of ``state`` (any pytree of arrays) atomically.

        Args:
            state: the pytree to save (e.g. a TrainState; arrays are fetched to the host).
            step: the optimiser step, names the checkpoint.
            loop_state: JSON-serialisable state of the training loop (epoch, position in the epoch,
                best metric, ...), returned by the restore functions.
            best_metric: if given, this checkpoint becomes the best one, with this metric.

        Returns:
            The checkpoint's directory (``None`` on processes other than 0, which do not write).
        """
        paths, arrays = _flatten(state)
        if not self._is_writer:
            return None
        target = self._path(step)
        if target.exists():
            shutil.rmtree(target)
        ckptr = self._checkpointer()
        ckptr.save(target, {f"leaf_{i:05d}": a for i, a in enumerate(arrays)})
        ckptr.wait_until_finished()
        ckptr.close()
        manifest = {
            "format": _FORMAT,
            "step": int(step),
            "leaves": [{"path": p, "shape": list(a.shape), "dtype": a.dtype.name}
                       for p, a in zip(paths, arrays)],
            "files": {str(f.relative_to(target)): _sha256(f) for f in _payload_files(target)},
            "loop_state": loop_state or {},
        }
        manifest[_MANIFEST_DIGEST] = _manifest_digest(manifest)
        atomic_write_text(target / _MANIFEST, json.dumps(manifest, indent=1))
        if best_metric is not None:
            atomic_write_text(self.directory / "best.json",
                              json.dumps({"step": int(step), "metric": float(best_metric)}))
        self._prune()
        return target

    def _prune(self) -> None:
        steps = self.steps()
        best = None
        try:
            best = (self.best() or {}).get("step")
        except CheckpointError:
            pass
        keep = set(steps[-self.keep:]) | ({best} if best is not None else set())
        for s in steps:
            if s not in keep:
                shutil.rmtree(self._path(s), ignore_errors=True)
        # Leftovers of interrupted saves: orbax temporaries and step directories without manifest.
        committed = set(self.steps())
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if p.is_dir() and ((m and int(m.group(1)) not in committed)
                               or ".orbax-checkpoint-tmp" in p.name):
                shutil.rmtree(p, ignore_errors=True)

    def restore(self, template: Any, step: int) -> Tuple[Any, Dict[str, Any]]:
        """Restores the checkpoint of ``step`` into the structure of ``template``.

        Args:
            template: a pytree of the same structure, shapes and dtypes (e.g. a fresh TrainState).
            step: which checkpoint.

        Returns:
            ``(state, loop_state)``; the state's leaves are NumPy arrays.

        Raises:
            CorruptCheckpointError: missing or unreadable manifest, or a payload file missing,
                truncated or altered.
            CheckpointError: the checkpoint holds another structure (another model or optimiser).
        """
        path = self._path(step)
        manifest_path = path / _MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
            files, leaves = manifest["files"], manifest["leaves"]
            # A manifest that parses but has the wrong layout is as unusable as a missing one.
            if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
                    and isinstance(leaves, list)):
                raise TypeError("'files' must map names to digests and 'leaves' be a list")
            saved = [(d["path"], tuple(d["shape"]), d["dtype"]) for d in leaves]
            if not isinstance(manifest.get("loop_state", {}), dict):
                raise TypeError("'loop_state' must be a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(
                f"{manifest_path}: missing or unreadable manifest ({e})") from e
        if manifest.get("format") not in (_FORMAT, _FORMAT_WITHOUT_DIGEST):
            # Corrupt for restore_latest's purposes: a damaged manifest reads like this too, and
            # the previous checkpoint is then the one to use (the warning names this one).
            raise CorruptCheckpointError(
                f"{manifest_path}: unknown format {manifest.get('format')!r} (expected "
                f"{_FORMAT!r}: damaged, or written by another version of segnn_jax)")
        # Without this, a damaged byte in a dtype or shape of the manifest read as a checkpoint of
        # another model (CheckpointError), and restore_latest stopped there instead of falling
        # back to the previous good checkpoint.
        if (manifest["format"] == _FORMAT
                and manifest.get(_MANIFEST_DIGEST) != _manifest_digest(manifest)):
            raise CorruptCheckpointError(
                f"{manifest_path}: the manifest is altered (its SHA-256 does not match)")
        for name, digest in files.items():
            f = path / name
            if not f.is_file():
                raise CorruptCheckpointError(f"{path}: file {name} is missing")
            if _sha256(f) != digest:
                raise CorruptCheckpointError(
                    f"{path}: file {name} is truncated or altered (SHA-256 mismatch)")
        paths, arrays = _flatten(template)
        wanted = [(p, a.shape, a.dtype.name) for p, a in zip(paths, arrays)]
        if saved != wanted:
            diff = next(((s, w) for s, w in zip(saved, wanted) if s != w),
                        (f"{len(saved)} leaves", f"{len(wanted)} leaves"))
            raise CheckpointError(f"{path}: checkpoint does not match the model/optimiser: "
                                  f"saved {diff[0]}, expected {diff[1]}")
        abstract = {f"leaf_{i:05d}": jax.ShapeDtypeStruct(a.shape, a.dtype)
                    for i, a in enumerate(arrays)}
        ckptr = self._checkpointer()
        try:
            restored = ckptr.restore(path, abstract)
        except Exception as e:  # orbax/tensorstore raise many types for unreadable data
            raise CorruptCheckpointError(f"{path}: orbax could not read the payload ({e})") from e
        finally:
            ckptr.close()
        values = [np.asarray(restored[f"leaf_{i:05d}"]) for i in range(len(arrays))]
        treedef = jax.tree_util.tree_structure(template)
        return jax.tree_util.tree_unflatten(treedef, values), manifest.get("loop_state", {})

    def restore_latest(self, template: Any) -> Optional[Tuple[Any, Dict[str, Any], int]]:
        """Restores the newest good checkpoint, falling back past corrupt ones.

        Returns:
            ``(state, loop_state, step)``, or ``None`` if there is no checkpoint at all.

        Raises:
            CheckpointError: checkpoints exist but none is usable (the message lists why).
        """
        steps = self.steps()
        problems = []
        for step in reversed(steps):
            try:
                state, loop_state = self.restore(template, step)
            except CorruptCheckpointError as e:
                _log.warning("skipping corrupt checkpoint: %s", e)
                problems.append(str(e))
                continue
            if problems:
                _log.warning("resuming from the previous good checkpoint, step %d", step)
            return state, loop_state, step
        if problems:
            raise CorruptCheckpointError("no usable checkpoint in "
                                         f"{self.directory}: " + "; ".join(problems))
        return None

    def restore_best(self, template: Any) -> Tuple[Any, Dict[str, Any], int]:
        """Restores the best-by-validation checkpoint (or the latest if no best was recorded)."""
        best = self.best()
        if best is None:
            latest = self.restore_latest(template)
            if latest is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
            return latest
        state, loop_state = self.restore(template, int(best["step"]))
        return state, loop_state, int(best["step"])
