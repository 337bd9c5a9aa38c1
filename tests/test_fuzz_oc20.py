"""Fuzzing the OC20 readers: legacy LMDB (restricted unpickler), ASE LMDB, extxyz, ASE JSON.

Mutated copies of the shared fixtures must give valid records or raise OC20FormatError /
UnsafePickleError naming the file; hostile pickles never run code (tests/fuzz_support.py).
"""

import functools
import subprocess
import sys

import numpy as np
import pytest
from fuzz_support import LARGE, budget, check_reader, mutated_bytes, mutated_text, no_hang, record
from hypothesis import given
from hypothesis import strategies as st

from segnn_jax.datasets.oc20 import (
    OC20FormatError,
    OC20Record,
    read_ase_frames,
    read_aselmdb,
    read_legacy_lmdb,
)
from segnn_jax.datasets.safe_pickle import MalformedPickleError, UnsafePickleError, safe_loads

lmdb = pytest.importorskip("lmdb", reason="lmdb (segnn[oc20] extra) is not installed")

DOCUMENTED = (OC20FormatError, UnsafePickleError, FileNotFoundError)
LEGACY = "oc20_format_fixtures/legacy_pyg_is2re_format_NOT_OC20.lmdb"
EXTXYZ = "oc20_format_fixtures/toy_c3h8_relax_EMT.extxyz"
ASE_JSON = "oc20_format_fixtures/fairchem_tests_atoms.json"


@functools.cache
def _shared(name: str) -> bytes:
    from conftest import SHARED_DATA

    if not (SHARED_DATA / name).is_file():
        pytest.skip(f"shared test data not found at {SHARED_DATA / name}")
    return (SHARED_DATA / name).read_bytes()


