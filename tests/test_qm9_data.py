"""Tests of segnn_jax.datasets.qm9: readers agree, cache, split, units, graphs, malformed input."""

import importlib.util
import io
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from segnn_jax.datasets import qm9

DATA = Path(__file__).parents[1] / ".." / "shared" / "data" / "qm9"
ORIGINAL = DATA / "original_format"
CSV = DATA / "qm9pack_part1_first1000.csv"
ASE_DB = DATA / "schnetpack_test_qm9.db"

needs_fixtures = pytest.mark.skipif(
    not (ORIGINAL.is_dir() and CSV.is_file() and ASE_DB.is_file()),
    reason=f"QM9 fixtures not found under {DATA} (shared/data next to the repository)",
)

# Molecule 1 (methane) verbatim, as in dsgdb9nsd_000001.xyz.
METHANE = (
    "5\n"
    "gdb 1\t157.7118\t157.70997\t157.70699\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.3641\t0.044749\t"
    "-40.47893\t-40.476062\t-40.475117\t-40.498597\t6.469\t\n"
    "C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689\n"
    "H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921\n"
    "H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922\n"
    "H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923\n"
    "H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 0.133923\n"
    "1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078\n"
    "C\tC\t\n"
    "InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4\n"
)


@pytest.fixture(scope="module")
def readers():
    if not (ORIGINAL.is_dir() and CSV.is_file() and ASE_DB.is_file()):
        pytest.skip(f"QM9 fixtures not found under {DATA} (shared/data next to the repository)")
    return {
        "original": qm9.read_original(ORIGINAL),
        "csv": qm9.read_qm9pack_csv(CSV),
        "ase": qm9.read_ase_db(ASE_DB),
    }


# ---------------------------------------------------------------------------------------------
# Readers agree


def test_fixture_sizes(readers):
    assert len(readers["original"]) == 10
    assert len(readers["csv"]) == 1000
    assert len(readers["ase"]) == 20
    # qm9pack omits the uncharacterised molecules (58 is the first) and keeps QM9 index order.
    index = readers["csv"].index
    np.testing.assert_array_equal(index[:57], np.arange(1, 58))
    assert 58 not in index and (np.diff(index) > 0).all()


@pytest.mark.parametrize("a,b", [("original", "csv"), ("original", "ase"), ("csv", "ase")])
def test_readers_agree_on_shared_molecules(readers, a, b):
    first, second = readers[a], readers[b]
    shared = np.intersect1d(first.index, second.index)
    assert len(shared) == min(len(first), len(second))
    x, y = first.select_indices(shared), second.select_indices(shared)
    np.testing.assert_array_equal(x.atomic_numbers, y.atomic_numbers)
    np.testing.assert_array_equal(x.n_atoms, y.n_atoms)
    np.testing.assert_allclose(x.positions, y.positions, rtol=0, atol=1e-12)
    np.testing.assert_allclose(x.properties, y.properties, rtol=1e-12, atol=1e-12)


def test_known_values_of_molecule_one(readers):
    numbers, positions = readers["csv"].molecule(0)
    np.testing.assert_array_equal(numbers, [6, 1, 1, 1, 1])
    np.testing.assert_allclose(positions[0], [-0.0126981359, 1.0858041578, 0.0080009958])
    first = readers["original"]
    assert first.property("U0")[0] == -40.47893
    assert first.property("Cv")[0] == 6.469
    assert first.property("A")[0] == 157.7118
    # Molecule 4 (acetylene) has the "0." and "1." literals that are not JSON.
    np.testing.assert_array_equal(readers["csv"].molecule(3)[1][:, 1:], [[0.0, 1.0]] * 4)


def test_mathematica_exponent():
    text = METHANE.replace("\t0.\t13.21", "\t2.1997*^-6\t13.21").replace(
        " 0.002150416", " 2.150416*^-3"
    )
    index, numbers, positions, properties = qm9.parse_xyz_text(text, "x.xyz")
    assert index == 1
    np.testing.assert_array_equal(numbers, [6, 1, 1, 1, 1])
    assert properties[qm9.PROPERTY_NAMES.index("mu")] == pytest.approx(2.1997e-6, rel=1e-15)
    assert positions[1, 0] == pytest.approx(0.002150416, rel=1e-15)


