"""Steerable attributes from raw geometry: pure, jit-able, padding-safe functions.

Shape letters: N nodes, E edges.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import jraph

__all__ = [
    "SteerableGraphsTuple",
    "edge_attributes",
    "edge_vectors",
    "node_attributes",
    "pair_products",
    "safe_norm",
]


class SteerableGraphsTuple(NamedTuple):
    """What a SEGNN consumes: a graph (topology, sizes, padding) and its steerable inputs.

    Attributes:
        graph: the ``jraph.GraphsTuple`` (padded or not) the features belong to.
        node_features: ``[N, irreps_in]``.
        node_attributes: ``[N, irreps_attr]``, l = 0 component equal to 1.
        edge_attributes: ``[E, irreps_attr]``.
        additional_message_features: ``[E, k x 0e]`` invariants appended to every message, or None.
        edge_weights: ``[E]`` invariant factors multiplying every message before the sum over
            senders, or None (all 1). A smooth cutoff envelope here makes the network a smooth
            function of the positions as atoms cross the cutoff (interatomic potentials).
    """

    graph: jraph.GraphsTuple
    node_features: e3nn.IrrepsArray
    node_attributes: e3nn.IrrepsArray
    edge_attributes: e3nn.IrrepsArray
    additional_message_features: Optional[e3nn.IrrepsArray] = None
    edge_weights: Optional[jnp.ndarray] = None


def safe_norm(vectors: jnp.ndarray, axis: int = -1, keepdims: bool = False) -> jnp.ndarray:
    """Euclidean norm whose gradient is 0 (not NaN) at the zero vector (padding self-loops)."""
    squared = jnp.sum(vectors**2, axis=axis, keepdims=keepdims)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def edge_vectors(graph: jraph.GraphsTuple, positions: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """``x_j - x_i`` for every edge (sender j, receiver i), plus the periodic shift if the graph has one.

    Args:
        graph: with ``nodes["positions"]`` ``[N, 3]`` and optionally ``edges["shifts"]`` ``[E, 3]``.
        positions: overrides ``graph.nodes["positions"]`` (e.g. to differentiate with respect to them).

    Returns:
        ``[E, 3]``.
    """
    if positions is None:
        positions = graph.nodes["positions"]
    vectors = positions[graph.senders] - positions[graph.receivers]
    edges = graph.edges if isinstance(graph.edges, dict) else {}
    if "shifts" in edges:
        vectors = vectors + edges["shifts"]
    return vectors


def edge_attributes(vectors: jnp.ndarray, lmax: int, normalization: str = "integral") -> e3nn.IrrepsArray:
    """Spherical harmonics ``Y(x_j - x_i / |x_j - x_i|)`` up to ``lmax``: ``[E, sh(lmax)]``.

    Zero vectors (padding edges, coincident atoms) give finite values and gradients.

    Args:
        vectors: ``[E, 3]``.
        lmax: highest order.
        normalization: ``"integral"`` (N-body reference) or ``"component"`` (QM9, OC20 reference).
    """
    if normalization not in ("integral", "component", "norm"):
        raise ValueError(f"normalization must be 'integral', 'component' or 'norm', got {normalization!r}")
    return e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(lmax), vectors,
                                    normalize=True, normalization=normalization)


def node_attributes(
    edge_attr: e3nn.IrrepsArray,  # [E, sh]
    receivers: jnp.ndarray,  # [E]
    n_nodes: int,
    edge_mask: Optional[jnp.ndarray] = None,  # [E] bool
    physical_vectors: Sequence[jnp.ndarray] = (),  # each [N, 3]
    normalization: str = "integral",
) -> e3nn.IrrepsArray:
    """Mean of the incoming edge attributes, plus spherical harmonics of physical vectors.

    The l = 0 component is then set to 1; a node without incoming edges gets ``(1, 0, ...)`` plus
    the harmonics of its physical vectors.

    Args:
        edge_attr: ``[E, sh]``.
        receivers: ``[E]``.
        n_nodes: N.
        edge_mask: ``[E]``, False for padding edges (excluded from the mean).
        physical_vectors: velocities, forces, ...: each ``[N, 3]``, harmonics with the same irreps.
        normalization: of the physical vectors' harmonics.

    Returns:
        ``[N, sh]``.
    """
    weights = jnp.ones(receivers.shape, edge_attr.dtype)
    if edge_mask is not None:
        weights = weights * edge_mask.astype(edge_attr.dtype)
    summed = jax.ops.segment_sum(edge_attr.array * weights[:, None], receivers, num_segments=n_nodes)
    counts = jax.ops.segment_sum(weights, receivers, num_segments=n_nodes)
    attr = summed / jnp.maximum(counts, 1.0)[:, None]
    for vectors in physical_vectors:
        attr = attr + e3nn.spherical_harmonics(edge_attr.irreps, vectors, normalize=True,
                                               normalization=normalization).array
    attr = attr.at[:, 0].set(1.0)
    return e3nn.IrrepsArray(edge_attr.irreps, attr)


def pair_products(values: jnp.ndarray, graph: jraph.GraphsTuple) -> jnp.ndarray:
    """``v_i v_j`` for every edge (e.g. charge or mass products): ``[E, ...]`` from ``[N, ...]``."""
    return values[graph.senders] * values[graph.receivers]
