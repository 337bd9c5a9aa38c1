"""Readers of the OC20 data formats into one NumPy record type, without torch.

Formats (see DATA.md §3):

* legacy IS2RE / S2EF LMDB (``*.lmdb``): single-file LMDB, keys ``b"0"`` ..
  ``b"N-1"`` (optionally ``b"length"``), values pickled ``torch_geometric``
  ``Data`` objects, decoded by the restricted unpickler of
  :mod:`segnn_jax.datasets.safe_pickle`;
* ASE LMDB database (``*.aselmdb``, PyPI ``ase-db-backends``), the format of the
  newer fairchem data sets and of the EMT stand-in (:mod:`segnn_jax.datasets.emt`);
* anything ``ase.io.read`` understands (extxyz S2EF files, ASE JSON, ...).

Every reader returns :class:`OC20Record` objects with the same fields and
conventions: Angstrom, eV, cell vectors as rows, tags 0 (sub-surface) / 1
(surface) / 2 (adsorbate), ``fixed`` True for atoms held fixed in the
relaxation. The ``lmdb`` and ``ase-db-backends`` packages (``oc20`` extra) are
imported only when an LMDB file is opened.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from segnn_jax.datasets.safe_pickle import (
    MalformedPickleError,
    UnsafePickleError,
    pyg_data_to_dict,
    safe_loads,
)

__all__ = [
    "LegacyLMDB",
    "OC20FormatError",
    "OC20Record",
    "read_ase_frames",
    "read_aselmdb",
    "read_legacy_lmdb",
    "read_oc20",
    "record_from_atoms",
]

# Fields of the legacy PyG objects that become record fields; everything else goes to extras.
_LEGACY_KNOWN = {
    "pos",
    "cell",
    "atomic_numbers",
    "natoms",
    "tags",
    "fixed",
    "sid",
    "y_init",
    "y_relaxed",
    "pos_relaxed",
    "force",
    "forces",
    "y",
    "energy",
    "pbc",
}
# Per-row keys of ASE databases / atoms.info that map onto record fields.
_ASE_KNOWN = {"sid", "y_init", "y_relaxed", "pos_relaxed"}
# Files read from a directory; lock files, manifests and temporary files are skipped.
_DIRECTORY_SUFFIXES = {".lmdb", ".aselmdb", ".extxyz", ".xyz"}


class OC20FormatError(ValueError):
    """Raised when a data file is unreadable, truncated or does not match its format."""


@dataclasses.dataclass(frozen=True)
class OC20Record:
    """One structure of an OC20-style data set.

    Attributes:
        positions: [n, 3] float64 Cartesian positions (the initial structure in IS2RE data).
        cell: [3, 3] float64 cell vectors as rows.
        pbc: [3] bool periodicity flags.
        atomic_numbers: [n] int64.
        natoms: number of atoms n.
        tags: [n] int64, 0 sub-surface, 1 surface, 2 adsorbate.
        fixed: [n] bool, True for atoms fixed during the relaxation.
        sid: system id (int in OC20; None when the file has none).
        y_init: adsorption energy (eV) of the initial structure, if stored.
        y_relaxed: relaxed adsorption energy (eV), the IS2RE target, if stored.
        pos_relaxed: [n, 3] float64 relaxed positions, if stored.
        energy: total energy (eV) of this frame, if stored (S2EF).
        forces: [n, 3] float64 forces (eV/A) of this frame, if stored (S2EF).
        extras: any other stored fields (labels, per-frame arrays, ...).
        source: "<file>#<index>" of the entry, for error messages.
    """

    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    atomic_numbers: np.ndarray
    natoms: int
    tags: np.ndarray
    fixed: np.ndarray
    sid: int | str | None = None
    y_init: float | None = None
    y_relaxed: float | None = None
    pos_relaxed: np.ndarray | None = None
    energy: float | None = None
    forces: np.ndarray | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""


def _scalar(value: Any, name: str, source: str) -> float | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64)
    if arr.size != 1:
        raise OC20FormatError(f"{source}: field {name!r} should be a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


def _integral(values: Any, name: str, source: str, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise OC20FormatError(f"{source}: field {name!r} has shape {arr.shape}, expected ({n},)")
    out = np.rint(arr).astype(np.int64) if arr.dtype.kind == "f" else arr.astype(np.int64)
    if arr.dtype.kind == "f" and not np.array_equal(out, arr):
        raise OC20FormatError(f"{source}: field {name!r} holds non-integer values")
    return out


def _make_record(**fields: Any) -> OC20Record:
    """:func:`_build_record`, with any conversion error of a stored value reported as a format
    error naming the entry (a string where a number belongs, an object array, ...)."""
    try:
        return _build_record(**fields)
    except OC20FormatError:
        raise
    except (ValueError, TypeError, OverflowError) as err:
        raise OC20FormatError(
            f"{fields['source']}: malformed field value ({type(err).__name__}: {err})"
        ) from err


def _build_record(
    *,
    source: str,
    positions: Any,
    cell: Any,
    pbc: Any,
    atomic_numbers: Any,
    tags: Any,
    fixed: Any,
    natoms: Any = None,
    sid: Any = None,
    y_init: Any = None,
    y_relaxed: Any = None,
    pos_relaxed: Any = None,
    energy: Any = None,
    forces: Any = None,
    extras: dict[str, Any] | None = None,
) -> OC20Record:
    """Validate and normalise the fields shared by all readers."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise OC20FormatError(f"{source}: positions have shape {positions.shape}, expected [n, 3]")
    n = len(positions)
    if not np.all(np.isfinite(positions)):
        raise OC20FormatError(f"{source}: positions contain non-finite values")
    if natoms is not None and int(np.asarray(natoms).reshape(())) != n:
        raise OC20FormatError(f"{source}: natoms={natoms} but there are {n} positions")
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape == (1, 3, 3):
        cell = cell[0]
    if cell.shape != (3, 3):
        raise OC20FormatError(f"{source}: cell has shape {cell.shape}, expected [3, 3]")
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    fixed_arr = np.asarray(fixed)
    if fixed_arr.shape != (n,):
        raise OC20FormatError(
            f"{source}: field 'fixed' has shape {fixed_arr.shape}, expected ({n},)"
        )
    if sid is not None and not isinstance(sid, str):
        sid = int(np.asarray(sid).reshape(()))
    arrays = {}
    for name, value in (("pos_relaxed", pos_relaxed), ("forces", forces)):
        if value is not None:
            value = np.asarray(value, dtype=np.float64)
            if value.shape != (n, 3):
                raise OC20FormatError(
                    f"{source}: field {name!r} has shape {value.shape}, expected ({n}, 3)"
                )
        arrays[name] = value
    return OC20Record(
        positions=positions,
        cell=cell,
        pbc=pbc,
        atomic_numbers=_integral(atomic_numbers, "atomic_numbers", source, n),
        natoms=n,
        tags=_integral(tags, "tags", source, n),
        fixed=fixed_arr.astype(bool),
        sid=sid,
        y_init=_scalar(y_init, "y_init", source),
        y_relaxed=_scalar(y_relaxed, "y_relaxed", source),
        pos_relaxed=arrays["pos_relaxed"],
        energy=_scalar(energy, "energy", source),
        forces=arrays["forces"],
        extras=dict(extras or {}),
        source=source,
    )


