"""QM9: readers for the formats QM9 is held in, a checked cache, the standard split and targets.

Every reader returns the same in-memory structure, :class:`QM9Molecules`: the atoms of all molecules
concatenated, with per-molecule atom counts, the QM9 (GDB) index, and the 15 properties of the
original files in the ORIGINAL units of the files (:data:`PROPERTY_NAMES`, :data:`PROPERTY_UNITS`).
Conversion to the units of the SEGNN paper (meV for energies) happens only in :func:`target_values`.

Sources:

* the original ``dsgdb9nsd_NNNNNN.xyz`` files, in a folder or a tar archive (:func:`read_original`);
* the CSVs of the PyPI package ``qm9pack`` (the whole characterised set, 130,831 molecules), found
  with :func:`qm9pack_csv_paths` and read by :func:`read_qm9pack_csv` (no pandas);
* ASE databases such as the one schnetpack writes (:func:`read_ase_db`).

:func:`load_qm9` reads a source once and caches it as an ``.npz`` with a sha256 checksum under
:func:`default_data_dir`; a missing, stale or corrupt cache is rebuilt.

Shape letters: M molecules, A atoms of all molecules together, E edges, K targets.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import lzma
import os
import re
import sqlite3
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import (
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np

__all__ = [
    "ATOM_REFERENCES_HARTREE",
    "ATOMIC_NUMBERS",
    "ELEMENTS",
    "HARTREE_TO_EV",
    "N_CHARACTERISED",
    "PROPERTY_NAMES",
    "PROPERTY_UNITS",
    "QM9DataNotFoundError",
    "QM9Error",
    "QM9FormatError",
    "QM9Molecules",
    "SPLIT_SIZES",
    "TARGETS",
    "Target",
    "atom_reference_energy",
    "cormorant_split",
    "default_data_dir",
    "graph_statistics",
    "load_qm9",
    "load_cache",
    "molecules_to_graphs",
    "one_hot_elements",
    "parse_xyz_text",
    "qm9pack_csv_paths",
    "radius_edges",
    "read_ase_db",
    "read_original",
    "read_qm9pack_csv",
    "save_cache",
    "split_molecules",
    "target_values",
]

PathLike = Union[str, os.PathLike]

ELEMENTS: Tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS: Tuple[int, ...] = (1, 6, 7, 8, 9)
_Z_OF_SYMBOL = dict(zip(ELEMENTS, ATOMIC_NUMBERS))
# Position of each allowed atomic number in the one-hot encoding; -1 marks a forbidden element.
_ELEMENT_SLOT = np.full(128, -1, np.int64)
_ELEMENT_SLOT[list(ATOMIC_NUMBERS)] = np.arange(len(ATOMIC_NUMBERS))

PROPERTY_NAMES: Tuple[str, ...] = (
    "A",
    "B",
    "C",
    "mu",
    "alpha",
    "homo",
    "lumo",
    "gap",
    "r2",
    "zpve",
    "U0",
    "U",
    "H",
    "G",
    "Cv",
)
PROPERTY_UNITS: Dict[str, str] = {
    "A": "GHz",
    "B": "GHz",
    "C": "GHz",
    "mu": "D",
    "alpha": "a0^3",
    "homo": "Ha",
    "lumo": "Ha",
    "gap": "Ha",
    "r2": "a0^2",
    "zpve": "Ha",
    "U0": "Ha",
    "U": "Ha",
    "H": "Ha",
    "G": "Ha",
    "Cv": "cal/mol/K",
}
_COLUMN = {name: k for k, name in enumerate(PROPERTY_NAMES)}

HARTREE_TO_EV = 27.211386246
N_CHARACTERISED = 130_831
N_ORIGINAL = 133_885
SPLIT_SIZES = {"train": 100_000, "valid": 17_748, "test": 13_083}

#: Energies of the free atoms (Hartree), QM9's own reference table, for atomisation energies.
ATOM_REFERENCES_HARTREE: Dict[str, Dict[int, float]] = {
    "U0": {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730},
    "U": {1: -0.498857, 6: -37.845355, 7: -54.582445, 8: -75.063163, 9: -99.717314},
    "H": {1: -0.497912, 6: -37.844411, 7: -54.581501, 8: -75.062219, 9: -99.716370},
    "G": {1: -0.510927, 6: -37.861317, 7: -54.598897, 8: -75.079532, 9: -99.733544},
}

_CACHE_VERSION = 1


class QM9Error(Exception):
    """Base class of the errors raised by this module."""


class QM9FormatError(QM9Error, ValueError):
    """A QM9 file that does not follow its format.

    Attributes:
        source: the file (``archive.tar.bz2:member`` inside an archive).
        line: the 1-based line number of the problem, or None when it concerns the whole file.
    """

    def __init__(self, source: str, line: Optional[int], message: str):
        self.source = str(source)
        self.line = line
        where = f"{self.source}, line {line}" if line is not None else self.source
        super().__init__(f"{where}: {message}")


class QM9DataNotFoundError(QM9Error, FileNotFoundError):
    """The requested QM9 source is not on this machine."""


@dataclasses.dataclass(frozen=True, eq=False)
class QM9Molecules:
    """Molecules stored as concatenated arrays (host side, NumPy).

    Attributes:
        atomic_numbers: ``[A]`` uint8, Z of every atom, molecule after molecule.
        positions: ``[A, 3]`` float64, Angstrom.
        n_atoms: ``[M]`` int32, atoms per molecule.
        index: ``[M]`` int32, the QM9 (GDB) index of each molecule, 1-based as in the files.
        properties: ``[M, 15]`` float64, the columns :data:`PROPERTY_NAMES` in the units
            :data:`PROPERTY_UNITS` of the original files.
    """

    atomic_numbers: np.ndarray
    positions: np.ndarray
    n_atoms: np.ndarray
    index: np.ndarray
    properties: np.ndarray

    def __post_init__(self):
        arrays = {
            "atomic_numbers": np.ascontiguousarray(self.atomic_numbers, dtype=np.uint8),
            "positions": np.ascontiguousarray(self.positions, dtype=np.float64),
            "n_atoms": np.ascontiguousarray(self.n_atoms, dtype=np.int32),
            "index": np.ascontiguousarray(self.index, dtype=np.int32),
            "properties": np.ascontiguousarray(self.properties, dtype=np.float64),
        }
        for name, value in arrays.items():
            object.__setattr__(self, name, value)
        m, a = len(self.n_atoms), int(self.n_atoms.sum())
        expected = {
            "atomic_numbers": (a,),
            "positions": (a, 3),
            "n_atoms": (m,),
            "index": (m,),
            "properties": (m, len(PROPERTY_NAMES)),
        }
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ValueError(
                    f"QM9Molecules.{name} must have shape {shape}, got {arrays[name].shape}"
                )
        if m and self.n_atoms.min() < 1:
            raise ValueError("every molecule needs at least one atom")

    def __len__(self) -> int:
        return len(self.n_atoms)

    @property
    def offsets(self) -> np.ndarray:
        """``[M + 1]`` int64: atoms of molecule m are ``offsets[m]:offsets[m + 1]``."""
        return np.concatenate([[0], np.cumsum(self.n_atoms, dtype=np.int64)])

    def molecule(self, m: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(atomic_numbers [n], positions [n, 3])`` of molecule number ``m`` (not QM9 index)."""
        start = int(self.n_atoms[:m].sum())
        stop = start + int(self.n_atoms[m])
        return self.atomic_numbers[start:stop], self.positions[start:stop]

    def property(self, name: str) -> np.ndarray:
        """``[M]`` the column ``name`` of :data:`PROPERTY_NAMES`, in the original units."""
        if name not in _COLUMN:
            raise KeyError(f"unknown QM9 property {name!r}; known: {', '.join(PROPERTY_NAMES)}")
        return self.properties[:, _COLUMN[name]]

    def subset(self, molecules: Sequence[int]) -> "QM9Molecules":
        """The molecules at the given positions (not QM9 indices), in the given order."""
        molecules = np.asarray(molecules, dtype=np.int64)
        offsets = self.offsets
        counts = self.n_atoms[molecules]
        starts = np.repeat(offsets[molecules], counts)
        atoms = starts + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return QM9Molecules(
            self.atomic_numbers[atoms],
            self.positions[atoms],
            counts,
            self.index[molecules],
            self.properties[molecules],
        )

    def select_indices(self, qm9_indices: Iterable[int]) -> "QM9Molecules":
        """The molecules with the given QM9 indices, in that order (KeyError if one is absent)."""
        qm9_indices = np.asarray(list(qm9_indices), dtype=np.int64)
        order = np.argsort(self.index, kind="stable")
        found = np.searchsorted(self.index[order], qm9_indices)
        found = np.minimum(found, len(order) - 1)
        missing = self.index[order][found] != qm9_indices
        if missing.any():
            raise KeyError(f"QM9 indices not present: {qm9_indices[missing][:10].tolist()}")
        return self.subset(order[found])

    def sorted_by_index(self) -> "QM9Molecules":
        """The same molecules ordered by QM9 index (readers already return this order)."""
        return self.subset(np.argsort(self.index, kind="stable"))