def test_original_from_tar_archives(tmp_path):
    if not ORIGINAL.is_dir():
        pytest.skip(f"QM9 fixtures not found under {ORIGINAL}")
    expected = qm9.read_original(ORIGINAL)
    for mode, suffix in (("w", ".tar"), ("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2")):
        archive = tmp_path / f"qm9{suffix}"
        with tarfile.open(archive, mode) as tar:
            for file in sorted(ORIGINAL.glob("dsgdb9nsd_*.xyz"), reverse=True):
                tar.add(file, arcname=f"first10/{file.name}")
            # A hostile member that an extracting reader would write outside the target.
            info = tarfile.TarInfo("../../evil_dsgdb9nsd_000011.xyz")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        got = qm9.read_original(archive)
        np.testing.assert_array_equal(got.index, expected.index)
        np.testing.assert_array_equal(got.positions, expected.positions)
        np.testing.assert_array_equal(got.properties, expected.properties)
    assert not (tmp_path.parent.parent / "evil_dsgdb9nsd_000011.xyz").exists()


# ---------------------------------------------------------------------------------------------
# Malformed input


def _bad_xyz(tmp_path, text):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "dsgdb9nsd_000001.xyz").write_text(text)
    return folder


@pytest.mark.parametrize(
    "text,line,words",
    [
        ("\n".join(METHANE.splitlines()[:5]) + "\n", 6, "truncated"),
        ("\n".join(METHANE.splitlines()[:8]) + "\n", 9, "truncated"),
        (METHANE.replace("1.4637511618", "1.46x7511618"), 5, "bad number '1.46x7511618'"),
        (METHANE.replace("\t13.21\t", "\tabc\t"), 2, "bad number 'abc' for alpha"),
        (METHANE.replace("H\t 1.0117308433", "Cl\t 1.0117308433"), 5, "unknown element 'Cl'"),
        ("6" + METHANE[1:], 8, "got 9 fields"),
        ("4" + METHANE[1:], 7, "atom line after the 4 atoms"),
        (METHANE.replace("gdb 1\t157.7118\t", "gdb 1\t"), 2, "15 properties"),
        (METHANE.replace("\t0.\t13.21", "\tnan\t13.21"), 2, "non-finite"),
        ("", 1, "empty"),
    ],
)
def test_malformed_original_names_file_and_line(tmp_path, text, line, words):
    folder = _bad_xyz(tmp_path, text)
    with pytest.raises(qm9.QM9FormatError) as error:
        qm9.read_original(folder)
    assert error.value.line == line
    assert error.value.source.endswith("dsgdb9nsd_000001.xyz")
    assert f"dsgdb9nsd_000001.xyz, line {line}: " in str(error.value)
    assert words in str(error.value)
    assert isinstance(error.value, ValueError)


