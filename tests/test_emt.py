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
    gas_references,
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
    [{"layers": 2, "free_layers": 2}, {"size": (0, 3)}, {"fmax": 0.0}, {"stored_frames": 1}],
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
