"""SEGNN potentials in JAX-MD: a neighbour-list energy function, jitted end to end.

JAX-MD (``pip install 'segnn[md]'``, PyPI ``jax-md``) is imported only by
:func:`jax_md_neighbor_list`; :func:`energy_fn` needs nothing but a displacement function and a
JAX-MD-style sparse neighbour list (``idx`` ``[2, capacity]`` with receivers in row 0, senders in
row 1, and the padding slots holding the number of atoms). Typical use::

    from jax_md import space, simulate
    displacement, shift = space.periodic(box)          # orthorhombic box, Angstrom
    neighbor_fn = md.jax_md_neighbor_list(displacement, box, spec)
    energy = md.energy_fn(model, params, state, atomic_numbers, displacement)
    init, apply = simulate.nve(energy, shift, dt)       # units: A, eV, amu (time 10.18 fs)
    nbrs = neighbor_fn.allocate(positions)
    md_state = init(key, positions, kT=..., mass=masses, neighbor=nbrs)

Edges the list holds beyond the cutoff (its skin) get an envelope of exactly zero, so the energy
does not depend on when the list was rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from segnn_jax import potential as pot

__all__ = ["energy_fn", "jax_md_neighbor_list"]


def energy_fn(model: hk.TransformedWithState, params: Any, model_state: Any,
              atomic_numbers: Any, displacement_fn: Callable) -> Callable[..., jnp.ndarray]:
    """``energy(positions [N, 3], neighbor, **unused) -> total energy`` (eV), for JAX-MD.

    Args:
        model: a :func:`segnn_jax.potential.make_potential` network.
        params, model_state: its parameters and state.
        atomic_numbers: ``[N]`` ints (fixed for the simulation).
        displacement_fn: JAX-MD's ``displacement(Ra, Rb) -> Ra - Rb`` (minimum image if periodic).
    """
    numbers = jnp.concatenate([jnp.asarray(np.asarray(atomic_numbers), jnp.int32),
                               jnp.zeros((1,), jnp.int32)])
    n_atoms = int(numbers.shape[0]) - 1
    vector_fn = jax.vmap(displacement_fn)

    def energy(positions: jnp.ndarray, neighbor: Any, **unused: Any) -> jnp.ndarray:
        del unused
        receivers, senders = neighbor.idx[0], neighbor.idx[1]
        # One dummy atom at index N takes the padding slots; it belongs to a masked graph.
        extended = jnp.concatenate([positions, positions[:1]], axis=0)
        valid = receivers < n_atoms
        vectors = vector_fn(extended[senders], extended[receivers])
        n_edges = receivers.shape[0]
        graph = jraph.GraphsTuple(
            nodes={"positions": extended, "atomic_numbers": numbers}, edges={},
            senders=senders, receivers=receivers,
            n_node=jnp.asarray([n_atoms, 1], jnp.int32),
            n_edge=jnp.asarray([n_edges, 0], jnp.int32),
            globals={"graph_mask": jnp.asarray([True, False])})
        vectors = jnp.where(valid[:, None], vectors, 0.0)
        (atom_energies, _), _ = model.apply(params, model_state, None, graph, vectors, valid)
        return jnp.sum(atom_energies)

    return energy


def jax_md_neighbor_list(displacement_fn: Callable, box: Any, spec: pot.PotentialSpec, *,
                         dr_threshold: float = 0.5, capacity_multiplier: float = 1.5,
                         **kwargs: Any) -> Any:
    """JAX-MD's sparse neighbour list at the potential's cutoff (skin ``dr_threshold``).

    Raises:
        ImportError: jax-md is not installed.
    """
    try:
        from jax_md import partition
    except ImportError as e:
        raise ImportError("JAX-MD is not installed: pip install 'segnn[md]' (PyPI jax-md)") from e
    return partition.neighbor_list(displacement_fn, box, spec.cutoff, dr_threshold=dr_threshold,
                                   capacity_multiplier=capacity_multiplier,
                                   format=partition.Sparse, **kwargs)
