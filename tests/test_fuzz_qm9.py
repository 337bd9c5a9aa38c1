"""Fuzzing the QM9 readers: original xyz (file, folder, tar), qm9pack CSV, ASE database, cache.

Mutated copies of the shared fixtures must parse to a valid result or raise QM9FormatError naming
the file (see tests/fuzz_support.py); tar archives with hostile members must not write anything.
"""

import functools
import io
import os
import tarfile

import numpy as np
import pytest
from fuzz_support import budget, check_reader, mutated_bytes, mutated_text, no_hang, record
from hypothesis import example, given
from hypothesis import strategies as st

from segnn_jax.datasets import qm9

XYZ_NAMES = [f"dsgdb9nsd_{k:06d}.xyz" for k in range(1, 11)]
DOCUMENTED = (qm9.QM9FormatError,)


@functools.cache
def _fixture_contents():
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    original = SHARED_DATA / "qm9" / "original_format"
    with open(SHARED_DATA / "qm9" / "qm9pack_part1_first1000.csv", encoding="utf-8") as f:
        csv_head = "".join(next(f) for _ in range(6))  # header + 5 molecules
    return {
        "xyz": {name: (original / name).read_text() for name in XYZ_NAMES},
        "csv": csv_head,
        "db": (SHARED_DATA / "qm9" / "schnetpack_test_qm9.db").read_bytes(),
    }


def _valid_molecules(molecules):
    """Invariants of every QM9Molecules a reader returns."""
    assert isinstance(molecules, qm9.QM9Molecules)
    assert len(molecules) >= 1
    assert np.isfinite(molecules.positions).all() and np.isfinite(molecules.properties).all()
    assert set(np.unique(molecules.atomic_numbers)) <= set(qm9.ATOMIC_NUMBERS)
    assert (molecules.n_atoms >= 1).all() and (molecules.index >= 0).all()
    assert np.all(np.diff(molecules.index) > 0), "sorted by index, no duplicates"


def _line2_index(data: bytes) -> int:
    return int(data.decode("utf-8").splitlines()[1].split()[1])


@budget(2.0)
@given(name=st.sampled_from(XYZ_NAMES), data=st.data())
@example(name=XYZ_NAMES[0], data=None)  # the unmutated file parses
def test_original_xyz_file(tmp_path_factory, name, data):
    fixtures = _fixture_contents()
    text = fixtures["xyz"][name]
    raw = text.encode() if data is None else data.draw(
        st.one_of(mutated_text(text), mutated_bytes(text.encode())))
    path = tmp_path_factory.mktemp("xyz") / name
    path.write_bytes(raw)

    def validate(molecules):
        _valid_molecules(molecules)
        # No silent wrap-around of the index, atom count as announced on line 1.
        assert molecules.index[0] == _line2_index(raw)
        assert molecules.n_atoms[0] == int(raw.decode().splitlines()[0])

    check_reader("qm9.read_original (xyz file)", lambda: qm9.read_original(path), DOCUMENTED,
                 [str(path)], validate)


@pytest.mark.parametrize("token", ["99999999999", "-3", "1e5", "0x10"])
def test_original_xyz_index_out_of_int32_range_is_rejected(tmp_path, token):
    fixtures = _fixture_contents()
    """Regression: index 99999999999 was stored as 1215752191 (int32 wrap-around)."""
    lines = fixtures["xyz"][XYZ_NAMES[0]].split("\n")
    lines[1] = lines[1].replace("gdb 1", f"gdb {token}", 1)
    path = tmp_path / XYZ_NAMES[0]
    path.write_text("\n".join(lines))
    with pytest.raises(qm9.QM9FormatError, match=r"dsgdb9nsd_000001\.xyz, line 2: .*index"):
        qm9.read_original(path)


