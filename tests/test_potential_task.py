"""Tests of the potential task (segnn_jax.tasks.potential): config checks, group splits, the
fitted constants and baseline; the slow test trains the tiny config end to end, restores it in
the ASE calculator and runs NVE molecular dynamics with the briefly trained model."""

import json

import numpy as np
import pytest

from segnn_jax.tasks import get_task
from segnn_jax.tasks import potential as task
from segnn_jax.training.config import ConfigError

pytest.importorskip("threadpoolctl", reason="threadpoolctl (segnn[oc20] extra) is not installed")


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    from segnn_jax.datasets.emt_frames import FramesConfig, generate_emt_frames

    out = tmp_path_factory.mktemp("frames")
    generate_emt_frames(out, 10, seed=1, progress=False,
                        config=FramesConfig(relaxation_frames=3, rattled_frames=3,
                                            metals=("Cu",)))
    return out


def test_registered_and_config_errors():
    assert get_task("potential") is task
    from segnn_jax.configs import load_config

    cfg = task.validate_config(load_config("emt_s2ef"))
    assert cfg["potential"]["head"] == "conservative" and cfg["model"]["task"] == "node"
    for section, key, value, match in [
        ("potential", "head", "magic", "config.potential.head"),
        ("loss", "force_weight", -1.0, "config.loss.force_weight"),
        ("model", "norm", "instance", "config.model"),
        ("data", "cutoff", 0, "config.data.cutoff"),
        ("data", "test_fraction", 0.95, "config.data"),
    ]:
        config = load_config("test_potential")
        config[section][key] = value
        with pytest.raises(ConfigError, match=match):
            task.validate_config(config)
    with pytest.raises(ConfigError, match="unknown option"):
        task.validate_config({"loss": {"stress_weight": 1.0}})


def test_split_keeps_relaxations_together_and_baseline(frames_dir):
    frames, level = task.load_frames(frames_dir)
    assert level == "EMT" and len(frames) == 60
    cfg = task.validate_config({"data": {"path": str(frames_dir), "valid_fraction": 0.2,
                                         "test_fraction": 0.2}})
    splits = task.split_frames(cfg, frames)
    groups = {split: {f.group for f in part} for split, part in splits.items()}
    assert len(groups["test"]) == 2 and len(groups["valid"]) == 2 and len(groups["train"]) == 6
    assert not (groups["test"] & groups["train"]) and not (groups["valid"] & groups["train"])
    graphs = [task.frame_graph(f, cfg["data"]["cutoff"]) for f in splits["train"]]
    spec = task.fit_spec(cfg, splits["train"], graphs)
    forces = np.concatenate([f.forces.ravel() for f in splits["train"]])
    assert spec.energy_scale == pytest.approx(np.sqrt(np.mean(forces**2)))
    assert set(spec.element_energies) == {29} | {int(z) for f in frames for z in f.atomic_numbers}
    baseline = task.baseline_metrics(spec, splits["test"])
    test_forces = np.concatenate([f.forces.ravel() for f in splits["test"]])
    assert baseline["force_mae"] == pytest.approx(np.mean(np.abs(test_forces)))
    assert baseline["energy_mae"] > 0


def test_frames_without_forces_are_refused(tmp_path):
    from ase.build import bulk
    from ase.io import write

    write(tmp_path / "plain.extxyz", bulk("Cu"))
    with pytest.raises(task.PotentialDataError, match="no energy"):
        task.load_frames(tmp_path / "plain.extxyz")


@pytest.mark.slow
def test_train_restore_and_molecular_dynamics(frames_dir, tmp_path):
    from ase import units
    from ase.io import read, write
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from segnn_jax import cli
    from segnn_jax.ase_calculator import SEGNNCalculator

    run_dir = tmp_path / "run"
    code = cli.main(["train", "test_potential", f"--config.data.path={frames_dir}",
                     "--config.train.num_epochs=3", "--run-dir", str(run_dir)])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["force_mae"] > 0 and results["git_revision"]
    evaluated = task.evaluate(run_dir, "test")
    assert evaluated["energy_mae"] == pytest.approx(results["test"]["energy_mae"], rel=1e-4)
    frames = read(str(next(frames_dir.glob("*.extxyz"))), index=":3")
    write(tmp_path / "in.extxyz", frames)
    out = task.predict(run_dir, tmp_path / "in.extxyz")
    predicted = read(str(out), index=":")
    assert len(predicted) == 3 and predicted[0].get_forces().shape == (len(frames[0]), 3)

    atoms = frames[-1].copy()
    atoms.calc = SEGNNCalculator.load(run_dir)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    totals = []
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    dyn.attach(lambda: totals.append(atoms.get_total_energy()))
    dyn.run(100)
    drift = totals[-1] - totals[0]
    print(f"ASE NVE with the briefly trained tiny model, dt 1 fs, 100 steps, {len(atoms)} atoms: "
          f"drift {drift:.2e} eV, std {np.std(totals):.2e} eV")
    assert abs(drift) < 1e-3 * len(atoms)