def _concatenate(
    parts: Sequence[Tuple[int, np.ndarray, np.ndarray, np.ndarray]], source: str
) -> QM9Molecules:
    """Sorted molecules from ``(index, Z, positions, properties)`` tuples; rejects duplicates."""
    parts = sorted(parts, key=lambda part: part[0])
    index = np.array([part[0] for part in parts], dtype=np.int64)
    duplicates = index[1:][index[1:] == index[:-1]]
    if len(duplicates):
        raise QM9FormatError(source, None, f"QM9 index {int(duplicates[0])} occurs more than once")
    if not parts:
        return QM9Molecules(
            np.zeros(0),
            np.zeros((0, 3)),
            np.zeros(0),
            np.zeros(0),
            np.zeros((0, len(PROPERTY_NAMES))),
        )
    return QM9Molecules(
        atomic_numbers=np.concatenate([part[1] for part in parts]),
        positions=np.concatenate([part[2] for part in parts]),
        n_atoms=np.array([len(part[1]) for part in parts]),
        index=index,
        properties=np.stack([part[3] for part in parts]),
    )


# ----------------------------------------------------------------------------------------------
# Number and element parsing shared by the text readers


def _parse_float(token: str, source: str, line: int, what: str) -> float:
    # Mathematica writes exponents as "2.1997*^-6" in a few original files.
    try:
        value = float(token.replace("*^", "e"))
    except ValueError:
        raise QM9FormatError(source, line, f"bad number {token!r} for {what}") from None
    if not np.isfinite(value):
        raise QM9FormatError(source, line, f"non-finite number {token!r} for {what}")
    return value