def test_original_xyz_not_utf8_names_the_file(tmp_path):
    fixtures = _fixture_contents()
    """Regression: a non-UTF-8 byte leaked a UnicodeDecodeError without the file name."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / XYZ_NAMES[0]).write_bytes(b"\xff" + fixtures["xyz"][XYZ_NAMES[0]].encode())
    with pytest.raises(qm9.QM9FormatError, match=r"dsgdb9nsd_000001\.xyz: not UTF-8"):
        qm9.read_original(folder)


def test_original_xyz_huge_atom_count_does_not_allocate(tmp_path):
    fixtures = _fixture_contents()
    lines = fixtures["xyz"][XYZ_NAMES[0]].split("\n")
    lines[0] = str(10**15)
    path = tmp_path / XYZ_NAMES[0]
    path.write_text("\n".join(lines))
    with no_hang(30), pytest.raises(qm9.QM9FormatError, match="truncated|fields"):
        qm9.read_original(path)


@budget(0.6)
@given(data=st.data())
def test_original_folder_names_the_bad_file(tmp_path_factory, data):
    fixtures = _fixture_contents()
    folder = tmp_path_factory.mktemp("folder")
    victim = data.draw(st.sampled_from(XYZ_NAMES[:4]))
    for name in XYZ_NAMES[:4]:
        text = fixtures["xyz"][name]
        raw = data.draw(mutated_text(text)) if name == victim else text.encode()
        (folder / name).write_bytes(raw)
    result = check_reader("qm9.read_original (folder)", lambda: qm9.read_original(folder),
                          DOCUMENTED, [str(folder / victim)], _valid_molecules)
    if result is not None:
        assert len(result) <= 4


def _tar_bytes(members, mode):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@budget(1.0)
@given(compression=st.sampled_from(["", "gz", "bz2", "xz"]), data=st.data())
def test_original_tar_mutated(tmp_path_factory, compression, data):
    fixtures = _fixture_contents()
    members = [(name, fixtures["xyz"][name].encode()) for name in XYZ_NAMES[:3]]
    archive = _tar_bytes(members, "w:" + compression if compression else "w")
    suffix = ".tar" + (f".{compression}" if compression else "")
    path = tmp_path_factory.mktemp("tar") / f"qm9{suffix}"
    path.write_bytes(data.draw(mutated_bytes(archive)))
    check_reader("qm9.read_original (tar)", lambda: qm9.read_original(path),
                 DOCUMENTED + (qm9.QM9DataNotFoundError,), [str(path)], _valid_molecules)


_HOSTILE = st.sampled_from(["../dsgdb9nsd_000001.xyz", "/tmp/segnn_fuzz_abs/dsgdb9nsd_000001.xyz",
                            "a/../../dsgdb9nsd_000002.xyz", "dsgdb9nsd_000003.xyz",
                            "deep/dir/dsgdb9nsd_000004.xyz", "..", "/"])


@budget(0.6)
@given(names=st.lists(_HOSTILE, min_size=1, max_size=4),
       link=st.sampled_from([None, "symlink", "hardlink"]))
def test_original_tar_with_hostile_members_writes_nothing(tmp_path_factory, names, link):
    fixtures = _fixture_contents()
    """Archives are never extracted: traversal names, absolute names and links write nothing and
    links are not followed (a symlink named like a QM9 file pointing at /etc/passwd is skipped)."""
    root = tmp_path_factory.mktemp("hostile")
    work = root / "work"
    work.mkdir()
    buffer = io.BytesIO()
    payload = fixtures["xyz"][XYZ_NAMES[0]].encode()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        if link:
            info = tarfile.TarInfo("dsgdb9nsd_000099.xyz")
            info.type = tarfile.SYMTYPE if link == "symlink" else tarfile.LNKTYPE
            info.linkname = "/etc/passwd" if link == "symlink" else "../outside.xyz"
            archive.addfile(info)
    path = work / "hostile.tar.gz"
    path.write_bytes(buffer.getvalue())
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = check_reader("qm9.read_original (hostile tar)", lambda: qm9.read_original(path),
                              DOCUMENTED, [str(path)], _valid_molecules)
    finally:
        os.chdir(cwd)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert not os.path.exists("/tmp/segnn_fuzz_abs")
    if result is not None:
        # Only regular members named dsgdb9nsd_*.xyz were read, all with molecule 1's content.
        assert set(result.index.tolist()) == {1}


@budget(2.0)
@given(data=st.data())
def test_qm9pack_csv_mutated(tmp_path_factory, data):
    fixtures = _fixture_contents()
    text = fixtures["csv"]
    raw = data.draw(st.one_of(mutated_text(text), mutated_bytes(text.encode())))
    path = tmp_path_factory.mktemp("csv") / "part.csv"
    path.write_bytes(raw)

    def validate(molecules):
        _valid_molecules(molecules)
        assert len(molecules) <= raw.count(b"\n") + 1

    check_reader("qm9.read_qm9pack_csv", lambda: qm9.read_qm9pack_csv(path), DOCUMENTED,
                 [str(path)], validate)


def test_qm9pack_csv_fixture_rows_parse(tmp_path):
    fixtures = _fixture_contents()
    path = tmp_path / "part.csv"
    path.write_text(fixtures["csv"])
    molecules = qm9.read_qm9pack_csv(path)
    assert molecules.index.tolist() == [1, 2, 3, 4, 5]


@budget(0.6)
@given(data=st.data())
def test_ase_db_sqlite_mutated(tmp_path_factory, data):
    fixtures = _fixture_contents()
    path = tmp_path_factory.mktemp("db") / "qm9.db"
    path.write_bytes(data.draw(mutated_bytes(fixtures["db"], max_ops=6)))
    check_reader("qm9.read_ase_db (sqlite)", lambda: qm9.read_ase_db(path), DOCUMENTED,
                 [str(path)], _valid_molecules)


@pytest.fixture(scope="module")
def ase_json_db(tmp_path_factory):
    """The first 3 molecules of the schnetpack database in ASE's JSON database format."""
    fixtures = _fixture_contents()
    import ase.db

    folder = tmp_path_factory.mktemp("json")
    source = folder / "source.db"
    source.write_bytes(fixtures["db"])
    target = folder / "qm9.json"
    with ase.db.connect(str(source), use_lock_file=False) as src, \
            ase.db.connect(str(target), use_lock_file=False) as dst:
        for row in src.select(limit=3):
            dst.write(row.toatoms(), data=row.data, **row.key_value_pairs)
    return target.read_text()


