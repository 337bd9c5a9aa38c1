"""Tests of segnn_jax.md: the JAX-MD energy function equals the potential's energy on the same
structure, its forces are the potential's forces, and a jitted NVE simulation with a neighbour
list conserves energy (drift reported). Skipped without jax-md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from ase.build import fcc111

jax_md = pytest.importorskip("jax_md", reason="jax-md is not installed (pip install 'segnn[md]')")
from jax_md import quantity, simulate, space

from segnn_jax import md
from segnn_jax import potential as pot
from segnn_jax.graph import pad_graph

CUTOFF = 3.5


@pytest.fixture(scope="module")
def system():
    spec = pot.PotentialSpec(
        model={"hidden_irreps": "4x0e+2x1o", "num_layers": 1, "lmax_attr": 1, "task": "node"},
        cutoff=CUTOFF, embedding_dim=3, num_radial=3, avg_num_neighbors=4.0, energy_scale=0.3,
        element_energies={29: -0.3})
    model = pot.make_potential(spec)
    # An orthorhombic slab, periodic in x and y, with vacuum in z: every box side > 2 cutoffs,
    # as JAX-MD's minimum-image displacement needs.
    slab = fcc111("Cu", size=(4, 4, 3), orthogonal=True, vacuum=6.0)
    slab.pbc = True
    slab.rattle(0.03, seed=0)
    box = np.diag(slab.cell.array)
    assert np.allclose(slab.cell.array, np.diag(box)) and (box > 2 * CUTOFF).all()
    graph = pot.structure_graph(slab.positions, slab.numbers, slab.cell.array, True, CUTOFF)
    params, state = model.init(jax.random.PRNGKey(0), graph)
    return spec, model, params, state, slab, box


def test_energy_and_forces_match_the_graph_potential(system):
    spec, model, params, state, slab, box = system
    displacement, _ = space.periodic(jnp.asarray(box, jnp.float32))
    neighbor_fn = md.jax_md_neighbor_list(displacement, jnp.asarray(box, jnp.float32), spec)
    positions = jnp.asarray(np.mod(slab.positions, box), jnp.float32)
    nbrs = neighbor_fn.allocate(positions)
    energy = md.energy_fn(model, params, state, slab.numbers, displacement)
    e_md, grad = jax.jit(jax.value_and_grad(energy))(positions, nbrs)
    e_md, f_md = float(e_md), -np.asarray(grad)
    graph = pot.structure_graph(slab.positions, slab.numbers, slab.cell.array, True, CUTOFF)
    n = len(slab)
    padded = pad_graph(graph, n + 1, int(graph.n_edge[0]), 2)
    out = jax.jit(lambda p, g: pot.predict(model, p, state, g))(params, padded)
    assert e_md == pytest.approx(float(out["energy"][0]), abs=1e-4)
    np.testing.assert_allclose(f_md, np.asarray(out["forces"])[:n], atol=1e-4)


def test_jitted_nve_simulation_conserves_energy(system):
    spec, model, params, state, slab, box = system
    box = jnp.asarray(box, jnp.float32)
    displacement, shift = space.periodic(box)
    neighbor_fn = md.jax_md_neighbor_list(displacement, box, spec, dr_threshold=0.5)
    energy = md.energy_fn(model, params, state, slab.numbers, displacement)
    dt = 1.0 * units.fs  # ASE's time unit is A sqrt(amu / eV), JAX-MD's too with A, eV, amu
    init, apply = simulate.nve(energy, shift, dt)
    positions = jnp.asarray(np.mod(slab.positions, np.asarray(box)), jnp.float32)
    masses = jnp.asarray(slab.get_masses(), jnp.float32)
    nbrs = neighbor_fn.allocate(positions)
    kT = 300 * units.kB
    md_state = init(jax.random.PRNGKey(1), positions, kT=kT, mass=masses[:, None], neighbor=nbrs)

    def total_energy(md_state, nbrs):
        kinetic = quantity.kinetic_energy(momentum=md_state.momentum, mass=md_state.mass)
        return energy(md_state.position, nbrs) + kinetic

    @jax.jit
    def run(md_state, nbrs):
        def step(_, carry):
            md_state, nbrs = carry
            md_state = apply(md_state, neighbor=nbrs)
            return md_state, nbrs.update(md_state.position)

        md_state, nbrs = jax.lax.fori_loop(0, 20, step, (md_state, nbrs))
        return md_state, nbrs, total_energy(md_state, nbrs)

    start = float(jax.jit(total_energy)(md_state, nbrs))
    totals = []
    for _ in range(3):
        md_state, nbrs, total = run(md_state, nbrs)
        assert not bool(nbrs.did_buffer_overflow)
        totals.append(float(total))
    drift = totals[-1] - start
    print(f"JAX-MD NVE, tiny untrained model, dt 1 fs, 60 steps, {len(slab)} atoms: drift "
          f"{drift:.2e} eV, totals {totals}")
    assert abs(drift) < 1e-3 * len(slab)
    moved = np.abs(np.asarray(md_state.position) - np.asarray(positions)).max()
    assert moved > 1e-3  # the atoms did move