@functools.cache
def _legacy_values():
    """Raw pickled values of the first 4 entries of the legacy LMDB fixture."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/legacy.lmdb"
        with open(path, "wb") as f:
            f.write(_shared(LEGACY))
        env = lmdb.open(path, subdir=False, readonly=True, lock=False)
        with env.begin() as txn:
            values = [txn.get(str(i).encode()) for i in range(4)]
        env.close()
    return values


def _write_lmdb(path, entries):
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key, value)
    env.close()


def _valid_records(records):
    assert isinstance(records, list) and records
    for r in records:
        assert isinstance(r, OC20Record)
        n = r.natoms
        assert r.positions.shape == (n, 3) and np.isfinite(r.positions).all()
        assert r.atomic_numbers.shape == (n,) and r.atomic_numbers.dtype == np.int64
        assert r.tags.shape == (n,) and r.fixed.shape == (n,) and r.fixed.dtype == bool
        assert r.cell.shape == (3, 3) and r.pbc.shape == (3,)
        for value in (r.y_init, r.y_relaxed, r.energy):
            assert value is None or isinstance(value, float)
        for array in (r.forces, r.pos_relaxed):
            assert array is None or array.shape == (n, 3)


@budget(1.0)
@given(data=st.data())
def test_legacy_lmdb_file_mutated(tmp_path_factory, data):
    """Byte edits anywhere in the 3 MB LMDB file (pages, B-tree, pickles)."""
    raw = data.draw(mutated_bytes(_shared(LEGACY), max_ops=6))
    path = tmp_path_factory.mktemp("lmdb") / "data.lmdb"
    path.write_bytes(raw)
    check_reader("oc20.read_legacy_lmdb (file bytes)", lambda: read_legacy_lmdb(path), DOCUMENTED,
                 [str(path)], _valid_records)


@budget(1.5)
@given(data=st.data())
def test_legacy_lmdb_entries_mutated(tmp_path_factory, data):
    """A well-formed LMDB whose pickled PyG values are edited (the restricted unpickler's input)."""
    values = list(_legacy_values())
    k = data.draw(st.integers(0, len(values) - 1))
    values[k] = data.draw(mutated_bytes(values[k], max_ops=4))
    path = tmp_path_factory.mktemp("lmdb") / "entries.lmdb"
    _write_lmdb(path, {str(i).encode(): v for i, v in enumerate(values)})
    check_reader("oc20.read_legacy_lmdb (pickled entries)", lambda: read_legacy_lmdb(path),
                 DOCUMENTED, [str(path)], _valid_records)


_HOSTILE_GLOBALS = [b"os\nsystem", b"posix\nsystem", b"builtins\neval", b"builtins\nexec",
                    b"subprocess\nPopen", b"builtins\ngetattr", b"torch\nload",
                    b"numpy\nload", b"shutil\nrmtree", b"collections\nnamedtuple",
                    b"torch._utils\n_rebuild_parameter", b"torch_geometric.data.data\nHeteroData"]


@budget(2.0)
@given(global_name=st.sampled_from(_HOSTILE_GLOBALS), wrap=st.booleans(),
       protocol=st.sampled_from([b"\x80\x02", b"\x80\x03", b"\x80\x04", b""]))
def test_safe_loads_refuses_every_other_global(tmp_path_factory, global_name, wrap, protocol):
    marker = tmp_path_factory.mktemp("pwn") / "pwned"
    argument = f"touch {marker}".encode()
    call = b"c" + global_name + b"\n(X" + len(argument).to_bytes(4, "little") + argument + b"tR"
    if wrap:  # hidden inside a (allowed) torch tensor blob
        blob = protocol + call + b"."
        payload = (protocol + b"ctorch.storage\n_load_from_bytes\nB"
                   + len(blob).to_bytes(4, "little") + blob + b"\x85R.")
    else:
        payload = protocol + call + b"."
    with no_hang(), pytest.raises(UnsafePickleError):
        safe_loads(payload)
    record("safe_pickle.safe_loads (hostile globals)", "UnsafePickleError")
    assert not marker.exists()


@budget(3.0)
@given(raw=st.one_of(st.binary(max_size=256),
                     st.sampled_from(range(4)).flatmap(
                         lambda k: mutated_bytes(_legacy_values()[k], max_ops=3))))
def test_safe_loads_random_and_mutated_bytes(raw):
    """Random bytes or mutated real pickles: a value or one of the two documented errors."""
    try:
        with no_hang():
            safe_loads(raw)
    except (UnsafePickleError, MalformedPickleError) as error:
        record("safe_pickle.safe_loads (random/mutated)", type(error).__name__)
        return
    record("safe_pickle.safe_loads (random/mutated)", "accepted")


@pytest.mark.parametrize("size, stride, offset", [((float("inf"),), (1,), 0),
                                                 ((1,), (float("nan"),), 0),
                                                 ((1,), (1,), float("inf"))])
def test_rebuild_tensor_with_non_finite_geometry_is_malformed(size, stride, offset):
    """Regression: int(inf) in a tensor's geometry raised OverflowError past safe_loads."""
    from segnn_jax.datasets.safe_pickle import _rebuild_tensor_v2

    with pytest.raises(MalformedPickleError, match="geometry"):
        _rebuild_tensor_v2(np.zeros(3), offset, size, stride)


@pytest.mark.parametrize("size, stride", [((10**5, 10**5), (0, 0)), ((4, 3), (0, 1))])
def test_rebuild_tensor_refuses_views_larger_than_their_storage(size, stride):
    """Regression: a fuzzed pickle with a stride-0 view of a huge size was copied element by
    element (gigabytes from a few bytes; the test's hang limit fired). A view can read no more
    elements than its storage holds; a transposed one still rebuilds."""
    from segnn_jax.datasets.safe_pickle import _rebuild_tensor_v2

    with no_hang(5), pytest.raises(MalformedPickleError, match="more than the 3 its storage"):
        _rebuild_tensor_v2(np.arange(3.0), 0, size, stride)
    transposed = _rebuild_tensor_v2(np.arange(6.0), 0, (3, 2), (1, 3))
    np.testing.assert_array_equal(transposed, np.arange(6.0).reshape(2, 3).T)


@functools.cache
def _aselmdb_bytes():
    pytest.importorskip("ase_db_backends", reason="ase-db-backends is not installed")
    import tempfile

    import ase.db
    import ase.io

    with tempfile.TemporaryDirectory() as folder:
        source = f"{folder}/atoms.json"
        with open(source, "wb") as f:
            f.write(_shared(ASE_JSON))
        atoms = ase.io.read(source)
        path = f"{folder}/tiny.aselmdb"
        with ase.db.connect(path, type="aselmdb", use_lock_file=False) as db:
            for sid in range(3):
                db.write(atoms, key_value_pairs={"sid": sid, "y_relaxed": -0.5 * sid},
                         data={"pos_relaxed": atoms.positions + 0.01})
        with open(path, "rb") as f:
            return f.read()


@budget(1.0)
@given(data=st.data())
def test_aselmdb_mutated(tmp_path_factory, data):
    raw = data.draw(mutated_bytes(_aselmdb_bytes(), max_ops=6))
    path = tmp_path_factory.mktemp("aselmdb") / "data.aselmdb"
    path.write_bytes(raw)
    check_reader("oc20.read_aselmdb", lambda: read_aselmdb(path), DOCUMENTED, [str(path)],
                 _valid_records)


@functools.cache
def _extxyz_head(frames: int = 3) -> str:
    lines = _shared(EXTXYZ).decode().split("\n")
    n = int(lines[0])
    return "\n".join(lines[: frames * (n + 2)]) + "\n"


@budget(1.5)
@given(data=st.data())
def test_extxyz_mutated(tmp_path_factory, data):
    text = _extxyz_head()
    raw = data.draw(st.one_of(mutated_text(text), mutated_bytes(text.encode())))
    path = tmp_path_factory.mktemp("extxyz") / "frames.extxyz"
    path.write_bytes(raw)
    check_reader("oc20.read_ase_frames (extxyz)", lambda: read_ase_frames(path), DOCUMENTED,
                 [str(path)], _valid_records)


@budget(1.0)
@given(data=st.data())
def test_ase_json_mutated(tmp_path_factory, data):
    text = _shared(ASE_JSON).decode()
    raw = data.draw(st.one_of(mutated_text(text), mutated_bytes(text.encode())))
    path = tmp_path_factory.mktemp("json") / "atoms.json"
    path.write_bytes(raw)
    check_reader("oc20.read_ase_frames (ASE JSON)", lambda: read_ase_frames(path), DOCUMENTED,
                 [str(path)], _valid_records)


_CRASH_PROBE = """
import sys
from segnn_jax.datasets.oc20 import OC20FormatError, read_legacy_lmdb
from segnn_jax.datasets.safe_pickle import UnsafePickleError
try:
    read_legacy_lmdb(sys.argv[1])
    print("accepted")
except (OC20FormatError, UnsafePickleError, FileNotFoundError) as e:
    print(type(e).__name__)
"""


@pytest.mark.fuzz
def test_legacy_lmdb_heavy_corruption_never_kills_the_interpreter(tmp_path):
    """Many flips in the LMDB page structure, each read in a fresh interpreter: LMDB is C code
    that trusts its pages, so a crash (SIGSEGV/SIGBUS) would only show as a dead process."""
    rng = np.random.default_rng(0)
    source = bytearray(_shared(LEGACY))
    n_runs = 40 if LARGE else 10
    for run in range(n_runs):
        raw = bytearray(source)
        # Half of the runs hit the first pages (meta pages and B-tree roots), half anywhere.
        limit = 3 * 4096 if run % 2 == 0 else len(raw)
        for _ in range(int(rng.integers(1, 40))):
            raw[int(rng.integers(limit))] ^= int(rng.integers(1, 256))
        path = tmp_path / f"run{run}.lmdb"
        path.write_bytes(bytes(raw))
        done = subprocess.run([sys.executable, "-c", _CRASH_PROBE, str(path)], check=False,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (run, done.returncode, done.stderr[-2000:])
        record("oc20.read_legacy_lmdb (subprocess, heavy corruption)", done.stdout.strip())
        path.unlink()


def test_aselmdb_that_reads_as_empty_is_an_error(tmp_path):
    """Regression: a damaged .aselmdb whose rows were unreachable read as an empty data set."""
    pytest.importorskip("ase_db_backends", reason="ase-db-backends is not installed")
    import ase.db

    path = tmp_path / "empty.aselmdb"
    with ase.db.connect(str(path), type="aselmdb", use_lock_file=False):
        pass
    with pytest.raises(OC20FormatError, match=r"empty\.aselmdb: the ASE LMDB database holds no"):
        read_aselmdb(path)