@budget(1.0)
@given(data=st.data())
def test_ase_db_json_mutated(tmp_path_factory, ase_json_db, data):
    path = tmp_path_factory.mktemp("json") / "qm9.json"
    path.write_bytes(data.draw(st.one_of(mutated_text(ase_json_db),
                                         mutated_bytes(ase_json_db.encode()))))
    check_reader("qm9.read_ase_db (json)", lambda: qm9.read_ase_db(path), DOCUMENTED,
                 [str(path)], _valid_molecules)


@budget(1.0)
@given(data=st.data())
def test_cache_mutated_is_rebuilt_never_wrong(tmp_path_factory, data):
    fixtures = _fixture_contents()
    """A damaged cache is either refused (None: rebuild) or read back exactly."""
    folder = tmp_path_factory.mktemp("cache")
    for name in XYZ_NAMES[:3]:
        (folder / name).write_text(fixtures["xyz"][name])
    molecules = qm9.read_original(folder)
    path = folder / "qm9.npz"
    qm9.save_cache(molecules, path, fingerprint="fp")
    path.write_bytes(data.draw(mutated_bytes(path.read_bytes(), max_ops=3)))

    with no_hang():
        loaded = qm9.load_cache(path, fingerprint="fp")  # documented: None for an unusable file
    if loaded is not None:
        for field in ("atomic_numbers", "positions", "n_atoms", "index", "properties"):
            np.testing.assert_array_equal(getattr(loaded, field), getattr(molecules, field))
    record("qm9.load_cache", "refused (rebuild)" if loaded is None else "accepted")
    # And through load_qm9: a damaged cache is rebuilt from the source.
    data_dir = folder / "data"
    first = qm9.load_qm9(folder, data_dir=data_dir)
    (cache_file,) = data_dir.glob("qm9_*.npz")
    cache_file.write_bytes(data.draw(mutated_bytes(cache_file.read_bytes(), max_ops=2)))
    again = qm9.load_qm9(folder, data_dir=data_dir)
    np.testing.assert_array_equal(again.positions, first.positions)
    assert qm9.load_cache(cache_file) is not None