def _require(module: str, extra: str = "oc20") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"reading this format needs the '{module}' package: pip install 'segnn[{extra}]'"
        ) from err


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise OC20FormatError(f"{path}: is a directory, expected a single file")


def _check_lmdb_complete(path: Path, env: Any) -> None:
    """Refuse a truncated LMDB file before any read.

    LMDB memory-maps the file; reading a page past the end of a truncated file
    would kill the process with SIGBUS instead of raising, so the file must be
    at least as long as the pages the last committed transaction uses.
    """
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = path.stat().st_size
    if size < needed:
        raise OC20FormatError(
            f"{path}: truncated LMDB file ({size} bytes, its pages need {needed})"
        )


class LegacyLMDB(Sequence[OC20Record]):
    """Lazy, read-only view of a legacy OC20 LMDB file (pickled PyG ``Data`` values).

    Entries are decoded on access, so a data set of hundreds of thousands of
    structures costs no memory up front. Use as a context manager or call
    :meth:`close`. Open one instance per process: an LMDB environment must not
    be carried across ``fork``.

    Args:
        path: the ``.lmdb`` file (single-file LMDB, ``subdir=False``).

    Raises:
        FileNotFoundError: the file does not exist.
        OC20FormatError: the file is not a readable LMDB.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        lmdb = _require("lmdb")
        self.path = Path(path)
        _check_file(self.path)
        try:
            self._env = lmdb.open(
                str(self.path),
                subdir=False,
                readonly=True,
                lock=False,
                readahead=False,
                meminit=False,
                max_readers=1,
            )
            try:
                _check_lmdb_complete(self.path, self._env)
                with self._env.begin() as txn:
                    length = txn.get(b"length")
                    entries = self._env.stat()["entries"]
            except BaseException:
                self._env.close()
                raise
        except lmdb.Error as err:
            raise OC20FormatError(f"{self.path}: not a readable LMDB file ({err})") from err
        if length is not None:
            try:
                n = safe_loads(length)
            except (UnsafePickleError, MalformedPickleError) as err:
                raise OC20FormatError(f"{self.path}: bad 'length' entry: {err}") from err
            if not isinstance(n, int) or not 0 <= n < entries:
                raise OC20FormatError(
                    f"{self.path}: 'length' entry {n!r} inconsistent with {entries} keys"
                )
            self._length = n
        else:
            self._length = entries
        self._lmdb_error = lmdb.Error

    def __len__(self) -> int:
        return self._length

    def raw(self, index: int) -> dict[str, Any]:
        """Decoded fields of entry ``index`` exactly as stored (NumPy arrays / scalars)."""
        if not -self._length <= index < self._length:
            raise IndexError(
                f"index {index} out of range for {self._length} entries in {self.path}"
            )
        index %= self._length
        try:
            with self._env.begin() as txn:
                value = txn.get(str(index).encode("ascii"))
        except self._lmdb_error as err:
            raise OC20FormatError(f"{self.path}: cannot read entry {index} ({err})") from err
        if value is None:
            raise OC20FormatError(
                f"{self.path}: key {index!r} missing (keys must be 0..{self._length - 1})"
            )
        try:
            return pyg_data_to_dict(safe_loads(value))
        except UnsafePickleError as err:
            raise UnsafePickleError(f"{self.path}#{index}: {err}") from err
        except MalformedPickleError as err:
            raise OC20FormatError(f"{self.path}#{index}: {err}") from err

    def __getitem__(self, index: int) -> OC20Record:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"LegacyLMDB indices must be integers, got {type(index).__name__}")
        fields = self.raw(int(index))
        source = f"{self.path}#{int(index) % self._length}"
        missing = {"pos", "cell", "atomic_numbers"} - set(fields)
        if missing:
            raise OC20FormatError(f"{source}: missing field(s) {sorted(missing)}")
        n = len(np.asarray(fields["pos"]))
        forces = fields.get("forces", fields.get("force"))
        return _make_record(
            source=source,
            positions=fields["pos"],
            cell=fields["cell"],
            pbc=fields.get("pbc", True),  # OC20 systems are periodic in all three directions
            atomic_numbers=fields["atomic_numbers"],
            natoms=fields.get("natoms"),
            tags=fields.get("tags", np.zeros(n)),
            fixed=fields.get("fixed", np.zeros(n)),
            sid=fields.get("sid"),
            y_init=fields.get("y_init"),
            y_relaxed=fields.get("y_relaxed"),
            pos_relaxed=fields.get("pos_relaxed"),
            energy=fields.get("y", fields.get("energy")),
            forces=forces,
            extras={k: v for k, v in fields.items() if k not in _LEGACY_KNOWN},
        )

    def __iter__(self) -> Iterator[OC20Record]:
        for i in range(self._length):
            yield self[i]

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_legacy_lmdb(path: str | os.PathLike) -> list[OC20Record]:
    """All entries of a legacy OC20 LMDB file (see :class:`LegacyLMDB` for a lazy view)."""
    with LegacyLMDB(path) as db:
        return list(db)


def record_from_atoms(atoms: Any, source: str, info: dict[str, Any] | None = None) -> OC20Record:
    """Record from an ``ase.Atoms`` (tags, FixAtoms constraints, calculator results).

    Args:
        atoms: the structure.
        source: label for error messages.
        info: extra per-structure fields (database key-value pairs and data),
            merged over ``atoms.info``; ``sid``, ``y_init``, ``y_relaxed`` and
            ``pos_relaxed`` become record fields, the rest goes to ``extras``.
    """
    from ase.constraints import FixAtoms

    fields = {**atoms.info, **(info or {})}
    n = len(atoms)
    fixed = np.zeros(n, dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = True
    energy = forces = None
    if atoms.calc is not None:
        results = getattr(atoms.calc, "results", {})
        energy = results.get("energy")
        forces = results.get("forces")
    return _make_record(
        source=source,
        positions=atoms.get_positions(),
        cell=atoms.get_cell().array,
        pbc=atoms.get_pbc(),
        atomic_numbers=atoms.get_atomic_numbers(),
        tags=atoms.get_tags(),
        fixed=fixed,
        sid=fields.get("sid"),
        y_init=fields.get("y_init"),
        y_relaxed=fields.get("y_relaxed"),
        pos_relaxed=fields.get("pos_relaxed"),
        energy=energy,
        forces=forces,
        extras={k: v for k, v in fields.items() if k not in _ASE_KNOWN},
    )


def read_aselmdb(path: str | os.PathLike) -> list[OC20Record]:
    """All rows of an ASE LMDB database (``.aselmdb``), in row-id order.

    Row key-value pairs and ``row.data`` are merged into the record fields
    (``sid``, ``y_init``, ``y_relaxed``, ``pos_relaxed``) and ``extras``.

    Raises:
        FileNotFoundError: the file does not exist.
        OC20FormatError: the file is not a readable ASE LMDB database.
    """
    lmdb = _require("lmdb")
    _require("ase_db_backends")
    import ase.db

    path = Path(path)
    _check_file(path)
    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_readers=1)
        try:
            _check_lmdb_complete(path, env)
        finally:
            env.close()
        db = ase.db.connect(str(path), type="aselmdb", readonly=True, use_lock_file=False)
        try:
            records = [
                record_from_atoms(
                    row.toatoms(),
                    f"{path}#{row.id}",
                    {**row.key_value_pairs, **dict(row.get("data", {}))},
                )
                for row in db.select()
            ]
        finally:
            db.close()
    except (lmdb.Error, zlib.error, KeyError, ValueError, TypeError, AttributeError, IndexError,
            AssertionError) as err:
        # ase-db-backends stores zlib-compressed JSON rows and checks them with assert; a damaged
        # row surfaces as any of these.
        if isinstance(err, OC20FormatError):
            raise
        raise OC20FormatError(
            f"{path}: not a readable ASE LMDB database ({type(err).__name__}: {err})"
        ) from err
    if not records:
        # Also what a damaged file whose B-tree root was lost looks like (found by fuzzing).
        raise OC20FormatError(f"{path}: the ASE LMDB database holds no structures")
    return records


def read_ase_frames(path: str | os.PathLike, format: str | None = None) -> list[OC20Record]:
    """All frames of a file ``ase.io.read`` understands (extxyz, ASE JSON, traj, ...).

    Raises:
        FileNotFoundError: the file does not exist.
        OC20FormatError: ASE cannot parse the file.
    """
    import ase.io

    path = Path(path)
    _check_file(path)
    try:
        frames = ase.io.read(str(path), ":", format=format)
    except Exception as err:
        raise OC20FormatError(
            f"{path}: cannot parse as {format or 'an ASE-readable file'} "
            f"({type(err).__name__}: {err})"
        ) from err
    if not frames:
        raise OC20FormatError(f"{path}: contains no frames")
    return [record_from_atoms(atoms, f"{path}#{i}") for i, atoms in enumerate(frames)]


def read_oc20(path: str | os.PathLike) -> list[OC20Record]:
    """Read a file or a directory of files, choosing the reader by suffix.

    ``.lmdb`` -> legacy PyG LMDB, ``.aselmdb`` -> ASE LMDB database, anything
    else -> ``ase.io.read``. A directory is read file by file in sorted name
    order (e.g. the shards written by :func:`segnn_jax.datasets.emt.generate_emt_dataset`);
    only its ``.lmdb``, ``.aselmdb``, ``.extxyz`` and ``.xyz`` files are read.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _DIRECTORY_SUFFIXES)
        if not files:
            raise OC20FormatError(f"{path}: directory holds no data files")
        return [record for f in files for record in read_oc20(f)]
    if path.suffix == ".lmdb":
        return read_legacy_lmdb(path)
    if path.suffix == ".aselmdb":
        return read_aselmdb(path)
    return read_ase_frames(path)
