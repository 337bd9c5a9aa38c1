"""SEGNN as an interatomic potential: per-structure energies, forces and stress.

The energy of a structure is a sum of per-atom contributions::

    E = sum_i [ scale * e_i + mu(Z_i) ]

with ``e_i`` the ``0e`` output of a node-level SEGNN for atom i, ``mu(Z)`` fixed per-element
reference energies (a least-squares fit to the training energies) and ``scale`` a fixed energy
scale (the RMS of the training forces). Padding atoms are masked out, so a batch of structures
gives one energy per structure.

Forces come in two flavours (``head``):

* ``"conservative"``: ``F = -dE/dx`` by ``jax.grad`` with respect to the positions, which enter
  the network only through the edge vectors ``x_j - x_i + shift`` (periodic image shifts are
  constants of the neighbour list). Under periodic boundary conditions the stress is the strain
  derivative ``sigma = (1 / V) dE/d(epsilon)`` at zero strain, with positions and image shifts
  deformed by ``(1 + epsilon)`` per structure (ASE's sign convention);
* ``"direct"``: an equivariant ``1x1o`` output per atom, times ``scale`` (cheaper, not a
  gradient: energy is not conserved in MD and there is no stress).

Smoothness: molecular dynamics needs an energy that is smooth as atoms cross the cutoff. Every
message is weighted by a polynomial envelope ``u(r)`` that goes to zero with its first two
derivatives at the cutoff (:attr:`segnn_jax.SteerableGraphsTuple.edge_weights`), divided by the
average number of neighbours; the node attribute is ``sum_j u(r_ij) Y(r_ij) / n_avg`` (with
``l = 0`` set to 1), not a mean over a changing count; and the extra message features are a
Bessel radial basis times the envelope. Nothing else depends on which atoms are inside the
cutoff.

Inputs are ``jraph.GraphsTuple`` s as built by :func:`structure_graph`: nodes ``positions``
``[N, 3]`` and ``atomic_numbers`` ``[N]``, edges ``shifts`` ``[E, 3]`` (Cartesian image offsets of
the senders), globals ``cell`` ``[G, 3, 3]`` (needed for the stress only).

Shape letters: N atoms, E edges, G structures.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from segnn_jax.attributes import SteerableGraphsTuple, edge_attributes, edge_vectors
from segnn_jax.graph import edge_mask as graph_edge_mask
from segnn_jax.graph import make_graph, node_graph_index, node_mask
from segnn_jax.periodic import periodic_radius_graph
from segnn_jax.segnn import transform_with_jitted_init
from segnn_jax.tensor_product import differentiated_hybrid

__all__ = [
    "HEADS",
    "MAX_Z",
    "PotentialSpec",
    "bessel_basis",
    "edge_graph_index",
    "energy_function",
    "fit_element_energies",
    "make_potential",
    "polynomial_envelope",
    "predict",
    "structure_graph",
]

HEADS = ("conservative", "direct")
#: Atomic numbers the embedding knows (0 is never a real atom).
MAX_Z = 118


@dataclasses.dataclass(frozen=True)
class PotentialSpec:
    """Everything that defines a potential besides its parameters (JSON-serialisable).

    Attributes:
        model: the model section (see :mod:`segnn_jax.tasks.models`; ``task`` must be "node" and
            ``norm`` "none": a norm would couple the atoms of a structure, or of a batch).
        cutoff: radius of the neighbourhood (A).
        head: "conservative" (forces = -dE/dx) or "direct" (a 1x1o output per atom).
        embedding_dim: scalars of the learned embedding of the atomic number.
        num_radial: Bessel functions of the distance in every message.
        envelope_exponent: p of the polynomial envelope (smooth to second order at the cutoff).
        avg_num_neighbors: normalises the sum over neighbours (training average of sum_j u(r_ij)).
        energy_scale: eV per unit of network output (training RMS of the force components).
        element_energies: ``{Z: mu_Z}`` reference energy per element (eV).
    """

    model: Mapping[str, Any]
    cutoff: float
    head: str = "conservative"
    embedding_dim: int = 16
    num_radial: int = 8
    envelope_exponent: int = 5
    avg_num_neighbors: float = 1.0
    energy_scale: float = 1.0
    element_energies: Mapping[int, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if not (math.isfinite(self.cutoff) and self.cutoff > 0):
            raise ValueError(f"cutoff must be a positive number of Angstrom, got {self.cutoff!r}")
        for name in ("avg_num_neighbors", "energy_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.embedding_dim < 1 or self.num_radial < 1 or self.envelope_exponent < 2:
            raise ValueError("embedding_dim and num_radial must be >= 1 and envelope_exponent "
                             f">= 2, got {self.embedding_dim}, {self.num_radial}, "
                             f"{self.envelope_exponent}")
        model = dict(self.model)
        if model.get("task", "node") != "node" or model.get("norm", "none") not in (None, "none"):
            raise ValueError("a potential needs model.task='node' and model.norm='none' (per-atom "
                             f"energies of independent atoms), got task={model.get('task')!r}, "
                             f"norm={model.get('norm')!r}")
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "element_energies",
                           {int(z): float(e) for z, e in dict(self.element_energies).items()})

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["element_energies"] = {str(z): e for z, e in self.element_energies.items()}
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PotentialSpec:
        raw = dict(raw)
        raw["element_energies"] = {int(z): float(e)
                                   for z, e in dict(raw.get("element_energies", {})).items()}
        return cls(**raw)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Radial functions


def polynomial_envelope(r: jnp.ndarray, cutoff: float, p: int = 5) -> jnp.ndarray:
    """DimeNet's envelope ``u(r)``: 1 at r = 0, 0 with two vanishing derivatives at the cutoff,
    0 beyond it."""
    x = r / cutoff
    u = (1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1)
         - p * (p + 1) / 2 * x ** (p + 2))
    return jnp.where(x < 1.0, u, 0.0)


def bessel_basis(r: jnp.ndarray, cutoff: float, n: int) -> jnp.ndarray:
    """``sqrt(2 / c) sin(k pi r / c) / r`` for k = 1..n: ``[..., n]``; finite at r = 0 (padding)
    with a zero gradient there."""
    positive = r > 0
    safe_r = jnp.where(positive, r, 1.0)[..., None]
    k = jnp.arange(1, n + 1, dtype=r.dtype)
    values = math.sqrt(2.0 / cutoff) * jnp.sin(k * jnp.pi * safe_r / cutoff) / safe_r
    limit = math.sqrt(2.0 / cutoff) * k * jnp.pi / cutoff  # the r -> 0 limit
    return jnp.where(positive[..., None], values, limit)


def _safe_norm(vectors: jnp.ndarray) -> jnp.ndarray:
    squared = jnp.sum(vectors**2, axis=-1)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def edge_graph_index(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """``[E]`` the structure each edge belongs to (static shapes: works under ``jit``)."""
    n_edges = graph.senders.shape[0]
    return jnp.repeat(jnp.arange(graph.n_edge.shape[0]), graph.n_edge,
                      total_repeat_length=n_edges)


# --------------------------------------------------------------------------------------------------
# The network


def make_potential(spec: PotentialSpec) -> hk.TransformedWithState:
    """The Haiku network of a potential.

    ``forward(graph, vectors=None, edge_valid=None) -> (atom_energies [N], atom_vectors)``:

    * ``vectors``: ``[E, 3]`` edge vectors (default :func:`segnn_jax.attributes.edge_vectors` of
      the graph); pass them to differentiate through them or to use another displacement (JAX-MD);
    * ``edge_valid``: ``[E]`` bool, default the graph's edge mask (padding edges False);
    * ``atom_energies``: eV, zero for padding atoms;
    * ``atom_vectors``: ``[N, 3]`` the direct force head's output (eV/A), or None for the
      conservative head.

    Use :func:`predict` for energies, forces and stress. Its ``init`` is compiled
    (:func:`segnn_jax.transform_with_jitted_init`).
    """
    # Imported here: tasks.models imports training (config checks), which the library's core
    # modules do not need.
    from segnn_jax.tasks import models

    model_config = models.validate_model_config(spec.model)
    output_irreps = "1x0e+1x1o" if spec.head == "direct" else "1x0e"
    factory = models.create_model(model_config, output_irreps=output_irreps)
    lmax_attr = model_config["lmax_attr"]
    references = np.zeros(MAX_Z + 1, np.float64)
    for z, energy in spec.element_energies.items():
        references[z] = energy

    def forward(graph: jraph.GraphsTuple, vectors: jnp.ndarray | None = None,
                edge_valid: jnp.ndarray | None = None):
        graph = jax.tree.map(jnp.asarray, graph)
        positions = graph.nodes["positions"]
        n_nodes = positions.shape[0]
        dtype = positions.dtype
        if vectors is None:
            vectors = edge_vectors(graph)
        if edge_valid is None:
            edge_valid = graph_edge_mask(graph)
        distance = _safe_norm(vectors)
        envelope = polynomial_envelope(distance, spec.cutoff, spec.envelope_exponent)
        weights = jnp.where(edge_valid, envelope, 0.0) / spec.avg_num_neighbors  # [E]
        edge_attr = edge_attributes(vectors, lmax_attr, normalization="component")
        summed = jax.ops.segment_sum(edge_attr.array * weights[:, None], graph.receivers,
                                     num_segments=n_nodes)
        node_attr = e3nn.IrrepsArray(edge_attr.irreps, summed.at[:, 0].set(1.0))
        radial = bessel_basis(distance, spec.cutoff, spec.num_radial) * envelope[:, None]
        extra = e3nn.IrrepsArray(f"{spec.num_radial}x0e", radial.astype(dtype))
        numbers = graph.nodes["atomic_numbers"]
        embedded = hk.Embed(MAX_Z + 1, spec.embedding_dim, name="z_embedding")(numbers)
        features = e3nn.IrrepsArray(f"{spec.embedding_dim}x0e", embedded.astype(dtype))
        st_graph = SteerableGraphsTuple(graph, features, node_attr, edge_attr, extra,
                                        edge_weights=weights.astype(dtype))
        out = factory()(st_graph, False).array  # [N, 1] or [N, 1 + 3]
        real = node_mask(graph, n_nodes)
        reference = jnp.asarray(references, dtype)[numbers]
        atom_energies = jnp.where(real, spec.energy_scale * out[:, 0] + reference, 0.0)
        atom_vectors = None
        if spec.head == "direct":
            atom_vectors = jnp.where(real[:, None], spec.energy_scale * out[:, 1:4], 0.0)
        return atom_energies, atom_vectors

    return transform_with_jitted_init(forward)


def _deformed_vectors(graph: jraph.GraphsTuple, positions: jnp.ndarray,
                      strain: jnp.ndarray) -> jnp.ndarray:
    """Edge vectors after deforming positions and image shifts by ``1 + sym(strain)`` per
    structure (``strain`` ``[G, 3, 3]``)."""
    symmetric = 0.5 * (strain + jnp.swapaxes(strain, -1, -2))
    deformation = jnp.eye(3, dtype=positions.dtype) + symmetric  # [G, 3, 3]
    node_graph = node_graph_index(graph, positions.shape[0])
    moved = jnp.einsum("ni,nij->nj", positions, deformation[node_graph])
    vectors = moved[graph.senders] - moved[graph.receivers]
    edges = graph.edges if isinstance(graph.edges, dict) else {}
    if "shifts" in edges:
        shifts = edges["shifts"].astype(positions.dtype)
        vectors = vectors + jnp.einsum("ei,eij->ej", shifts,
                                       deformation[edge_graph_index(graph)])
    return vectors


def predict(model: hk.TransformedWithState, params: Any, model_state: Any,
            graph: jraph.GraphsTuple, *, head: str = "conservative",
            stress: bool = False) -> dict[str, jnp.ndarray]:
    """Energies, forces and (optionally) stress of a (padded) batch of structures. Jit-able.

    Args:
        model: from :func:`make_potential`.
        params, model_state: the model's parameters and (empty) state.
        graph: the batch (see the module docstring).
        head: the spec's head.
        stress: also the stress (conservative head; needs ``globals["cell"]``).

    Returns:
        ``energy`` ``[G]`` (eV, 0 for padding structures), ``forces`` ``[N, 3]`` (eV/A, 0 for
        padding atoms), ``atom_energies`` ``[N]`` and, with ``stress=True``, ``stress``
        ``[G, 3, 3]`` (eV/A^3; 0 for structures without a volume, e.g. padding).
    """
    graph = jax.tree.map(jnp.asarray, graph)
    positions = graph.nodes["positions"]
    n_graphs = graph.n_node.shape[0]
    node_graph = node_graph_index(graph, positions.shape[0])

    def energies(positions, strain):
        vectors = (edge_vectors(graph, positions) if strain is None
                   else _deformed_vectors(graph, positions, strain))
        (atom_energies, atom_vectors), _ = model.apply(params, model_state, None, graph, vectors)
        per_graph = jax.ops.segment_sum(atom_energies, node_graph, num_segments=n_graphs)
        return jnp.sum(per_graph), (per_graph, atom_energies, atom_vectors)

    if head == "direct":
        if stress:
            raise ValueError("the direct force head has no stress (it is not a gradient)")
        _, (per_graph, atom_energies, atom_vectors) = energies(positions, None)
        return {"energy": per_graph, "forces": atom_vectors, "atom_energies": atom_energies}
    if head != "conservative":
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    # Every product of the energy is differentiated (forces), so a "hybrid" model is traced
    # weights-first only, not also in its unused couple-first primal.
    with differentiated_hybrid():
        if not stress:
            grad, (per_graph, atom_energies, _) = jax.grad(energies, has_aux=True)(positions, None)
            return {"energy": per_graph, "forces": -grad, "atom_energies": atom_energies}
        strain = jnp.zeros((n_graphs, 3, 3), positions.dtype)
        (grad_x, grad_strain), (per_graph, atom_energies, _) = jax.grad(
            energies, argnums=(0, 1), has_aux=True)(positions, strain)
    cell = graph.globals["cell"].astype(positions.dtype)
    volume = jnp.abs(jnp.linalg.det(cell))
    safe_volume = jnp.where(volume > 0, volume, 1.0)
    sigma = jnp.where((volume > 0)[:, None, None], grad_strain / safe_volume[:, None, None], 0.0)
    return {"energy": per_graph, "forces": -grad_x, "atom_energies": atom_energies,
            "stress": sigma}


# --------------------------------------------------------------------------------------------------
# Host-side graphs


def structure_graph(positions: np.ndarray, atomic_numbers: Sequence[int], cell: np.ndarray,
                    pbc: Any, cutoff: float, *, dtype: Any = np.float32,
                    nodes: Mapping[str, np.ndarray] | None = None,
                    globals: Mapping[str, np.ndarray] | None = None,
                    ) -> jraph.GraphsTuple:
    """The radius graph of one structure (periodic along ``pbc``; :mod:`segnn_jax.periodic`).

    Returns:
        nodes ``positions`` ``[n, 3]`` (``dtype``), ``atomic_numbers`` ``[n]`` int32 and the given
        extra ``nodes``; edges ``shifts`` ``[E, 3]``; globals ``cell`` ``[1, 3, 3]`` plus the given
        ``globals``.
    """
    positions = np.asarray(positions, np.float64)
    cell = np.asarray(cell, np.float64).reshape(3, 3)
    edges = periodic_radius_graph(positions, cell, pbc, cutoff)
    return make_graph(
        positions.astype(dtype), edges.senders, edges.receivers,
        nodes={"atomic_numbers": np.asarray(atomic_numbers, np.int32), **dict(nodes or {})},
        edges={"shifts": edges.shifts_cartesian.astype(dtype)},
        globals={"cell": cell[None].astype(dtype), **dict(globals or {})})


def energy_function(model: hk.TransformedWithState, params: Any, model_state: Any
                    ) -> Callable[..., jnp.ndarray]:
    """``energy(graph, vectors, edge_valid) -> total energy`` (eV, real atoms) for other MD codes."""

    def energy(graph, vectors, edge_valid):
        (atom_energies, _), _ = model.apply(params, model_state, None, graph, vectors, edge_valid)
        return jnp.sum(atom_energies)

    return energy


def fit_element_energies(compositions: Sequence[Mapping[int, int]], energies: Sequence[float],
                         alpha: float = 1e-8) -> tuple[dict[int, float], np.ndarray]:
    """Least-squares per-element energies ``E ~ sum_Z n_Z mu_Z`` (no intercept; tiny ridge for
    elements that always come together).

    Returns:
        ``({Z: mu_Z}, predictions)`` (float64).
    """
    elements = sorted({int(z) for c in compositions for z in c})
    counts = np.zeros((len(compositions), len(elements)))
    index = {z: k for k, z in enumerate(elements)}
    for m, composition in enumerate(compositions):
        for z, n in composition.items():
            counts[m, index[int(z)]] = n
    y = np.asarray(energies, np.float64)
    lhs = counts.T @ counts + alpha * np.eye(len(elements))
    mu = np.linalg.solve(lhs, counts.T @ y)
    return {z: float(mu[index[z]]) for z in elements}, counts @ mu
