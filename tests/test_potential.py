"""Tests of segnn_jax.potential: conservative forces and stress are gradients of the energy, the
energy is invariant (forces equivariant) under E(3) and permutations, extensive, and smooth at
the cutoff. Everything runs in float64 on one padded shape, so the model compiles once."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from scipy.spatial.transform import Rotation

from segnn_jax import potential as pot
from segnn_jax.graph import batch_graphs, pad_graph

CUTOFF = 3.5
N_PAD, E_PAD, G_PAD = 40, 1200, 3


def tiny_spec(head="conservative"):
    return pot.PotentialSpec(
        model={"hidden_irreps": "4x0e+2x1o", "num_layers": 1, "lmax_attr": 1, "task": "node"},
        cutoff=CUTOFF, head=head, embedding_dim=3, num_radial=3, avg_num_neighbors=4.0,
        energy_scale=0.7, element_energies={29: -0.3, 8: -1.2})


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def conservative(x64):
    spec = tiny_spec()
    model = pot.make_potential(spec)
    params, state = model.init(jax.random.PRNGKey(0), _padded(_slab()))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    run = jax.jit(functools.partial(pot.predict, model, stress=True))
    return lambda atoms_or_graph: run(params, state, _as_graph(atoms_or_graph))


def _slab(seed=0):
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=4.0)
    add_adsorbate(slab, "O", 1.4, "fcc")
    slab.pbc = True
    slab.rattle(0.05, seed=seed)
    return slab


def _graph(atoms):
    return pot.structure_graph(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc,
                               CUTOFF, dtype=np.float64)


def _padded(atoms_or_graph):
    graph = _graph(atoms_or_graph) if isinstance(atoms_or_graph, Atoms) else atoms_or_graph
    return pad_graph(graph, N_PAD, E_PAD, G_PAD)


def _as_graph(atoms_or_graph):
    return _padded(atoms_or_graph)


def _energy(predict, atoms):
    return float(predict(atoms)["energy"][0])


def test_forces_are_minus_the_finite_difference_gradient(conservative):
    atoms = _slab()
    forces = np.asarray(conservative(atoms)["forces"])[:len(atoms)]
    h = 1e-5
    rng = np.random.default_rng(0)
    for i, k in zip(rng.integers(len(atoms), size=6), rng.integers(3, size=6)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, k] += h
        minus.positions[i, k] -= h
        numeric = -(_energy(conservative, plus) - _energy(conservative, minus)) / (2 * h)
        assert forces[i, k] == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    assert np.abs(forces).max() > 1e-4  # not trivially zero


def test_stress_is_the_strain_derivative(conservative):
    atoms = _slab(1)
    stress = np.asarray(conservative(atoms)["stress"][0])
    eps, volume = 1e-6, atoms.get_volume()
    for a, b in [(0, 0), (1, 2), (2, 2), (0, 1)]:
        energies = []
        for sign in (1, -1):
            strain = np.zeros((3, 3))
            strain[a, b] += sign * eps / 2
            strain[b, a] += sign * eps / 2
            deformed = atoms.copy()
            deformed.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
            energies.append(_energy(conservative, deformed))
        numeric = (energies[0] - energies[1]) / (2 * eps) / volume
        assert stress[a, b] == pytest.approx(numeric, rel=1e-5, abs=1e-10)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)


@pytest.mark.parametrize("reflect", [False, True])
def test_invariance_and_equivariance_under_euclidean_motions(conservative, reflect):
    atoms = _slab(2)
    before = conservative(atoms)
    rotation = Rotation.random(random_state=3 + reflect).as_matrix()
    if reflect:
        rotation = -rotation  # an improper rotation (det -1)
    moved = atoms.copy()
    moved.set_cell(atoms.cell.array @ rotation.T)
    moved.positions = atoms.positions @ rotation.T + np.array([1.3, -0.7, 2.1])
    after = conservative(moved)
    n = len(atoms)
    assert float(after["energy"][0]) == pytest.approx(float(before["energy"][0]), abs=1e-10)
    np.testing.assert_allclose(np.asarray(after["forces"])[:n],
                               np.asarray(before["forces"])[:n] @ rotation.T, atol=1e-10)
    np.testing.assert_allclose(np.asarray(after["stress"][0]),
                               rotation @ np.asarray(before["stress"][0]) @ rotation.T, atol=1e-10)


def test_hybrid_order_is_traced_weights_first_only(x64, monkeypatch):
    """Forces differentiate every product of the energy, so ``predict`` traces a hybrid model
    weights-first only (no couple-first coupling) and gets weights-first's energy, forces and
    stress."""
    from segnn_jax import tensor_product as tp

    couplings = []
    couple = tp._couple_components
    monkeypatch.setattr(tp, "_couple_components", lambda *a: couplings.append(1) or couple(*a))
    graph = _padded(_slab())
    results = {}
    for order in ("hybrid", "weights_first"):
        spec = tiny_spec()
        # Scanned layers: the product inside the scan is traced to a jaxpr before it is
        # differentiated, which traces the custom_vjp's couple-first primal too.
        spec = dataclasses.replace(spec, model=dict(spec.model, contraction_order=order,
                                                    num_layers=2, scan_layers=True))
        model = pot.make_potential(spec)
        params, state = model.init(jax.random.PRNGKey(0), graph)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        jax.clear_caches()  # JAX keeps the traces of a custom_vjp's primal
        couplings.clear()
        results[order] = jax.jit(functools.partial(pot.predict, model, stress=True))(
            params, state, graph)
        assert not couplings, order
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(results["hybrid"][key], results["weights_first"][key],
                                   rtol=1e-12, atol=1e-14)


def test_permutation_of_atoms(conservative):
    atoms = _slab(4)
    order = np.random.default_rng(5).permutation(len(atoms))
    permuted = atoms[order]
    before, after = conservative(atoms), conservative(permuted)
    n = len(atoms)
    assert float(after["energy"][0]) == pytest.approx(float(before["energy"][0]), abs=1e-10)
    np.testing.assert_allclose(np.asarray(after["forces"])[:n],
                               np.asarray(before["forces"])[:n][order], atol=1e-10)


def _cluster(shift):
    cluster = Atoms("Cu4O", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [1.2, 1.2, 2.0],
                                       [1.0, 1.0, 1.0]], cell=np.zeros((3, 3)), pbc=False)
    cluster.rattle(0.05, seed=int(shift))
    cluster.positions += shift
    return cluster


def test_far_apart_systems_add_up(conservative):
    first, second = _cluster(0.0), _cluster(3 * CUTOFF)
    both = first + second
    together = conservative(both)
    apart = [conservative(first), conservative(second)]
    assert float(together["energy"][0]) == pytest.approx(
        sum(float(a["energy"][0]) for a in apart), abs=1e-10)
    np.testing.assert_allclose(np.asarray(together["forces"])[:10], np.concatenate(
        [np.asarray(a["forces"])[:5] for a in apart]), atol=1e-10)
    # And as two graphs of one batch: one energy per structure.
    batch = batch_graphs([_graph(first), _graph(second)])
    out = conservative(batch)
    np.testing.assert_allclose(np.asarray(out["energy"])[:2],
                               [float(a["energy"][0]) for a in apart], atol=1e-10)
    assert float(out["energy"][2]) == 0.0  # the padding structure


def test_energy_is_smooth_at_the_cutoff(conservative):
    def dimer(r):
        return Atoms("CuO", positions=[[0, 0, 0], [r, 0, 0]], cell=np.zeros((3, 3)), pbc=False)

    inside, outside = conservative(dimer(CUTOFF - 1e-4)), conservative(dimer(CUTOFF + 1e-4))
    isolated = (conservative(Atoms("Cu", cell=np.zeros((3, 3))))["energy"][0]
                + conservative(Atoms("O", cell=np.zeros((3, 3))))["energy"][0])
    assert float(outside["energy"][0]) == pytest.approx(float(isolated), abs=1e-12)
    # The envelope vanishes with two derivatives: energy and force are continuous.
    assert abs(float(inside["energy"][0] - outside["energy"][0])) < 1e-9
    assert np.abs(np.asarray(inside["forces"])[:2]).max() < 1e-6
    mid = conservative(dimer(0.8 * CUTOFF))
    assert abs(float(mid["energy"][0] - outside["energy"][0])) > 1e-6  # it does interact


def test_direct_head_is_equivariant(x64):
    spec = tiny_spec("direct")
    model = pot.make_potential(spec)
    atoms = _slab(6)
    params, state = model.init(jax.random.PRNGKey(1), _padded(atoms))
    run = jax.jit(functools.partial(pot.predict, model, head="direct"))
    rotation = Rotation.random(random_state=7).as_matrix()
    moved = atoms.copy()
    moved.set_cell(atoms.cell.array @ rotation.T)
    moved.positions = atoms.positions @ rotation.T
    before, after = run(params, state, _padded(atoms)), run(params, state, _padded(moved))
    n = len(atoms)
    assert np.abs(np.asarray(before["forces"])[:n]).max() > 1e-6
    np.testing.assert_allclose(np.asarray(after["forces"])[:n],
                               np.asarray(before["forces"])[:n] @ rotation.T, atol=1e-6)
    assert float(after["energy"][0]) == pytest.approx(float(before["energy"][0]), abs=1e-6)
    with pytest.raises(ValueError, match="no stress"):
        pot.predict(model, params, state, _padded(atoms), head="direct", stress=True)


def test_spec_checks_and_round_trip():
    spec = tiny_spec()
    assert pot.PotentialSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="head"):
        pot.PotentialSpec(model={}, cutoff=3.0, head="magic")
    with pytest.raises(ValueError, match="norm='none'"):
        pot.PotentialSpec(model={"norm": "instance"}, cutoff=3.0)
    with pytest.raises(ValueError, match="cutoff"):
        pot.PotentialSpec(model={}, cutoff=-1.0)


def test_fit_element_energies_recovers_per_element_energies():
    rng = np.random.default_rng(0)
    truth = {8: -1.5, 29: -3.25}
    compositions = [{8: int(a), 29: int(b)} for a, b in rng.integers(1, 9, size=(20, 2))]
    energies = [sum(truth[z] * n for z, n in c.items()) for c in compositions]
    fitted, predicted = pot.fit_element_energies(compositions, energies)
    assert fitted == pytest.approx(truth, abs=1e-6)
    np.testing.assert_allclose(predicted, energies, atol=1e-5)
