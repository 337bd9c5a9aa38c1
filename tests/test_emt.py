"""Tests of the EMT OC20-style data generator (segnn_jax.datasets.emt)."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip(
    "ase_db_backends", reason="ase-db-backends (segnn[oc20] extra) is not installed"
)
pytest.importorskip("threadpoolctl", reason="threadpoolctl (segnn[oc20] extra) is not installed")

from segnn_jax.datasets.emt import (
    ADSORBATES,
    METALS,
    SITES,
    EMTConfig,
    EMTDatasetError,
    catalyst_compositions,
    gas_references,
    generate_emt_sample,
    generate_emt_dataset,
    main,
    sample_spec,
)
from segnn_jax.datasets.oc20 import read_oc20

SEED = 3


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("emt") / "full"
    summary = generate_emt_dataset(
        out, n_samples=3, seed=SEED, n_workers=1, shard_size=1, progress=False
    )
    return out, summary


def _key(record):
    return (
        record.sid,
        record.positions.tobytes(),
        record.pos_relaxed.tobytes(),
        record.y_relaxed,
        record.y_init,
    )


def test_samples_are_oc20_style(generated):
    out, summary = generated
    assert (
        summary["generated"] == 3 and summary["skipped"] == 0 and summary["samples_per_minute"] > 0
    )
    records = read_oc20(out)
    assert [r.sid for r in records] == [0, 1, 2]
    for r in records:
        spec = sample_spec(SEED, r.sid)
        assert (r.extras["metal"], r.extras["adsorbate"], r.extras["site"]) == (
            spec.metal,
            spec.adsorbate,
            spec.site,
        )
        assert r.extras["level_of_theory"] == "EMT"
        n_ads = int((r.tags == 2).sum())
        assert r.natoms == 27 + n_ads and (r.tags == 1).sum() == 9 and (r.tags == 0).sum() == 18
        np.testing.assert_array_equal(r.fixed, r.tags == 0)
        assert r.pbc.all() and r.cell[2, 2] > 15.0
        slab_z = r.positions[r.tags < 2, 2]
        assert np.all(r.positions[r.tags == 2, 2] > slab_z.max())
        # Fixed atoms stay put; the relaxation moved something else.
        np.testing.assert_array_equal(r.pos_relaxed[r.fixed], r.positions[r.fixed])
        assert np.abs(r.pos_relaxed - r.positions).max() > 1e-3
        # Converged: residual force on free atoms below fmax.
        assert r.extras["converged"]
        free_force = np.sqrt((r.extras["forces_relaxed"][~r.fixed] ** 2).sum(-1))
        assert free_force.max() < 0.05
        # Target definition: relaxed total minus clean slab minus gas references.
        refs = gas_references()
        symbols = {1: "H", 6: "C", 7: "N", 8: "O"}
        e_gas = sum(refs[symbols[z]] for z in r.atomic_numbers[r.tags == 2])
        assert r.extras["e_gas_reference"] == pytest.approx(e_gas)
        assert r.y_relaxed == pytest.approx(
            r.extras["e_total_relaxed"] - r.extras["e_clean_slab"] - e_gas
        )
        assert r.y_relaxed < r.y_init + 1e-9  # BFGS lowered the energy
        assert r.energy == pytest.approx(r.extras["traj_energies"][0])
        frames = r.extras["traj_frame_index"]
        assert frames[0] == 0 and frames[-1] == len(r.extras["traj_energies"]) - 1
        assert r.extras["traj_positions"].shape == (len(frames), r.natoms, 3)


def test_gas_references_follow_oc20_scheme():
    from ase.build import molecule
    from ase.calculators.emt import EMT

    refs = gas_references()
    h2 = molecule("H2")
    h2.center(vacuum=6.0)
    h2.calc = EMT()
    # The relaxed H2 is at most slightly below the g2 geometry.
    assert refs["H"] <= h2.get_potential_energy() / 2 + 1e-9
    assert set(refs) == {"H", "C", "N", "O"}


def test_sample_spec_is_reproducible_and_covers_choices():
    specs = [sample_spec(0, i) for i in range(400)]
    assert specs[17] == sample_spec(0, 17)
    assert sample_spec(1, 17) != specs[17]
    assert {s.metal for s in specs} == set(METALS)
    assert {s.adsorbate for s in specs} == set(ADSORBATES)
    assert {s.site for s in specs} == set(SITES)


def test_resume_after_interruption_gives_the_same_set(generated, tmp_path):
    full, _ = generated
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    # Simulate a run killed while writing shard 1: the shard is missing, a partial temp file remains.
    (out / "shard_00001.aselmdb").unlink()
    (out / "shard_00001.aselmdb.tmp").write_bytes(b"partial write")
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.aselmdb")}
    summary = generate_emt_dataset(
        out, n_samples=3, seed=SEED, n_workers=1, shard_size=1, progress=False
    )
    assert summary["generated"] == 1 and summary["skipped"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[02].aselmdb")} == untouched
    assert not list(out.glob("*.tmp*"))
    assert [_key(r) for r in read_oc20(out)] == [_key(r) for r in read_oc20(full)]
    # Nothing left to do on a complete directory.
    again = generate_emt_dataset(
        out, n_samples=3, seed=SEED, n_workers=1, shard_size=1, progress=False
    )
    assert again["generated"] == 0


def test_resume_with_other_parameters_is_refused(generated, tmp_path):
    full, _ = generated
    out = tmp_path / "other"
    shutil.copytree(full, out)
    with pytest.raises(EMTDatasetError, match="different parameters"):
        generate_emt_dataset(
            out, n_samples=3, seed=SEED + 1, n_workers=1, shard_size=1, progress=False
        )
    manifest = json.loads((out / "emt_dataset.json").read_text())
    assert manifest["seed"] == SEED and "EMT" in manifest["calculator"]


@pytest.mark.parametrize(
    "kwargs",
    [{"layers": 2, "free_layers": 2}, {"size": (0, 3)}, {"fmax": 0.0}, {"stored_frames": 1},
     {"catalysts": "ternary"}, {"catalysts": "binary", "size": (2, 2)}],
)
def test_invalid_config(kwargs):
    with pytest.raises(EMTDatasetError):
        EMTConfig(**kwargs)


def test_invalid_generation_arguments(tmp_path):
    with pytest.raises(EMTDatasetError):
        generate_emt_dataset(tmp_path, n_samples=0, progress=False)


@pytest.mark.slow
def test_two_workers_give_the_same_set(generated, tmp_path):
    full, _ = generated
    out = tmp_path / "parallel"
    summary = generate_emt_dataset(
        out, n_samples=3, seed=SEED, n_workers=2, shard_size=2, progress=False
    )
    assert summary["generated"] == 3
    assert [_key(r) for r in read_oc20(out)] == [_key(r) for r in read_oc20(full)]


def test_command_line_resumes_the_same_set(generated, tmp_path, capsys):
    full, _ = generated
    out = tmp_path / "cli"
    shutil.copytree(full, out)
    (out / "shard_00002.aselmdb").unlink()
    argv = [str(out), "--n-samples", "3", "--seed", str(SEED), "--workers", "1"]
    summary = main([*argv, "--shard-size", "1", "--no-progress"])
    assert summary["generated"] == 1
    assert json.loads(capsys.readouterr().out)["skipped"] == 2
    assert [_key(r) for r in read_oc20(out)] == [_key(r) for r in read_oc20(full)]


def test_element_samples_keep_their_draws():
    """Sample 0 and 1 of seed 0 as the committed 20,000-sample set holds them (before alloys)."""
    first, second = sample_spec(0, 0), sample_spec(0, 1)
    assert (first.metal, first.adsorbate, first.site, first.offset) == ("Ni", "OH", "hcp", (0, 0))
    assert (second.metal, second.adsorbate, second.site, second.offset) == (
        "Pt", "CH2", "fcc", (1, 0))
    assert first.rattle_seed == 87989972 and second.rattle_seed == 1719937020


def test_binary_catalysts_are_the_metals_and_their_alloys():
    table = catalyst_compositions("binary")
    assert len(table) == 7 + 2 * 21
    assert catalyst_compositions("elements") == {m: ((m, 1.0),) for m in METALS}
    assert table["Cu2Pt"] == (("Cu", 2 / 3), ("Pt", 1 / 3))
    assert table["CuPt2"] == (("Cu", 1 / 3), ("Pt", 2 / 3))
    for composition in table.values():
        assert sum(f for _, f in composition) == pytest.approx(1.0)
    specs = [sample_spec(0, i, EMTConfig(catalysts="binary")) for i in range(2000)]
    assert {s.metal for s in specs} == set(table)
    with pytest.raises(EMTDatasetError, match="catalysts"):
        catalyst_compositions("ternary")


def _alloy_index(config):
    return next(i for i in range(1000)
                if len(catalyst_compositions("binary")[sample_spec(SEED, i, config).metal]) > 1)


def test_alloy_slab_has_the_catalyst_composition_in_every_layer():
    from ase.build import fcc111
    from ase.calculators.emt import EMT

    from segnn_jax.datasets.emt import _lattice_constant, _relax, _slab

    config = EMTConfig(catalysts="binary")
    index = _alloy_index(config)
    spec = sample_spec(SEED, index, config)
    (first, f1), (second, f2) = catalyst_compositions("binary")[spec.metal]
    sample = generate_emt_sample(SEED, index, config)
    atoms, kv = sample["atoms"], sample["key_value_pairs"]
    assert kv["metal"] == spec.metal and kv["level_of_theory"] == "EMT"
    slab = atoms[atoms.get_tags() < 2]
    layers = np.asarray(slab.get_chemical_symbols()).reshape(3, 9)  # fcc111 builds layer by layer
    assert np.all(np.diff(slab.positions[:, 2].reshape(3, 9).mean(axis=1)) > 1.0)
    for layer in layers:
        assert (layer == first).sum() == round(9 * f1) and (layer == second).sum() == round(9 * f2)
    # Vegard's law between the metals' EMT lattice constants (in-plane cell of the 3x3 slab).
    lattice = f1 * _lattice_constant(first) + f2 * _lattice_constant(second)
    reference = fcc111(first, size=(3, 3, 3), a=lattice, vacuum=config.vacuum)
    np.testing.assert_allclose(atoms.cell[:2], reference.cell[:2])
    # The clean-slab term is that arrangement's relaxed energy, not a pure metal's.
    clean = _slab(spec.metal, config, spec.arrangement_seed)
    np.testing.assert_array_equal(clean.get_chemical_symbols(), slab.get_chemical_symbols())
    clean.calc = EMT()
    _relax(clean, config.fmax / 5, 1000)
    assert kv["e_clean_slab"] == pytest.approx(clean.get_potential_energy())
    assert kv["y_relaxed"] == pytest.approx(
        kv["e_total_relaxed"] - kv["e_clean_slab"] - kv["e_gas_reference"])
    # Another sample of the same alloy puts its metals on other sites.
    other = next(i for i in range(index + 1, 2000)
                 if sample_spec(SEED, i, config).metal == spec.metal)
    other_slab = _slab(spec.metal, config, sample_spec(SEED, other, config).arrangement_seed)
    assert other_slab.get_chemical_symbols() != clean.get_chemical_symbols()


def test_pure_metal_of_the_binary_set_is_the_element_slab():
    from segnn_jax.datasets.emt import _slab

    element, binary = EMTConfig(), EMTConfig(catalysts="binary")
    a, b = _slab("Pd", element), _slab("Pd", binary, arrangement_seed=123)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert a.get_chemical_symbols() == b.get_chemical_symbols()


def test_sets_generated_before_the_catalysts_option_resume(generated, tmp_path):
    full, _ = generated
    out = tmp_path / "old"
    shutil.copytree(full, out)
    manifest = json.loads((out / "emt_dataset.json").read_text())
    del manifest["config"]["catalysts"]
    (out / "emt_dataset.json").write_text(json.dumps(manifest))
    summary = generate_emt_dataset(
        out, n_samples=3, seed=SEED, n_workers=1, shard_size=1, progress=False)
    assert summary["generated"] == 0
    with pytest.raises(EMTDatasetError, match="different parameters"):
        generate_emt_dataset(out, n_samples=3, seed=SEED, n_workers=1, shard_size=1,
                             config=EMTConfig(catalysts="binary"), progress=False)


def test_alloy_set_reads_back_with_its_catalyst_labels(tmp_path):
    from ase.data import chemical_symbols

    from segnn_jax.tasks.oc20 import load_systems

    config = EMTConfig(catalysts="binary")
    generate_emt_dataset(tmp_path, n_samples=3, seed=SEED, config=config, shard_size=3,
                         progress=False)
    systems, level = load_systems(tmp_path)
    assert level == "EMT" and len(systems) == 3
    for index, system in enumerate(systems):  # records come back in sample order
        spec = sample_spec(SEED, index, config)
        assert system.catalyst == spec.metal and system.adsorbate == spec.adsorbate
        slab = np.asarray(system.atomic_numbers)[np.asarray(system.tags) < 2]
        metals = {metal for metal, _ in catalyst_compositions("binary")[spec.metal]}
        assert {chemical_symbols[z] for z in slab} == metals