def _csv_with(tmp_path, edit, row=3):
    if not CSV.is_file():
        pytest.skip(f"QM9 fixture {CSV} not found")
    lines = CSV.read_text().splitlines(keepends=True)[:6]
    lines[row - 1] = edit(lines[row - 1])
    path = tmp_path / "bad.csv"
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda s: s.replace("-0.0404260543", "-0.04x4260543"), "bad number '-0.04x4260543'"),
        (lambda s: s.replace("['N','H','H','H']", "['N','H','H','Cl']"), "unknown element 'Cl'"),
        (lambda s: s.replace('/h1H3",4,', '/h1H3",5,'), "N_atoms is 5 but Elements lists 4"),
        (lambda s: s[: len(s) // 2] + "\n", "fields"),
        (lambda s: s.replace(",1.6256,", ",1.6x56,"), "bad number '1.6x56' for mu"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path, edit, words):
    path = _csv_with(tmp_path, edit)
    with pytest.raises(qm9.QM9FormatError) as error:
        qm9.read_qm9pack_csv(path)
    assert error.value.line == 3
    assert "bad.csv, line 3: " in str(error.value)
    assert words in str(error.value)


def test_csv_missing_column(tmp_path):
    path = _csv_with(tmp_path, lambda s: s.replace("HOMO_au", "HOMO"), row=1)
    with pytest.raises(qm9.QM9FormatError, match=r"bad.csv, line 1: .*HOMO_au"):
        qm9.read_qm9pack_csv(path)


def test_ase_db_unknown_element_and_missing_property(tmp_path):
    pytest.importorskip("ase")
    import ase
    import ase.db

    path = tmp_path / "bad.db"
    with ase.db.connect(str(path)) as db:
        props = {name: 1.0 for name in qm9.PROPERTY_NAMES}
        db.write(ase.Atoms("CH4", positions=np.eye(5, 3)), data=props)
        db.write(ase.Atoms("SiH4", positions=np.eye(5, 3)), data=props)
    with pytest.raises(qm9.QM9FormatError, match=r"bad.db, line 2: unknown element Z=14"):
        qm9.read_ase_db(path)
    path = tmp_path / "missing.db"
    with ase.db.connect(str(path)) as db:
        db.write(ase.Atoms("CH4", positions=np.eye(5, 3)), data={"U0": 1.0})
    with pytest.raises(qm9.QM9FormatError, match="lacks the property A"):
        qm9.read_ase_db(path)


def test_ase_db_converts_declared_units(tmp_path):
    pytest.importorskip("ase")
    import ase
    import ase.db

    path = tmp_path / "ev.db"
    props = {name: 2.0 for name in qm9.PROPERTY_NAMES}
    with ase.db.connect(str(path)) as db:
        db.write(ase.Atoms("CH4", positions=np.eye(5, 3)), data=props, index=7)
        db.metadata = {"_property_unit_dict": {"U0": "eV"}}
    got = qm9.read_ase_db(path)
    assert got.index.tolist() == [7]
    assert got.property("U0")[0] == pytest.approx(2.0 / 27.211386246, rel=1e-14)
    assert got.property("U")[0] == 2.0


def test_missing_sources_raise_not_found(tmp_path):
    with pytest.raises(qm9.QM9DataNotFoundError):
        qm9.read_original(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        qm9.load_qm9(tmp_path / "nowhere.csv", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_round_trip_and_rebuild_when_corrupt(tmp_path, monkeypatch):
    if not ORIGINAL.is_dir():
        pytest.skip(f"QM9 fixtures not found under {ORIGINAL}")
    source = tmp_path / "orig"
    shutil.copytree(ORIGINAL, source)
    cache_dir = tmp_path / "cache"
    first = qm9.load_qm9(source, data_dir=cache_dir)
    (cache_file,) = cache_dir.glob("*.npz")

    calls = []
    real_reader = qm9.read_original
    monkeypatch.setattr(qm9, "read_original", lambda path: calls.append(path) or real_reader(path))
    again = qm9.load_qm9(source, data_dir=cache_dir)
    assert calls == []  # served from the cache
    np.testing.assert_array_equal(again.positions, first.positions)
    np.testing.assert_array_equal(again.properties, first.properties)

    # Flip one byte inside the stored positions: the checksum must catch it.
    raw = bytearray(cache_file.read_bytes())
    stored = np.load(cache_file)["positions"].tobytes()
    at = bytes(raw).find(stored[:64])
    assert at > 0
    raw[at + 3] ^= 0xFF
    cache_file.write_bytes(bytes(raw))
    assert qm9.load_cache(cache_file) is None
    rebuilt = qm9.load_qm9(source, data_dir=cache_dir)
    assert len(calls) == 1
    np.testing.assert_array_equal(rebuilt.positions, first.positions)
    assert qm9.load_cache(cache_file) is not None

    cache_file.write_bytes(b"not a zip file")
    qm9.load_qm9(source, data_dir=cache_dir)
    assert len(calls) == 2

    # A changed source invalidates the cache.
    time.sleep(0.01)
    target = source / "dsgdb9nsd_000001.xyz"
    target.write_text(target.read_text().replace("-40.47893", "-40.47894"))
    changed = qm9.load_qm9(source, data_dir=cache_dir)
    assert len(calls) == 3
    assert changed.property("U0")[0] == -40.47894


def test_cache_is_plain_npz_without_pickles(tmp_path):
    molecules = qm9.parse_xyz_text(METHANE)
    mols = qm9.QM9Molecules(
        molecules[1], molecules[2], [len(molecules[1])], [molecules[0]], molecules[3][None]
    )
    path = tmp_path / "c.npz"
    qm9.save_cache(mols, path, fingerprint="f")
    with np.load(path, allow_pickle=False) as stored:
        assert len(str(stored["sha256"])) == 64
    assert qm9.load_cache(path, fingerprint="other") is None
    assert qm9.load_cache(path, fingerprint="f").positions.tolist() == mols.positions.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGNN_DATA_DIR", str(tmp_path))
    assert qm9.default_data_dir() == tmp_path
    monkeypatch.delenv("SEGNN_DATA_DIR")
    assert qm9.default_data_dir() == Path.home() / ".cache" / "segnn_jax"


# ---------------------------------------------------------------------------------------------
# Split, targets, units


def test_cormorant_split_sizes_and_reproducibility():
    state = np.random.get_state()
    split = qm9.cormorant_split()
    assert {k: len(v) for k, v in split.items()} == {
        "train": 100_000,
        "valid": 17_748,
        "test": 13_083,
    }
    everything = np.concatenate([split["train"], split["valid"], split["test"]])
    np.testing.assert_array_equal(np.sort(everything), np.arange(130_831))
    # The exact legacy permutation of np.random.seed(0); np.random.permutation(130831).
    assert split["train"][:6].tolist() == [130195, 68784, 7957, 25911, 20168, 12658]
    assert split["valid"][:3].tolist() == [68751, 123554, 28669]
    assert split["test"][-3:].tolist() == [42613, 43567, 68268]
    again = qm9.cormorant_split()
    for name in split:
        np.testing.assert_array_equal(split[name], again[name])
    # The caller's global RNG state is left alone.
    assert all(np.array_equal(a, b) for a, b in zip(state[1:2], np.random.get_state()[1:2]))
    with pytest.raises(ValueError, match="130831"):
        qm9.cormorant_split(1000)


def test_split_molecules_requires_full_set(readers):
    with pytest.raises(ValueError, match="130831 characterised"):
        qm9.split_molecules(readers["csv"])


def test_target_table():
    assert len(qm9.TARGETS) == 12
    assert qm9.TARGETS["homo"] == qm9.Target("homo", "meV", 27211.386246)
    assert qm9.TARGETS["alpha"] == qm9.Target("alpha", "a0^3", 1.0)
    assert qm9.TARGETS["Cv"].unit == "cal/mol/K"
    assert {qm9.TARGETS[n].unit for n in ("homo", "lumo", "gap", "zpve", "U0", "U", "H", "G")} == {
        "meV"
    }


def test_unit_conversions_against_hand_computed_values(readers):
    methane = readers["original"].select_indices([1])
    values = qm9.target_values(methane, ["homo", "U0", "zpve", "mu", "alpha", "r2", "Cv"])[0]
    # By hand: 0.3877 * 27211.386246 = 8163.4158738 + 2176.91089968 + 190.479703722
    # + 19.0479703722 = 10549.8544476 meV.
    assert values[0] == pytest.approx(-10549.8544476, rel=1e-10)
    # 40.47893 * 27211.386246 = 1088455.44984 + 13032.3492148 = 1101487.7990548 meV.
    assert values[1] == pytest.approx(-1101487.7990548, rel=1e-12)
    assert values[2] == pytest.approx(0.044749 * 27211.386246, rel=1e-12)
    np.testing.assert_array_equal(values[3:], [0.0, 13.21, 35.3641, 6.469])


def test_atom_reference_subtraction(readers):
    water = readers["original"].select_indices([3])  # H2O
    reference = -75.064579 + 2 * -0.500273
    assert qm9.atom_reference_energy(water, "U0")[0] == pytest.approx(reference, abs=1e-12)
    atomisation = qm9.target_values(water, ["U0", "alpha"], atom_reference=True)[0]
    # (-76.404702 - (-76.065125)) Ha = -0.339577 Ha = -9240.3631... meV
    assert atomisation[0] == pytest.approx(-0.339577 * 27211.386246, rel=1e-9)
    assert atomisation[1] == 6.31  # non-energies are untouched
    g = qm9.target_values(water, "G", atom_reference=True)[0, 0]
    assert g == pytest.approx((-76.422349 - (-75.079532 - 2 * 0.510927)) * 27211.386246, rel=1e-9)
    with pytest.raises(ValueError, match="atom references"):
        qm9.atom_reference_energy(water, "zpve")


# ---------------------------------------------------------------------------------------------
# Graphs


def _brute_force_edges(positions, cutoff):
    n = len(positions)
    pairs = [
        (j, i)
        for i in range(n)
        for j in range(n)
        if i != j and np.sum((positions[i] - positions[j]) ** 2) < cutoff**2
    ]
    return pairs


@pytest.mark.parametrize("cutoff", [1.2, 2.0, 3.5])
def test_radius_edges_match_graph_module_and_brute_force(readers, cutoff):
    from segnn_jax.graph import radius_graph_edges

    molecules = readers["csv"].subset(np.arange(0, 1000, 7))
    senders, receivers, n_edge = qm9.radius_edges(molecules, cutoff, chunk=5)
    offsets = np.concatenate([[0], np.cumsum(n_edge)])
    for m in range(len(molecules)):
        positions = molecules.molecule(m)[1]
        s, r = senders[offsets[m] : offsets[m + 1]], receivers[offsets[m] : offsets[m + 1]]
        ref_s, ref_r = radius_graph_edges(positions, cutoff)
        np.testing.assert_array_equal(s, ref_s)
        np.testing.assert_array_equal(r, ref_r)
        assert sorted(zip(s.tolist(), r.tolist())) == sorted(_brute_force_edges(positions, cutoff))


def test_molecules_to_graphs(readers):
    molecules = readers["original"]
    graphs = qm9.molecules_to_graphs(molecules, ["U0", "alpha"], cutoff=2.0)
    assert len(graphs) == 10
    methane = graphs[0]
    assert methane.n_node.tolist() == [5] and methane.n_edge.tolist() == [20]
    np.testing.assert_array_equal(methane.nodes["atomic_numbers"], [6, 1, 1, 1, 1])
    np.testing.assert_array_equal(methane.nodes["features"][:2], [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert methane.nodes["features"].dtype == np.float32
    assert methane.globals["targets"].shape == (1, 2)
    assert methane.globals["targets"].dtype == np.float64
    assert methane.globals["targets"][0, 1] == 13.21
    assert methane.globals["targets"][0, 0] == pytest.approx(-40.47893 * 27211.386246, rel=1e-12)
    for graph in graphs:
        vectors = (
            graph.nodes["positions"][graph.senders] - graph.nodes["positions"][graph.receivers]
        )
        assert (np.linalg.norm(vectors, axis=1) < 2.0).all()
    empty = qm9.molecules_to_graphs(molecules.subset([0]))
    assert empty[0].globals["targets"].shape == (1, 0)


def test_one_hot_rejects_other_elements():
    np.testing.assert_array_equal(qm9.one_hot_elements([9, 1]), [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"\[17\]"):
        qm9.one_hot_elements([1, 17])


def test_graph_statistics_on_fixture(readers):
    stats = qm9.graph_statistics(readers["csv"], cutoff=2.0)
    assert 2.0 < stats["mean_in_degree"] < 3.5
    senders, _, _ = qm9.radius_edges(readers["csv"], 2.0)
    assert stats["n_edges"] == len(senders)
    assert stats["mean_in_degree"] == pytest.approx(len(senders) / stats["n_atoms"])
    tiny = qm9.graph_statistics(readers["csv"], cutoff=0.5)
    assert tiny["fraction_isolated_atoms"] == 1.0 and tiny["mean_in_degree"] == 0.0


# ---------------------------------------------------------------------------------------------
# Full data set (qm9pack installed)


@pytest.mark.slow
def test_full_qm9pack(tmp_path):
    if importlib.util.find_spec("qm9pack") is None:
        pytest.skip("qm9pack not installed: pip install --no-deps 'qm9pack>=1.0.3'")
    start = time.perf_counter()
    molecules = qm9.load_qm9(data_dir=tmp_path)
    parse_s = time.perf_counter() - start
    start = time.perf_counter()
    cached = qm9.load_qm9(data_dir=tmp_path)
    load_s = time.perf_counter() - start
    assert len(molecules) == len(cached) == qm9.N_CHARACTERISED
    assert molecules.n_atoms.min() == 3 and molecules.n_atoms.max() == 29
    assert set(np.unique(molecules.atomic_numbers).tolist()) == {1, 6, 7, 8, 9}
    np.testing.assert_array_equal(cached.properties, molecules.properties)
    splits = qm9.split_molecules(molecules)
    assert {k: len(v) for k, v in splits.items()} == qm9.SPLIT_SIZES
    start = time.perf_counter()
    stats = qm9.graph_statistics(molecules, 2.0)
    stats_s = time.perf_counter() - start
    assert 2.0 < stats["mean_in_degree"] < 3.5
    if CSV.is_file():
        fixture = qm9.read_qm9pack_csv(CSV)
        np.testing.assert_array_equal(
            molecules.subset(np.arange(1000)).properties, fixture.properties
        )
    print(
        f"\nQM9 full: parse {parse_s:.1f} s, cache load {load_s:.2f} s, "
        f"radius edges + stats {stats_s:.1f} s, mean in-degree at 2 A "
        f"{stats['mean_in_degree']:.3f}, molecules with an isolated atom "
        f"{stats['fraction_molecules_with_isolated_atom']:.5f}"
    )
