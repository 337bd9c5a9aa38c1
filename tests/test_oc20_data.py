"""Tests of the OC20 readers (segnn_jax.datasets.oc20) and the restricted unpickler."""

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from segnn_jax.datasets.oc20 import (
    LegacyLMDB,
    OC20FormatError,
    read_ase_frames,
    read_aselmdb,
    read_legacy_lmdb,
    read_oc20,
)
from segnn_jax.datasets.safe_pickle import MalformedPickleError, UnsafePickleError, safe_loads
from segnn_jax.periodic import periodic_radius_graph

lmdb = pytest.importorskip("lmdb", reason="the 'lmdb' package (segnn[oc20] extra) is not installed")

FIXTURES = Path(__file__).parents[1] / ".." / "shared" / "data" / "oc20_format_fixtures"
LEGACY = FIXTURES / "legacy_pyg_is2re_format_NOT_OC20.lmdb"
EXTXYZ = FIXTURES / "toy_c3h8_relax_EMT.extxyz"
ASE_JSON = FIXTURES / "fairchem_tests_atoms.json"


def _fixture(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path} not present (shared/data is not checked out next to the repo)")
    return path


class _RunsShellCommand:
    """Pickles into a call of os.system, the classic pickle exploit."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write_lmdb(path: Path, items: dict) -> None:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value)
    env.close()


@pytest.fixture(scope="module")
def legacy_records():
    return read_legacy_lmdb(_fixture(LEGACY))


def test_legacy_lmdb_all_entries(legacy_records):
    records = legacy_records
    assert len(records) == 68
    assert sorted(r.sid for r in records) == list(range(68))
    natoms = [r.natoms for r in records]
    assert min(natoms) == 13 and max(natoms) == 43
    for r in records:
        n = r.natoms
        assert r.positions.shape == (n, 3) and r.positions.dtype == np.float64
        assert r.cell.shape == (3, 3) and abs(np.linalg.det(r.cell)) > 1.0
        assert r.pbc.tolist() == [True, True, True]
        assert r.atomic_numbers.shape == (n,) and r.atomic_numbers.dtype == np.int64
        assert np.all((r.atomic_numbers >= 1) & (r.atomic_numbers <= 94))
        assert r.tags.shape == (n,) and np.all(r.tags == 0)  # per MANIFEST: tags all 0
        assert r.fixed.shape == (n,) and r.fixed.dtype == bool and not r.fixed.any()
        assert isinstance(r.y_init, float) and isinstance(r.y_relaxed, float)
        assert r.pos_relaxed is None and r.forces is None
        assert r.extras["edge_index"].shape[0] == 2
        assert r.extras["cell_offsets"].shape == (r.extras["edge_index"].shape[1], 3)
        assert str(LEGACY.name) in r.source
    y_relaxed = [r.y_relaxed for r in records]
    y_init = [r.y_init for r in records]
    assert -4.81 < min(y_relaxed) < -4.79 and 0.02 < max(y_relaxed) < 0.04
    assert -23.5 < min(y_init) < -23.0 and 514 < max(y_init) < 515
    assert 8 in set(np.concatenate([r.atomic_numbers for r in records]))  # oxide-rich


def test_legacy_lmdb_first_entry_values(legacy_records):
    r = next(r for r in legacy_records if r.sid == 0)
    assert r.natoms == 21
    np.testing.assert_allclose(r.cell[0], [6.63731, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(r.positions[0], [-0.1656982, 5.5820155, 5.056681], rtol=1e-6)
    assert r.atomic_numbers.tolist() == [21] * 20 + [19]
    assert r.y_relaxed == pytest.approx(-0.8713222080618858)
    assert r.y_init == pytest.approx(-2.555855710100681)


def test_stored_edges_match_periodic_radius_graph(legacy_records):
    # The file's edge_index (row 0 = source) and cell_offsets were computed by OCP with a 6 A
    # cutoff; they must agree with our periodic graph, which checks the cell convention.
    for r in legacy_records[:10]:
        edges = periodic_radius_graph(r.positions, r.cell, r.pbc, 6.0)
        ours = {
            (int(s), int(t), *map(int, n))
            for s, t, n in zip(edges.senders, edges.receivers, edges.image_shifts)
        }
        ei, off = r.extras["edge_index"], r.extras["cell_offsets"]
        theirs = {(int(s), int(t), *map(int, n)) for s, t, n in zip(ei[0], ei[1], off)}
        assert ours == theirs


def test_legacy_lmdb_lazy_access():
    with LegacyLMDB(_fixture(LEGACY)) as db:
        assert len(db) == 68
        assert db[-1].sid == db[67].sid
        with pytest.raises(IndexError):
            db[68]
        assert set(db.raw(0)) >= {"pos", "cell", "atomic_numbers", "natoms", "y_relaxed"}


def test_legacy_lmdb_length_key(tmp_path):
    env = lmdb.open(str(_fixture(LEGACY)), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        values = {str(i).encode(): txn.get(str(i).encode()) for i in range(3)}
    env.close()
    path = tmp_path / "with_length.lmdb"
    _write_lmdb(path, {**values, b"length": pickle.dumps(3)})
    records = read_legacy_lmdb(path)
    assert [r.sid for r in records] == [0, 1, 2]


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsShellCommand(f"touch {marker}"))
    assert b"system" in payload
    with pytest.raises(UnsafePickleError, match="system"):
        safe_loads(payload)
    # Inside an LMDB the error names the file and entry.
    path = tmp_path / "evil.lmdb"
    _write_lmdb(path, {b"0": payload})
    with pytest.raises(UnsafePickleError, match=r"evil\.lmdb#0"):
        read_legacy_lmdb(path)
    assert not marker.exists()


def test_malicious_pickle_inside_tensor_blob_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_RunsShellCommand(f"touch {marker}"))
    # Hand-assembled protocol-3 pickle: torch.storage._load_from_bytes(blob).
    outer = (
        b"\x80\x03ctorch.storage\n_load_from_bytes\nB"
        + len(blob).to_bytes(4, "little")
        + blob
        + b"\x85R."
    )
    with pytest.raises(UnsafePickleError):
        safe_loads(outer)
    assert not marker.exists()


def _storage_bomb(blob: bytes, numel: int, references: int) -> bytes:
    """A protocol-3 pickle: the storage ``_load_from_bytes(blob)`` rebuilt as a whole tensor
    ``references`` times, 18 bytes each."""
    tensor = (b"h\x01(h\x00K\x00J" + numel.to_bytes(4, "little") + b"\x85K\x01\x85tR")
    return (b"\x80\x03ctorch.storage\n_load_from_bytes\nB" + len(blob).to_bytes(4, "little")
            + blob + b"\x85Rq\x000ctorch._utils\n_rebuild_tensor_v2\nq\x010]("
            + tensor * references + b"e.")


def test_pickle_naming_a_storage_over_and_over_is_refused():
    """A decompression bomb: each tensor is a bounded copy of its storage, but a pickle can name
    one storage many times for a few bytes each. The rebuilt tensors may hold twice the pickle's
    size plus 1 MiB."""
    import pickletools

    from segnn_jax.datasets.safe_pickle import _load_from_bytes

    env = lmdb.open(str(_fixture(LEGACY)), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        value = txn.get(b"0")
    env.close()
    blob = max((arg for op, arg, _ in pickletools.genops(value) if op.name == "BINBYTES"), key=len)
    storage = _load_from_bytes(blob)
    few = safe_loads(_storage_bomb(blob, storage.size, 3))
    assert len(few) == 3 and all(np.array_equal(t, storage) for t in few)
    bomb = _storage_bomb(blob, storage.size, 2000)  # 48 kB naming 24 MB of tensors
    assert 2000 * storage.nbytes > 2 * len(bomb) + 2**20
    with pytest.raises(MalformedPickleError, match="over and over"):
        safe_loads(bomb)


def test_pickle_of_nested_repeated_references_is_refused():
    """A "billion laughs" pickle: a list of ten references to a list of ten references ... (10
    levels: 10^10 items in 260 bytes), which np.asarray would try to materialise, is refused;
    three levels pass."""

    def laughs(levels: int) -> bytes:
        body = b"K\x01q\x000"  # the int 1, in memo 0, popped
        for level in range(1, levels + 1):  # MARK, ten references to the level below, LIST
            body += b"(" + (b"h" + bytes([level - 1])) * 10 + b"lq" + bytes([level]) + b"0"
        return b"\x80\x02" + body + b"h" + bytes([levels]) + b"."

    assert np.asarray(safe_loads(laughs(3))).shape == (10, 10, 10)
    bomb = laughs(10)
    assert len(bomb) == 260
    with pytest.raises(MalformedPickleError, match="over and over"):
        safe_loads(bomb)


@pytest.mark.parametrize("opcodes", [b"\x96" + (2**33).to_bytes(8, "little") + b"ab",
                                     b"\x96" + (2).to_bytes(8, "little") + b"ab\x98",
                                     b"\x97"])
def test_protocol_5_buffer_opcodes_are_refused(opcodes):
    """BYTEARRAY8 (CPython allocates its declared size, 8 GB here, before reading it),
    READONLY_BUFFER and NEXT_BUFFER never occur in torch or PyG pickles; they are refused before
    the C unpickler runs, also inside a tensor blob."""
    refused = "opcode (BYTEARRAY8|NEXT_BUFFER)|bytes in a bytearray8"  # declared size unread
    with pytest.raises(MalformedPickleError, match=refused):
        safe_loads(b"\x80\x05" + opcodes + b".")
    from segnn_jax.datasets.safe_pickle import _load_from_bytes

    with pytest.raises(MalformedPickleError, match=refused):
        _load_from_bytes(b"\x80\x05" + opcodes + b".")


@pytest.mark.parametrize("global_name", [b"builtins\neval", b"subprocess\nPopen", b"torch\nload"])
def test_other_globals_are_refused(global_name):
    with pytest.raises(UnsafePickleError):
        safe_loads(b"\x80\x02c" + global_name + b"\n)R.")


def test_corrupt_pickle_entry(tmp_path):
    env = lmdb.open(str(_fixture(LEGACY)), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        value = txn.get(b"0")
    env.close()
    with pytest.raises(MalformedPickleError):
        safe_loads(value[: len(value) // 2])
    path = tmp_path / "corrupt.lmdb"
    _write_lmdb(path, {b"0": value[: len(value) // 2]})
    with pytest.raises(OC20FormatError, match=r"corrupt\.lmdb#0"):
        read_legacy_lmdb(path)


@pytest.mark.parametrize("keep", [5000, 1_500_000])
def test_truncated_lmdb(tmp_path, keep):
    path = tmp_path / "truncated.lmdb"
    path.write_bytes(_fixture(LEGACY).read_bytes()[:keep])
    with pytest.raises(OC20FormatError, match=r"truncated\.lmdb: truncated LMDB"):
        read_legacy_lmdb(path)


def test_not_an_lmdb(tmp_path):
    path = tmp_path / "garbage.lmdb"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(OC20FormatError, match=r"garbage\.lmdb"):
        read_legacy_lmdb(path)
    with pytest.raises(FileNotFoundError, match="missing.lmdb"):
        read_legacy_lmdb(tmp_path / "missing.lmdb")


def test_extxyz_fixture():
    frames = read_ase_frames(_fixture(EXTXYZ))
    assert len(frames) == 101
    assert all(f.natoms == 38 for f in frames)
    first = frames[0]
    assert first.tags.tolist() == [0] * 18 + [1] * 9 + [2] * 11
    np.testing.assert_array_equal(first.fixed, first.tags == 0)
    assert first.energy == pytest.approx(15.804699620277187)
    assert first.forces.shape == (38, 3)
    np.testing.assert_allclose(first.forces[0], [-0.00001079, -0.00000380, 0.11356054])
    assert first.pbc.all() and first.cell[2, 2] == pytest.approx(33.266997)
    assert sorted(set(first.atomic_numbers.tolist())) == [1, 6, 29]
    assert frames[-1].energy < frames[0].energy  # a relaxation


def test_bad_extxyz(tmp_path):
    path = tmp_path / "bad.extxyz"
    text = _fixture(EXTXYZ).read_text().splitlines()
    path.write_text("\n".join(text[:2] + ["Cu 0.0 zero 13.0 F 0"] + text[3:20]) + "\n")
    with pytest.raises(OC20FormatError, match=r"bad\.extxyz"):
        read_ase_frames(path)
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(OC20FormatError, match=r"empty\.extxyz"):
        read_oc20(empty)


def test_ase_json_fixture():
    (record,) = read_oc20(_fixture(ASE_JSON))
    assert record.natoms == 34
    assert record.energy == pytest.approx(-135.66393572)
    assert record.forces.shape == (34, 3)
    assert record.fixed.sum() == 24
    assert record.tags.tolist()[:2] == [1, 1] and record.tags[2:].sum() == 0
    assert [int(z) for z in record.atomic_numbers[:2]] == [6, 8]


def _tiny_aselmdb(path: Path) -> None:
    pytest.importorskip(
        "ase_db_backends", reason="ase-db-backends (segnn[oc20] extra) is not installed"
    )
    import ase.db
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    with ase.db.connect(str(path), use_lock_file=False) as db:
        for sid in range(2):
            atoms = fcc111("Cu", (2, 2, 2), vacuum=5.0)
            add_adsorbate(atoms, "O", 1.5, "fcc")
            atoms.set_tags([0] * 4 + [1] * 4 + [2])
            atoms.set_constraint(FixAtoms(indices=range(4)))
            atoms.pbc = True
            forces = np.full((len(atoms), 3), 0.1 * sid)
            atoms.calc = SinglePointCalculator(atoms, energy=-1.5 - sid, forces=forces)
            db.write(
                atoms,
                key_value_pairs={"sid": 10 + sid, "y_relaxed": -0.5 * sid, "metal": "Cu"},
                data={"pos_relaxed": atoms.positions + 0.01},
            )


def test_aselmdb_roundtrip(tmp_path):
    path = tmp_path / "tiny.aselmdb"
    _tiny_aselmdb(path)
    records = read_aselmdb(path)
    assert [r.sid for r in records] == [10, 11]
    r = records[1]
    assert r.natoms == 9 and r.tags.tolist() == [0] * 4 + [1] * 4 + [2]
    assert r.fixed.tolist() == [True] * 4 + [False] * 5
    assert r.y_relaxed == -0.5 and r.y_init is None and r.energy == -2.5
    np.testing.assert_allclose(r.forces, 0.1)
    np.testing.assert_allclose(r.pos_relaxed, r.positions + 0.01)
    assert r.extras["metal"] == "Cu" and r.pbc.all()
    # A directory of shards is read in name order; lock and temporary files are ignored.
    shutil.copy(path, tmp_path / "b.aselmdb")
    (tmp_path / "c.aselmdb.tmp").write_bytes(b"partial")
    assert [r.sid for r in read_oc20(tmp_path)] == [10, 11, 10, 11]


def test_truncated_aselmdb(tmp_path):
    path = tmp_path / "tiny.aselmdb"
    _tiny_aselmdb(path)
    truncated = tmp_path / "cut.aselmdb"
    truncated.write_bytes(path.read_bytes()[:9000])
    with pytest.raises(OC20FormatError, match=r"cut\.aselmdb"):
        read_aselmdb(truncated)
