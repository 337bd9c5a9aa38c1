"""Tests of segnn_jax.ase_calculator: energy, forces and stress in ASE, optimisation, NVE MD
(energy drift reported), and recompilation only when the padding bucket changes.

A tiny untrained potential (float32, as in production) is enough here: energy conservation and
the gradient relations do not depend on the parameters; the trained-model drift is measured by
``benchmarks/emt_s2ef.py`` (and the slow test of tests/test_potential_task.py)."""

import jax
import numpy as np
import pytest
from ase import units
from ase.build import add_adsorbate, fcc111
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from segnn_jax import potential as pot
from segnn_jax.ase_calculator import SEGNNCalculator, padded_sizes

CUTOFF = 3.5


@pytest.fixture(scope="module")
def calculator():
    spec = pot.PotentialSpec(
        model={"hidden_irreps": "4x0e+2x1o", "num_layers": 1, "lmax_attr": 1, "task": "node"},
        cutoff=CUTOFF, embedding_dim=3, num_radial=3, avg_num_neighbors=4.0, energy_scale=0.3,
        element_energies={29: -0.3, 8: -1.2})
    model = pot.make_potential(spec)
    slab = _slab()
    graph = pot.structure_graph(slab.positions, slab.numbers, slab.cell.array, True, CUTOFF)
    # A draw whose forces and stress stand well above the finite-difference noise (the tests
    # check that they do): untrained, their size varies tenfold from key to key.
    params, state = model.init(jax.random.PRNGKey(5), graph)
    return SEGNNCalculator(spec, params, state, model=model)


def _slab(seed=0):
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=4.0)
    add_adsorbate(slab, "O", 1.4, "fcc")
    slab.pbc = True
    slab.rattle(0.03, seed=seed)
    return slab


def test_energy_forces_stress_consistent(calculator):
    atoms = _slab()
    atoms.calc = calculator
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    assert forces.shape == (len(atoms), 3) and np.isfinite(energy)
    # Float32 model: compare with ASE's own finite differences at a float32-sized step.
    numeric = calculator.calculate_numerical_forces(atoms, d=1e-2)
    assert np.abs(numeric).max() > 5e-3
    np.testing.assert_allclose(forces, numeric, atol=2e-3)
    stress = atoms.get_stress()
    numeric_stress = calculator.calculate_numerical_stress(atoms, d=1e-3)
    print("stress", stress, "numerical", numeric_stress)
    assert np.abs(numeric_stress).max() > 1e-4
    np.testing.assert_allclose(stress, numeric_stress, atol=0.02 * np.abs(numeric_stress).max())


def test_bfgs_lowers_the_energy(calculator):
    atoms = _slab(1)
    atoms.calc = calculator
    start = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=1e-4, steps=10)
    assert atoms.get_potential_energy() < start


def test_nve_velocity_verlet_conserves_energy(calculator):
    atoms = _slab(2)
    atoms.calc = calculator
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    totals = []
    dyn.attach(lambda: totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy()))
    dyn.run(60)
    totals = np.asarray(totals)
    drift = float(totals[-1] - totals[0])
    fluctuation = float(totals.std())
    print(f"ASE NVE, tiny untrained model, dt 1 fs, 60 steps, {len(atoms)} atoms: drift "
          f"{drift:.2e} eV, std {fluctuation:.2e} eV, kinetic {atoms.get_kinetic_energy():.3f} eV")
    assert abs(drift) < 1e-3 * len(atoms) and fluctuation < 1e-3 * len(atoms)


def test_recompiles_only_when_the_bucket_changes(calculator):
    atoms = _slab(3)
    atoms.calc = calculator
    calculator.compiled_shapes.clear()
    for seed in range(3):  # small displacements: the edge count stays in its bucket
        atoms.rattle(0.002, seed=seed)
        atoms.get_forces()
    assert calculator.compilations == 1
    bigger = atoms.repeat((2, 1, 1))
    bigger.calc = calculator
    bigger.get_forces()
    assert calculator.compilations == 2


def test_padded_sizes_ladder():
    assert padded_sizes(7, 10) == (8, 64)
    nodes, edges = padded_sizes(29, 1000)
    assert nodes == 32 and edges >= 1000 and edges % 8 == 0
    assert padded_sizes(29, edges) == (32, edges)


def test_unknown_element_and_stress_without_pbc_are_refused(calculator):
    atoms = _slab()
    atoms[0].symbol = "Au"
    atoms.calc = calculator
    with pytest.raises(ValueError, match="Au"):
        atoms.get_potential_energy()
    molecule = _slab()
    molecule.pbc = False
    molecule.calc = calculator
    assert np.isfinite(molecule.get_potential_energy())
    with pytest.raises(ValueError, match="periodic"):
        molecule.get_stress()