def _parse_int(token: str, source: str, line: int, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise QM9FormatError(source, line, f"bad integer {token!r} for {what}") from None


# QM9Molecules stores indices as int32; a larger one would wrap around silently.
_MAX_INDEX = np.iinfo(np.int32).max


def _parse_index(token: str, source: str, line: int) -> int:
    index = _parse_int(token, source, line, "the QM9 index")
    if not 0 <= index <= _MAX_INDEX:
        raise QM9FormatError(
            source, line, f"QM9 index {index} out of range (0..{_MAX_INDEX})"
        )
    return index


def _atomic_number(symbol: str, source: str, line: int) -> int:
    z = _Z_OF_SYMBOL.get(symbol)
    if z is None:
        raise QM9FormatError(
            source, line, f"unknown element {symbol!r}: QM9 holds only {', '.join(ELEMENTS)}"
        )
    return z


# ----------------------------------------------------------------------------------------------
# Original dsgdb9nsd_*.xyz files

_ORIGINAL_NAME = re.compile(r"dsgdb9nsd_\d+\.xyz$")


def parse_xyz_text(
    text: str, source: str = "<string>"
) -> Tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Parses one molecule in the original QM9 extended-xyz layout.

    The layout (tab separated, numbers may carry a leading space or a Mathematica ``*^`` exponent):
    line 1 the number of atoms n; line 2 ``gdb <index>`` and the 15 properties; n lines
    ``El x y z q``; then frequencies, SMILES and InChI (checked to be present, not used).

    Args:
        text: the whole file.
        source: name used in error messages.

    Returns:
        ``(qm9_index, atomic_numbers [n], positions [n, 3], properties [15])``.

    Raises:
        QM9FormatError: the text does not follow the layout; the message names source and line.
    """
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise QM9FormatError(source, 1, "empty file, expected the number of atoms")
    n = _parse_int(lines[0].strip(), source, 1, "the number of atoms")
    if n < 1:
        raise QM9FormatError(source, 1, f"number of atoms must be positive, got {n}")
    if len(lines) < 2:
        raise QM9FormatError(
            source, 2, "truncated file: missing the 'gdb <index> ...' property line"
        )
    tokens = lines[1].split()
    if len(tokens) != 2 + len(PROPERTY_NAMES) or tokens[0] != "gdb":
        raise QM9FormatError(
            source,
            2,
            f"expected 'gdb <index>' and {len(PROPERTY_NAMES)} properties, "
            f"got {len(tokens)} fields",
        )
    index = _parse_index(tokens[1], source, 2)
    properties = np.array(
        [_parse_float(token, source, 2, name) for token, name in zip(tokens[2:], PROPERTY_NAMES)]
    )
    # Filled atom by atom (not preallocated): a corrupt count like 10**12 must reach the
    # truncation check below instead of allocating terabytes.
    numbers: list[int] = []
    positions_list: list[list[float]] = []
    for k in range(n):
        line = k + 3
        if line > len(lines):
            raise QM9FormatError(
                source,
                line,
                f"truncated file: line 1 announces {n} atoms, the file ends after {k} atom line(s)",
            )
        fields = lines[line - 1].split()
        if len(fields) != 5:
            raise QM9FormatError(
                source,
                line,
                f"expected 'element x y z charge' for atom {k + 1} of {n}, "
                f"got {len(fields)} fields (is the atom count on line 1 right?)",
            )
        numbers.append(_atomic_number(fields[0], source, line))
        positions_list.append(
            [_parse_float(fields[1 + axis], source, line, "a coordinate") for axis in range(3)]
        )
    after = n + 3
    if len(lines) < after:
        raise QM9FormatError(source, after, "truncated file: missing the frequency line")
    # Frequency lines hold 3n-6 or 3n-5 numbers, never an element symbol: an atom line here means
    # line 1 undercounts the atoms.
    extra = lines[after - 1].split()
    if extra and extra[0].isalpha():
        raise QM9FormatError(source, after, f"an atom line after the {n} atoms announced on line 1")
    if len(lines) < n + 5:
        raise QM9FormatError(
            source, len(lines) + 1, "truncated file: missing the SMILES or InChI line"
        )
    return index, np.array(numbers, np.uint8), np.array(positions_list).reshape(n, 3), properties


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise QM9FormatError(
            source, None, f"not UTF-8 text (byte {error.start}: {error.reason})"
        ) from None


# What a damaged or truncated archive raises from the tarfile module and its decompressors.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def _iter_original_texts(path: Path) -> Iterator[Tuple[str, str]]:
    """Yields ``(source name, text)`` of every original-format file in a folder, archive or file."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _ORIGINAL_NAME.match(p.name) and p.is_file())
        for file in files:
            yield str(file), _decode(file.read_bytes(), str(file))
    elif _is_tarfile(path):
        # Members are read into memory only: nothing is ever extracted, so hostile member names
        # (absolute paths, "..", links) cannot write anywhere.
        yield from _iter_tar_texts(path)
    elif path.is_file():
        yield str(path), _decode(path.read_bytes(), str(path))
    else:
        raise QM9DataNotFoundError(f"no QM9 original-format data at {path}")


def _is_tarfile(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except _ARCHIVE_ERRORS:
        # A compressed archive cut short can fail even this probe.
        return path.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def _iter_tar_texts(path: Path) -> Iterator[tuple[str, str]]:
    member_name = None
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                member_name = member.name
                if not member.isfile() or not _ORIGINAL_NAME.match(Path(member.name).name):
                    continue
                raw = archive.extractfile(member).read()
                yield f"{path}:{member.name}", _decode(raw, f"{path}:{member.name}")
    except _ARCHIVE_ERRORS as error:
        where = f" after member {member_name}" if member_name else ""
        raise QM9FormatError(
            str(path), None, f"damaged or truncated archive{where} ({type(error).__name__}: {error})"
        ) from None


def read_original(path: PathLike) -> QM9Molecules:
    """Reads original-format QM9 files from a folder, tar archive (.tar, .tar.gz, .tar.bz2) or file.

    Only files named ``dsgdb9nsd_<digits>.xyz`` are read (in a folder: its top level).

    Returns:
        The molecules ordered by QM9 index.

    Raises:
        QM9FormatError: a malformed file (the message names file and line), or a repeated index.
        QM9DataNotFoundError: the path does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise QM9DataNotFoundError(f"no QM9 original-format data at {path}")
    parts = [parse_xyz_text(text, source) for source, text in _iter_original_texts(path)]
    if not parts:
        raise QM9FormatError(str(path), None, "no dsgdb9nsd_*.xyz files found")
    return _concatenate(parts, str(path))


# ----------------------------------------------------------------------------------------------
# qm9pack CSVs

_CSV_PROPERTY_COLUMNS: Dict[str, str] = {
    "A": "RotA_GHz",
    "B": "RotB_GHz",
    "C": "RotC_GHz",
    "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3",
    "homo": "HOMO_au",
    "lumo": "LUMO_au",
    "gap": "HOMO_LUMO_gap_au",
    "r2": "R2_bohr2",
    "zpve": "ZPVE_au",
    "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au",
    "H": "Enthalphy_298K_au",
    "G": "GibbsFreeEnergy_298K_au",
    "Cv": "Heatcapacity_Cv_cal_mol_K",
}
_CSV_REQUIRED = ("Index", "N_atoms", "Elements", "XYZ_Ang") + tuple(_CSV_PROPERTY_COLUMNS.values())


def qm9pack_csv_paths() -> List[Path]:
    """The three CSVs of the installed ``qm9pack`` package (``pip install 'segnn[qm9]'``).

    The package is located without importing it (its ``__init__`` needs pandas, which we do not).

    Raises:
        QM9DataNotFoundError: qm9pack is not installed or its data files are missing.
    """
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise QM9DataNotFoundError(
            "the full QM9 data set comes from the PyPI package qm9pack: "
            "pip install --no-deps 'qm9pack>=1.0.3' (or pip install 'segnn[qm9]')"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    paths = [data / f"qm9_part{k}.csv" for k in (1, 2, 3)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise QM9DataNotFoundError(f"qm9pack is installed but lacks {', '.join(missing)}")
    return paths


def _bracket_numbers(field: str) -> List[str]:
    # "[[0.5995394918,0.,1.],[...]]" is not JSON ("0.", "2.1997E-6"); N_atoms implies the nesting.
    return field.replace("[", "").replace("]", "").split(",")


def _read_one_csv(path: Path, parts: list) -> None:
    source = str(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise QM9FormatError(source, 1, "empty file, expected the qm9pack header") from None
        except (csv.Error, UnicodeDecodeError) as error:
            raise QM9FormatError(source, 1, f"unreadable header: {error}") from None
        missing = [name for name in _CSV_REQUIRED if name not in header]
        if missing:
            raise QM9FormatError(source, 1, f"header lacks the column(s) {', '.join(missing)}")
        width = len(header)
        col = {name: header.index(name) for name in _CSV_REQUIRED}
        c_index, c_n, c_el, c_xyz = col["Index"], col["N_atoms"], col["Elements"], col["XYZ_Ang"]
        prop_cols = [(name, col[_CSV_PROPERTY_COLUMNS[name]]) for name in PROPERTY_NAMES]
        try:
            while True:
                # A quoted field cut short swallows the following lines, so errors name the line
                # where the record starts.
                line = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    break
                if len(row) != width:
                    raise QM9FormatError(
                        source,
                        line,
                        f"expected {width} fields, got {len(row)} in the record on lines "
                        f"{line}-{reader.line_num} (truncated or unquoted row?)",
                    )
                n = _parse_int(row[c_n], source, line, "N_atoms")
                symbols = [s.strip().strip("'\"") for s in row[c_el].strip("[] ").split(",")]
                if len(symbols) != n:
                    raise QM9FormatError(
                        source, line, f"N_atoms is {n} but Elements lists {len(symbols)} atoms"
                    )
                coords = _bracket_numbers(row[c_xyz])
                if len(coords) != 3 * n:
                    raise QM9FormatError(
                        source,
                        line,
                        f"N_atoms is {n} but XYZ_Ang holds {len(coords)} numbers, expected {3 * n}",
                    )
                try:
                    positions = np.array([float(c) for c in coords]).reshape(n, 3)
                except ValueError:
                    positions = np.array(
                        [_parse_float(c, source, line, "XYZ_Ang") for c in coords]
                    ).reshape(n, 3)
                if not np.isfinite(positions).all():
                    raise QM9FormatError(source, line, "non-finite coordinate in XYZ_Ang")
                numbers = np.array([_atomic_number(s, source, line) for s in symbols], np.uint8)
                properties = np.array(
                    [_parse_float(row[c], source, line, name) for name, c in prop_cols]
                )
                parts.append(
                    (
                        _parse_index(row[c_index], source, line),
                        numbers,
                        positions,
                        properties,
                    )
                )
        except csv.Error as error:
            raise QM9FormatError(source, line, f"CSV syntax: {error}") from None
        except UnicodeDecodeError as error:
            raise QM9FormatError(
                source, line, f"not UTF-8 text ({error.reason})"
            ) from None


def read_qm9pack_csv(paths: Optional[Union[PathLike, Sequence[PathLike]]] = None) -> QM9Molecules:
    """Reads qm9pack-layout CSVs (default: the three of the installed package) with the csv module.

    Args:
        paths: one CSV or several; None means :func:`qm9pack_csv_paths`.

    Returns:
        The molecules of all files, ordered by QM9 index.

    Raises:
        QM9FormatError: a malformed row (message names file and line) or a repeated index.
        QM9DataNotFoundError: no such file, or qm9pack not installed.
    """
    if paths is None:
        paths = qm9pack_csv_paths()
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise QM9DataNotFoundError(f"no such QM9 CSV file: {path}")
    # csv refuses fields over 128 kB by default; QM9 fields are far below, keep the limit explicit.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 20))
    parts: list = []
    for path in paths:
        _read_one_csv(path, parts)
    return _concatenate(parts, ", ".join(map(str, paths)))


# ----------------------------------------------------------------------------------------------
# ASE databases

# Names under which databases store the 15 properties, ours first, then schnetpack's.
_ASE_PROPERTY_ALIASES: Dict[str, Tuple[str, ...]] = {
    "A": ("A", "rotational_constant_A"),
    "B": ("B", "rotational_constant_B"),
    "C": ("C", "rotational_constant_C"),
    "mu": ("mu", "dipole_moment"),
    "alpha": ("alpha", "isotropic_polarizability"),
    "homo": ("homo",),
    "lumo": ("lumo",),
    "gap": ("gap",),
    "r2": ("r2", "electronic_spatial_extent"),
    "zpve": ("zpve",),
    "U0": ("U0", "energy_U0"),
    "U": ("U", "energy_U"),
    "H": ("H", "enthalpy_H"),
    "G": ("G", "free_energy"),
    "Cv": ("Cv", "heat_capacity"),
}
# Factors from a unit a database may declare to the original QM9 unit of the property.
_UNIT_FACTORS: Dict[str, Dict[str, float]] = {
    "GHz": {"GHz": 1.0},
    "D": {"D": 1.0, "Debye": 1.0},
    "a0^3": {"a0^3": 1.0, "a0 a0 a0": 1.0, "Bohr^3": 1.0, "bohr^3": 1.0},
    "a0^2": {"a0^2": 1.0, "a0 a0": 1.0, "Bohr^2": 1.0, "bohr^2": 1.0},
    "Ha": {"Ha": 1.0, "Hartree": 1.0, "eV": 1.0 / HARTREE_TO_EV},
    "cal/mol/K": {"cal/mol/K": 1.0, "cal/mol K": 1.0, "cal/(mol K)": 1.0},
}
_INDEX_KEYS = ("index", "idx", "gdb_index", "qm9_index")


def read_ase_db(path: PathLike) -> QM9Molecules:
    """Reads an ASE database of QM9 molecules (e.g. schnetpack's layout).

    Properties are looked up in ``row.data`` and then in the key-value pairs, under our names or
    schnetpack's (``energy_U0``, ``dipole_moment``, ...). When the database metadata declares units
    (schnetpack's ``_property_unit_dict``) they are converted to the original QM9 units; an unknown
    unit raises. The QM9 index is the key ``index`` (or ``idx``, ``gdb_index``) when present, else
    the row id: schnetpack writes the molecules in QM9 order, so the row id is the index only for a
    database holding all 133,885 molecules or a prefix of them.

    Raises:
        QM9FormatError: a row lacks a property, has an unknown element, or a unit is unknown; the
            message names the database and the row id (as the "line").
        QM9DataNotFoundError: no such file.
    """
    import ase.db  # Optional dependency, needed only for this format.

    path = Path(path)
    if not path.is_file():
        raise QM9DataNotFoundError(f"no such ASE database: {path}")
    source = str(path)
    if path.stat().st_size == 0:
        # ASE would treat it as a new database (and write its tables into the user's file).
        raise QM9FormatError(source, None, "empty file, expected an ASE database")
    try:
        parts = _ase_db_parts(ase.db, path, source)
    except QM9Error:
        raise
    except (sqlite3.Error, OSError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, AssertionError) as error:
        # ASE's backends (SQLite, JSON, LMDB) raise these for damaged files and odd row contents
        # (ase.db.row checks rows with assert).
        raise QM9FormatError(
            source, None, f"not a readable ASE database ({type(error).__name__}: {error})"
        ) from None
    if not parts:
        raise QM9FormatError(source, None, "the database holds no molecules")
    return _concatenate(parts, source)


def _ase_db_parts(ase_db, path: Path, source: str) -> list:
    # Only reads follow, so no lock file is needed (and none is left next to the user's data).
    db = ase_db.connect(str(path), use_lock_file=False)
    declared = (db.metadata or {}).get("_property_unit_dict", {})
    if not isinstance(declared, dict):
        raise QM9FormatError(source, None, "metadata _property_unit_dict is not a mapping")
    parts = []
    for row in db.select():
        data = dict(row.get("data", {}) or {})
        kvp = row.key_value_pairs
        properties = np.empty(len(PROPERTY_NAMES))
        for k, name in enumerate(PROPERTY_NAMES):
            key = next(
                (alias for alias in _ASE_PROPERTY_ALIASES[name] if alias in data or alias in kvp),
                None,
            )
            if key is None:
                raise QM9FormatError(
                    source,
                    row.id,
                    f"row {row.id} lacks the property {name} "
                    f"(looked for {', '.join(_ASE_PROPERTY_ALIASES[name])})",
                )
            value = np.asarray(data[key] if key in data else kvp[key], dtype=np.float64).reshape(-1)
            if value.shape != (1,) or not np.isfinite(value[0]):
                raise QM9FormatError(
                    source, row.id, f"property {key} must be one finite number, got {value}"
                )
            properties[k] = value[0] * _unit_factor(name, declared.get(key), source)
        numbers = np.asarray(row.numbers)
        for z in np.unique(numbers):
            if z >= len(_ELEMENT_SLOT) or _ELEMENT_SLOT[z] < 0:
                raise QM9FormatError(
                    source,
                    row.id,
                    f"unknown element Z={int(z)}: QM9 holds only {', '.join(ELEMENTS)}",
                )
        index = next((kvp[key] for key in _INDEX_KEYS if key in kvp), row.id)
        index = _parse_index(str(index), source, row.id)
        positions = np.asarray(row.positions, np.float64)
        if positions.shape != (len(numbers), 3) or not np.isfinite(positions).all():
            raise QM9FormatError(
                source, row.id, f"positions must be {len(numbers)} finite [x, y, z] rows"
            )
        parts.append((index, numbers.astype(np.uint8), positions, properties))
    return parts


def _unit_factor(name: str, unit: Optional[str], source: str) -> float:
    if unit is None:
        return 1.0
    factor = _UNIT_FACTORS[PROPERTY_UNITS[name]].get(unit)
    if factor is None:
        raise QM9FormatError(
            source,
            None,
            f"property {name} is declared in unit {unit!r}, which cannot be "
            f"converted to {PROPERTY_UNITS[name]}",
        )
    return factor


# ----------------------------------------------------------------------------------------------
# Cache


def default_data_dir() -> Path:
    """``$SEGNN_DATA_DIR`` if set, else ``~/.cache/segnn_jax``."""
    return Path(os.environ.get("SEGNN_DATA_DIR") or Path.home() / ".cache" / "segnn_jax")


_CACHE_FIELDS = ("atomic_numbers", "positions", "n_atoms", "index", "properties")


def _checksum(arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in _CACHE_FIELDS:
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_cache(molecules: QM9Molecules, path: PathLike, *, fingerprint: str = "") -> None:
    """Writes molecules to an ``.npz`` with a sha256 checksum, atomically (temp file + rename).

    Args:
        molecules: what to store.
        path: the ``.npz`` file.
        fingerprint: a description of the source, checked by :func:`load_cache`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(molecules, name) for name in _CACHE_FIELDS}
    handle, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(
                stream,
                **arrays,
                sha256=np.array(_checksum(arrays)),
                version=np.array(_CACHE_VERSION),
                fingerprint=np.array(fingerprint),
            )
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_cache(path: PathLike, *, fingerprint: Optional[str] = None) -> Optional[QM9Molecules]:
    """Reads a cache written by :func:`save_cache`.

    Returns:
        The molecules, or None when the file is missing, unreadable, of another version, of another
        source (``fingerprint`` given and different) or fails its checksum.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if int(stored["version"]) != _CACHE_VERSION:
                return None
            if fingerprint is not None and str(stored["fingerprint"]) != fingerprint:
                return None
            arrays = {name: stored[name] for name in _CACHE_FIELDS}
            if _checksum(arrays) != str(stored["sha256"]):
                return None
        return QM9Molecules(**arrays)
    except Exception:  # noqa: BLE001
        # A cache is disposable: whatever a damaged file raises (zipfile, zlib, a bad header or
        # shape, ...), the answer is "rebuild it", never a crash of the caller.
        return None


def _fingerprint(kind: str, files: Sequence[Path]) -> str:
    described = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return f"{kind}|" + "|".join(described)


def _resolve_source(source: Optional[PathLike]) -> Tuple[str, List[Path], str]:
    """``(kind, files that define the source, cache stem)`` for :func:`load_qm9`."""
    if source is None:
        return "qm9pack", qm9pack_csv_paths(), "qm9pack"
    path = Path(source)
    if not path.exists():
        raise QM9DataNotFoundError(f"no QM9 data at {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _ORIGINAL_NAME.match(p.name) and p.is_file())
        kind = "original"
    elif path.suffix.lower() == ".csv":
        kind, files = "csv", [path]
    elif path.suffix.lower() in (".db", ".json", ".aselmdb"):
        kind, files = "ase", [path]
    else:
        kind, files = "original", [path]  # a tar archive or a single original-format file
    stem = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return kind, files, f"{kind}-{stem}"


def load_qm9(
    source: Optional[PathLike] = None,
    *,
    data_dir: Optional[PathLike] = None,
    rebuild: bool = False,
    cache: bool = True,
) -> QM9Molecules:
    """Loads QM9 molecules through the cache, parsing the source only when needed.

    Args:
        source: None for the installed qm9pack CSVs (the full characterised set), or a folder or tar
            of original files, a qm9pack-layout ``.csv``, or an ASE database (``.db``, ``.json``).
        data_dir: where the cache lives; default :func:`default_data_dir`.
        rebuild: parse the source even if a valid cache exists.
        cache: False parses without reading or writing a cache.

    Returns:
        The molecules ordered by QM9 index. The cache is rebuilt when missing, corrupt, or when the
        source files changed (size or modification time).
    """
    kind, files, stem = _resolve_source(source)
    fingerprint = _fingerprint(kind, files)
    cache_path = Path(data_dir if data_dir is not None else default_data_dir()) / f"qm9_{stem}.npz"
    if cache and not rebuild:
        molecules = load_cache(cache_path, fingerprint=fingerprint)
        if molecules is not None:
            return molecules
    if kind == "qm9pack":
        molecules = read_qm9pack_csv(files)
    elif kind == "csv":
        molecules = read_qm9pack_csv(source)
    elif kind == "ase":
        molecules = read_ase_db(source)
    else:
        molecules = read_original(source)
    if cache:
        save_cache(molecules, cache_path, fingerprint=fingerprint)
    return molecules


# ----------------------------------------------------------------------------------------------
# The standard task: split, targets, atom references


def cormorant_split(n_molecules: int = N_CHARACTERISED, seed: int = 0) -> Dict[str, np.ndarray]:
    """The Cormorant/EGNN/SEGNN split: positions into the 130,831 molecules sorted by QM9 index.

    ``np.random.seed(0); perm = np.random.permutation(130831)``; train ``perm[:100000]``, valid
    ``perm[100000:117748]``, test ``perm[117748:]``. The legacy global RNG is reproduced with a
    private ``RandomState`` so the caller's global state is untouched.

    Args:
        n_molecules: must be 130,831 (the argument exists to make a wrong data set fail loudly).
        seed: 0 in the published protocol.

    Returns:
        ``{"train": [100000], "valid": [17748], "test": [13083]}`` int64 positions.
    """
    if n_molecules != N_CHARACTERISED:
        raise ValueError(
            f"the Cormorant split is defined on the {N_CHARACTERISED} characterised molecules, "
            f"got {n_molecules}"
        )
    perm = np.random.RandomState(seed).permutation(n_molecules)
    n_train, n_valid = SPLIT_SIZES["train"], SPLIT_SIZES["valid"]
    return {
        "train": perm[:n_train],
        "valid": perm[n_train : n_train + n_valid],
        "test": perm[n_train + n_valid :],
    }


def split_molecules(molecules: QM9Molecules, seed: int = 0) -> Dict[str, QM9Molecules]:
    """Applies :func:`cormorant_split` to the 130,831 characterised molecules (sorted by index)."""
    if len(molecules) != N_CHARACTERISED:
        raise ValueError(
            f"the standard split needs the {N_CHARACTERISED} characterised molecules, "
            f"got {len(molecules)}"
            + (
                f"; remove the {N_ORIGINAL - N_CHARACTERISED} uncharacterised ones first"
                if len(molecules) == N_ORIGINAL
                else ""
            )
        )
    if np.any(np.diff(molecules.index) <= 0):
        molecules = molecules.sorted_by_index()
    return {
        name: molecules.subset(part) for name, part in cormorant_split(len(molecules), seed).items()
    }


class Target(NamedTuple):
    """A regression target: property column, reported unit, factor from the file's unit."""

    column: str
    unit: str
    factor: float


_MEV = HARTREE_TO_EV * 1000.0
#: The 12 targets of the paper, in the paper's units (energies in meV).
TARGETS: Dict[str, Target] = {
    "mu": Target("mu", "D", 1.0),
    "alpha": Target("alpha", "a0^3", 1.0),
    "homo": Target("homo", "meV", _MEV),
    "lumo": Target("lumo", "meV", _MEV),
    "gap": Target("gap", "meV", _MEV),
    "r2": Target("r2", "a0^2", 1.0),
    "zpve": Target("zpve", "meV", _MEV),
    "U0": Target("U0", "meV", _MEV),
    "U": Target("U", "meV", _MEV),
    "H": Target("H", "meV", _MEV),
    "G": Target("G", "meV", _MEV),
    "Cv": Target("Cv", "cal/mol/K", 1.0),
}


def atom_reference_energy(molecules: QM9Molecules, name: str) -> np.ndarray:
    """``[M]`` sum of the free-atom energies (Hartree) of each molecule; ``name`` in U0, U, H, G."""
    if name not in ATOM_REFERENCES_HARTREE:
        raise ValueError(
            f"atom references exist for {', '.join(ATOM_REFERENCES_HARTREE)}, not {name!r}"
        )
    table = np.zeros(len(_ELEMENT_SLOT))
    for z, energy in ATOM_REFERENCES_HARTREE[name].items():
        table[z] = energy
    molecule_of_atom = np.repeat(np.arange(len(molecules)), molecules.n_atoms)
    return np.bincount(
        molecule_of_atom, weights=table[molecules.atomic_numbers], minlength=len(molecules)
    )


def target_values(
    molecules: QM9Molecules, names: Union[str, Sequence[str]], *, atom_reference: bool = False
) -> np.ndarray:
    """``[M, K]`` float64 targets in the paper's units (:data:`TARGETS`).

    Args:
        molecules: the molecules.
        names: one target name or several, keys of :data:`TARGETS`.
        atom_reference: subtract the free-atom energies from U0, U, H and G first, giving
            atomisation energies (other targets are unchanged).
    """
    if isinstance(names, str):
        names = [names]
    columns = []
    for name in names:
        if name not in TARGETS:
            raise KeyError(f"unknown QM9 target {name!r}; known: {', '.join(TARGETS)}")
        target = TARGETS[name]
        values = molecules.property(target.column).copy()
        if atom_reference and target.column in ATOM_REFERENCES_HARTREE:
            values -= atom_reference_energy(molecules, target.column)
        columns.append(values * target.factor)
    return np.stack(columns, axis=1) if columns else np.zeros((len(molecules), 0))


# ----------------------------------------------------------------------------------------------
# Graphs


def one_hot_elements(atomic_numbers: np.ndarray) -> np.ndarray:
    """``[A, 5]`` float32 one-hot of H, C, N, O, F (SEGNN's QM9 node input)."""
    atomic_numbers = np.asarray(atomic_numbers, dtype=np.int64)
    slots = np.where(
        atomic_numbers < len(_ELEMENT_SLOT),
        _ELEMENT_SLOT[np.minimum(atomic_numbers, len(_ELEMENT_SLOT) - 1)],
        -1,
    )
    if (slots < 0).any():
        bad = np.unique(atomic_numbers[slots < 0])
        raise ValueError(f"atomic numbers {bad.tolist()} are not among QM9's {ATOMIC_NUMBERS}")
    return np.eye(len(ELEMENTS), dtype=np.float32)[slots]


def radius_edges(
    molecules: QM9Molecules, cutoff: float = 2.0, chunk: int = 4096
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radius-graph edges of every molecule at once, vectorised over molecules of equal size.

    Same edges and order as :func:`segnn_jax.graph.radius_graph_edges` on each molecule: pairs of
    distinct atoms closer than ``cutoff`` (strictly), sorted by receiver then sender.

    Args:
        molecules: the molecules.
        cutoff: radius in Angstrom, > 0.
        chunk: molecules per vectorised block (bounds memory to about ``chunk * 29^2 * 24`` bytes).

    Returns:
        ``(senders [E], receivers [E], n_edge [M])``: int32 atom indices LOCAL to each molecule,
        edges of molecule 0 first.
    """
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    offsets = molecules.offsets
    n_mol = len(molecules)
    edge_mol, edge_recv, edge_send = [], [], []
    for size in np.unique(molecules.n_atoms):
        members = np.nonzero(molecules.n_atoms == size)[0]
        for start in range(0, len(members), chunk):
            block = members[start : start + chunk]
            atoms = offsets[block][:, None] + np.arange(size)
            pos = molecules.positions[atoms]  # [m, n, 3]
            diff = pos[:, None, :, :] - pos[:, :, None, :]  # [m, receiver, sender, 3]
            within = np.einsum("mijk,mijk->mij", diff, diff) < cutoff**2
            within[:, np.arange(size), np.arange(size)] = False
            m, receiver, sender = np.nonzero(within)
            edge_mol.append(block[m])
            edge_recv.append(receiver)
            edge_send.append(sender)
    if not edge_mol:
        empty = np.zeros(0, np.int32)
        return empty, empty, np.zeros(n_mol, np.int32)
    edge_mol = np.concatenate(edge_mol)
    # Blocks come grouped by size; a stable sort by molecule keeps the receiver-sender order.
    order = np.argsort(edge_mol, kind="stable")
    senders = np.concatenate(edge_send)[order].astype(np.int32)
    receivers = np.concatenate(edge_recv)[order].astype(np.int32)
    n_edge = np.bincount(edge_mol, minlength=n_mol).astype(np.int32)
    return senders, receivers, n_edge


def molecules_to_graphs(
    molecules: QM9Molecules,
    targets: Union[str, Sequence[str]] = (),
    *,
    cutoff: float = 2.0,
    atom_reference: bool = False,
) -> list:
    """One ``jraph.GraphsTuple`` per molecule (:func:`segnn_jax.graph.make_graph`).

    Nodes: ``"positions"`` ``[n, 3]`` float32 (Angstrom), ``"atomic_numbers"`` ``[n]`` int32,
    ``"features"`` ``[n, 5]`` float32 one-hot H, C, N, O, F. Globals: ``"targets"`` ``[1, K]``
    float64 in the paper's units (float64: a total energy of ~1e7 meV has ~1 meV resolution in
    float32; standardise before casting). Edges: the radius graph at ``cutoff`` from float64 positions.

    Args:
        molecules: the molecules.
        targets: names from :data:`TARGETS` (possibly none).
        cutoff: radius graph cutoff in Angstrom (2.0 in the paper).
        atom_reference: atomisation energies for U0, U, H, G (see :func:`target_values`).

    Returns:
        A list of M graphs.
    """
    from segnn_jax.graph import make_graph

    values = target_values(molecules, targets, atom_reference=atom_reference)
    senders, receivers, n_edge = radius_edges(molecules, cutoff)
    atom_offsets = molecules.offsets
    edge_offsets = np.concatenate([[0], np.cumsum(n_edge, dtype=np.int64)])
    positions = molecules.positions.astype(np.float32)
    _check_float32_edges(molecules, positions, senders, receivers, n_edge)
    numbers = molecules.atomic_numbers.astype(np.int32)
    features = one_hot_elements(molecules.atomic_numbers)
    graphs = []
    for m in range(len(molecules)):
        a0, a1 = atom_offsets[m], atom_offsets[m + 1]
        e0, e1 = edge_offsets[m], edge_offsets[m + 1]
        graphs.append(
            make_graph(
                positions[a0:a1],
                senders[e0:e1],
                receivers[e0:e1],
                nodes={"atomic_numbers": numbers[a0:a1], "features": features[a0:a1]},
                globals={"targets": values[m : m + 1]},
            )
        )
    return graphs


#: Largest error (Angstrom) of an edge vector that the float32 cast of the positions may cause.
FLOAT32_EDGE_TOLERANCE = 1e-3


def _check_float32_edges(molecules: QM9Molecules, positions32: np.ndarray, senders: np.ndarray,
                         receivers: np.ndarray, n_edge: np.ndarray) -> None:
    """Refuses molecules so far from the origin that float32 positions distort their edges.

    The model sees float32 positions; at |x| ~ 1e6 Angstrom their spacing is 0.06 Angstrom and at
    1e12 whole molecules collapse onto one point, which would give silently wrong predictions.
    """
    if not len(senders):
        return
    molecule_of_edge = np.repeat(np.arange(len(molecules)), n_edge)
    start = molecules.offsets[molecule_of_edge]
    s, r = start + senders, start + receivers
    exact = molecules.positions[s] - molecules.positions[r]
    cast = positions32[s].astype(np.float64) - positions32[r]
    error = np.abs(cast - exact).max(axis=1)
    if error.max() > FLOAT32_EDGE_TOLERANCE:
        from segnn_jax.graph import InvalidPositionsError

        m = int(molecule_of_edge[int(np.argmax(error))])
        atoms = molecules.molecule(m)[1]
        raise InvalidPositionsError(
            f"molecule {m} (QM9 index {int(molecules.index[m])}) lies {np.abs(atoms).max():.3g} "
            f"Angstrom from the origin: in float32 its edge vectors are off by up to "
            f"{error.max():.2g} Angstrom (tolerance {FLOAT32_EDGE_TOLERANCE}); centre the "
            f"molecule's coordinates"
        )


def graph_statistics(molecules: QM9Molecules, cutoff: float = 2.0) -> Dict[str, float]:
    """Mean in-degree and the share of molecules with an isolated atom in the radius graph."""
    senders, receivers, n_edge = radius_edges(molecules, cutoff)
    molecule_of_edge = np.repeat(np.arange(len(molecules)), n_edge)
    global_receiver = molecules.offsets[molecule_of_edge] + receivers
    in_degree = np.bincount(global_receiver, minlength=len(molecules.atomic_numbers))
    isolated_atom = in_degree == 0
    molecule_of_atom = np.repeat(np.arange(len(molecules)), molecules.n_atoms)
    molecules_with_isolated = (
        np.bincount(molecule_of_atom, weights=isolated_atom, minlength=len(molecules)) > 0
    )
    return {
        "cutoff": float(cutoff),
        "n_molecules": float(len(molecules)),
        "n_atoms": float(len(molecules.atomic_numbers)),
        "n_edges": float(len(senders)),
        "mean_in_degree": float(in_degree.mean()) if len(in_degree) else 0.0,
        "fraction_isolated_atoms": float(isolated_atom.mean()) if len(in_degree) else 0.0,
        "fraction_molecules_with_isolated_atom": float(molecules_with_isolated.mean())
        if len(molecules)
        else 0.0,
    }
