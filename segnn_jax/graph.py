"""Graphs on the host: builders, batching, padding to fixed budgets, and masks.

A graph is a :class:`jraph.GraphsTuple` whose ``nodes`` is a dict of arrays that always holds
``"positions"`` (``[n_nodes, 3]``), whose ``edges`` is a dict (possibly empty; periodic graphs put
their Cartesian image shifts under ``"shifts"``) and whose ``globals`` is a dict. ``senders`` are
the sources j and ``receivers`` the destinations i of the messages m_ij, so the relative vector of an
edge is ``positions[senders] - positions[receivers]`` (plus the shift of a periodic edge).

Padding follows jraph's layout: the padding nodes and edges belong to extra graphs at the end of
the batch, and padding edges are self-loops on the first padding node. :func:`pad_graph` records
which graphs are real in ``globals["graph_mask"]`` (a graph without that entry is all real). Every
model reduction and every loss must therefore use :func:`node_mask`, :func:`edge_mask` or :func:`graph_mask`.

Shape letters: N nodes, E edges, G graphs.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np

__all__ = [
    "InvalidPositionsError",
    "PaddingBudgetError",
    "batch_graphs",
    "edge_mask",
    "fully_connected_edges",
    "graph_mask",
    "knn_graph_edges",
    "make_graph",
    "node_graph_index",
    "node_mask",
    "pad_graph",
    "radius_graph_edges",
    "unbatch_graphs",
    "unpad_graph",
    "validate_positions",
]


class InvalidPositionsError(ValueError):
    """Positions of the wrong shape, non-finite, or (where forbidden) coincident."""


class PaddingBudgetError(ValueError):
    """A graph or batch does not fit into the requested padding budget."""


def validate_positions(positions: np.ndarray, *, allow_coincident: bool = True) -> np.ndarray:
    """Checks raw positions on the host and returns them as a float array.

    The model itself never raises on data (it runs under ``jit``); call this where data enter.

    Args:
        positions: ``[N, 3]`` Cartesian coordinates.
        allow_coincident: if False, two atoms at the same point raise.

    Returns:
        The positions as a NumPy floating array of shape ``[N, 3]``.

    Raises:
        InvalidPositionsError: wrong shape, NaN or infinite entries, or coincident points.

    >>> validate_positions(np.zeros((2, 3)), allow_coincident=False)
    Traceback (most recent call last):
    ...
    segnn_jax.graph.InvalidPositionsError: nodes 0 and 1 are at the same position (distance 0.0)
    """
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[-1] != 3:
        raise InvalidPositionsError(
            f"positions must have shape [n_nodes, 3], got {positions.shape}")
    if not np.issubdtype(positions.dtype, np.floating):
        positions = positions.astype(np.float64)
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        raise InvalidPositionsError(
            f"{int(bad.sum())} node(s) have non-finite positions, first at node {int(np.argmax(bad))}")
    if not allow_coincident and len(positions) > 1:
        senders, receivers = radius_graph_edges(positions, 1e-8)
        if len(senders):
            i, j = sorted((int(receivers[0]), int(senders[0])))
            dist = float(np.sqrt(((positions[i] - positions[j]) ** 2).sum()))
            raise InvalidPositionsError(
                f"nodes {i} and {j} are at the same position (distance {dist})")
    return positions


def fully_connected_edges(n_nodes: int) -> Tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (j, i) with j != i, as ``(senders, receivers)`` of shape ``[N (N - 1)]``."""
    receivers, senders = np.nonzero(~np.eye(n_nodes, dtype=bool))
    return senders.astype(np.int32), receivers.astype(np.int32)


def _pairwise_squared_distances(positions: np.ndarray) -> np.ndarray:
    diff = positions[None, :, :] - positions[:, None, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def radius_graph_edges(positions: np.ndarray, cutoff: float) -> Tuple[np.ndarray, np.ndarray]:
    """Edges between distinct nodes closer than ``cutoff`` (strictly), no periodic images.

    Uses a cell list so that large point clouds cost O(N); the edges come sorted by receiver, then
    sender.

    Args:
        positions: ``[N, 3]``.
        cutoff: radius, > 0.

    Returns:
        ``(senders, receivers)``, each ``[E]`` int32.
    """
    positions = _finite_positions(positions)
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be positive and finite, got {cutoff}")
    n = len(positions)
    if n < 2:
        empty = np.zeros((0,), np.int32)
        return empty, empty
    if n <= 256:
        within = _pairwise_squared_distances(positions) < cutoff**2
        np.fill_diagonal(within, False)
        receivers, senders = np.nonzero(within)
        return senders.astype(np.int32), receivers.astype(np.int32)
    return _cell_list_radius_edges(positions, cutoff)


def _finite_positions(positions: np.ndarray) -> np.ndarray:
    """``[N, 3]`` float64 positions; raises on another shape or on NaN/inf (edges would be wrong)."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[-1] != 3:
        raise InvalidPositionsError(
            f"positions must have shape [n_nodes, 3], got {positions.shape}")
    if not np.isfinite(positions).all():
        raise InvalidPositionsError("positions contain NaN or infinite values")
    return positions


def _cell_list_radius_edges(positions: np.ndarray, cutoff: float) -> Tuple[np.ndarray, np.ndarray]:
    grid = np.floor((positions - positions.min(axis=0)) / cutoff)
    if grid.max() >= 2.0**52:
        # Cell indices beyond float64's integer range cannot tell neighbouring cells apart.
        return _chunked_radius_edges(positions, cutoff)
    # Per axis, only the occupied cell coordinates are numbered (ranks), so the key space is at
    # most N^3 however far apart the points are; a neighbour coordinate that no point occupies
    # gets the key -1, which matches no point.
    axes = [np.unique(grid[:, a], return_inverse=True) for a in range(3)]
    values = [v for v, _ in axes]
    cells = np.stack([inv.reshape(-1) for _, inv in axes], axis=1).astype(np.int64)
    dims = np.array([len(v) for v in values], np.int64)
    keys = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    senders, receivers = [], []
    offsets = np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij")).reshape(3, -1).T
    for offset in offsets:
        neighbour_cells = np.empty_like(cells)
        inside = np.ones(len(positions), bool)
        for a in range(3):
            target = grid[:, a] + offset[a]
            rank = np.minimum(np.searchsorted(values[a], target), len(values[a]) - 1)
            inside &= values[a][rank] == target
            neighbour_cells[:, a] = rank
        neighbour_keys = (neighbour_cells[:, 0] * dims[1] + neighbour_cells[:, 1]) * dims[2] + neighbour_cells[:, 2]
        start = np.searchsorted(sorted_keys, neighbour_keys, side="left")
        stop = np.searchsorted(sorted_keys, neighbour_keys, side="right")
        counts = np.where(inside, stop - start, 0)
        receiver = np.repeat(np.arange(len(positions)), counts)
        first = np.repeat(start, counts)
        rank = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        sender = order[first + rank]
        diff = positions[sender] - positions[receiver]
        keep = (np.einsum("ij,ij->i", diff, diff) < cutoff**2) & (sender != receiver)
        senders.append(sender[keep])
        receivers.append(receiver[keep])
    senders = np.concatenate(senders)
    receivers = np.concatenate(receivers)
    order = np.lexsort((senders, receivers))
    return senders[order].astype(np.int32), receivers[order].astype(np.int32)


def _chunked_radius_edges(positions: np.ndarray, cutoff: float,
                          block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs search in blocks of receivers (memory ``block * N``), for extreme spreads."""
    senders, receivers = [], []
    for start in range(0, len(positions), block):
        diff = positions[None, :, :] - positions[start:start + block, None, :]
        within = np.einsum("ijk,ijk->ij", diff, diff) < cutoff**2
        receiver, sender = np.nonzero(within)
        receiver += start
        keep = receiver != sender
        senders.append(sender[keep])
        receivers.append(receiver[keep])
    return (np.concatenate(senders).astype(np.int32), np.concatenate(receivers).astype(np.int32))


def knn_graph_edges(positions: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Each node receives from its ``k`` nearest other nodes (ties broken by index).

    Returns:
        ``(senders, receivers)``, each ``[N k]`` int32, grouped by receiver.
    """
    positions = _finite_positions(positions)
    n = len(positions)
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, n_nodes - 1] = [1, {n - 1}], got {k}")
    with np.errstate(over="ignore"):
        d2 = _pairwise_squared_distances(positions)
    # NaN sorts after every number, inf included: a node is never its own neighbour, even when
    # huge coordinates make the other distances overflow to inf.
    np.fill_diagonal(d2, np.nan)
    senders = np.argsort(d2, axis=1, kind="stable")[:, :k]
    receivers = np.repeat(np.arange(n), k)
    return senders.reshape(-1).astype(np.int32), receivers.astype(np.int32)


def make_graph(
    positions: np.ndarray,
    senders: np.ndarray,
    receivers: np.ndarray,
    *,
    nodes: Optional[Mapping[str, np.ndarray]] = None,
    edges: Optional[Mapping[str, np.ndarray]] = None,
    globals: Optional[Mapping[str, np.ndarray]] = None,  # noqa: A002 (jraph's field name)
) -> jraph.GraphsTuple:
    """One graph as a ``GraphsTuple`` with dict-valued nodes, edges and globals.

    Args:
        positions: ``[N, 3]``.
        senders, receivers: ``[E]`` node indices in ``[0, N)``.
        nodes: further per-node arrays, each with leading dimension N.
        edges: per-edge arrays, each with leading dimension E.
        globals: per-graph arrays, each with leading dimension 1.
    """
    positions = validate_positions(positions)
    n, e = len(positions), len(senders)
    senders = np.asarray(senders, dtype=np.int32)
    receivers = np.asarray(receivers, dtype=np.int32)
    if senders.shape != (e,) or receivers.shape != (e,):
        raise ValueError(f"senders and receivers must both have shape [{e}], got "
                         f"{senders.shape} and {receivers.shape}")
    if e and (min(senders.min(), receivers.min()) < 0 or max(senders.max(), receivers.max()) >= n):
        raise ValueError(f"edge indices must lie in [0, {n}), got senders in "
                         f"[{senders.min()}, {senders.max()}], receivers in [{receivers.min()}, {receivers.max()}]")
    node_dict = {"positions": positions}
    for name, value in (nodes or {}).items():
        value = np.asarray(value)
        if value.shape[:1] != (n,):
            raise ValueError(f"node field {name!r} must have leading dimension {n}, got {value.shape}")
        node_dict[name] = value
    edge_dict = {}
    for name, value in (edges or {}).items():
        value = np.asarray(value)
        if value.shape[:1] != (e,):
            raise ValueError(f"edge field {name!r} must have leading dimension {e}, got {value.shape}")
        edge_dict[name] = value
    global_dict = {}
    for name, value in (globals or {}).items():
        value = np.asarray(value)
        if value.shape[:1] != (1,):
            value = value[None]
        global_dict[name] = value
    return jraph.GraphsTuple(
        nodes=node_dict, edges=edge_dict, globals=global_dict,
        senders=senders, receivers=receivers,
        n_node=np.array([n], np.int32), n_edge=np.array([e], np.int32),
    )


def batch_graphs(graphs: Sequence[jraph.GraphsTuple]) -> jraph.GraphsTuple:
    """Concatenates graphs into one ``GraphsTuple`` (NumPy, host side)."""
    if not graphs:
        raise ValueError("cannot batch an empty list of graphs")
    return jraph.batch_np(list(graphs))


def unbatch_graphs(graph: jraph.GraphsTuple) -> list:
    """Splits a batch back into its graphs (NumPy, host side)."""
    return jraph.unbatch_np(graph)


def _graph_sizes(graph: jraph.GraphsTuple) -> Tuple[int, int, int]:
    return int(np.sum(graph.n_node)), int(np.sum(graph.n_edge)), int(len(graph.n_node))


GRAPH_MASK_KEY = "graph_mask"


def pad_graph(graph: jraph.GraphsTuple, n_node: int, n_edge: int, n_graph: int) -> jraph.GraphsTuple:
    """Pads a (batched) graph to exactly ``n_node`` nodes, ``n_edge`` edges and ``n_graph`` graphs.

    At least one padding graph is always added, so ``n_graph`` must exceed the number of real graphs
    and ``n_node`` the number of real nodes (the padding edges need a padding node to sit on). The
    padded graph records which graphs are real in ``globals["graph_mask"]``, so that real graphs
    without nodes stay distinguishable from padding.

    Raises:
        PaddingBudgetError: the graph does not fit; the message names the budget that is too small.
    """
    nodes, edges, graphs = _graph_sizes(graph)
    problems = []
    if nodes + 1 > n_node:
        problems.append(f"n_node budget {n_node} < {nodes} real nodes + 1 padding node")
    if edges > n_edge:
        problems.append(f"n_edge budget {n_edge} < {edges} real edges")
    if graphs + 1 > n_graph:
        problems.append(f"n_graph budget {n_graph} < {graphs} real graphs + 1 padding graph")
    if problems:
        raise PaddingBudgetError("graph does not fit the padding budget: " + "; ".join(problems))
    real = np.asarray(graph_mask(graph))
    globals_ = dict(graph.globals) if isinstance(graph.globals, dict) else {}
    globals_.pop(GRAPH_MASK_KEY, None)
    padded = jraph.pad_with_graphs(graph._replace(globals=globals_), n_node=n_node, n_edge=n_edge,
                                   n_graph=n_graph)
    mask = np.zeros((n_graph,), bool)
    mask[:graphs] = real
    return padded._replace(globals={**padded.globals, GRAPH_MASK_KEY: mask})


def graph_mask(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """``[G]`` bool, True for real graphs: ``globals["graph_mask"]`` if padded, else all True."""
    if isinstance(graph.globals, dict) and GRAPH_MASK_KEY in graph.globals:
        return graph.globals[GRAPH_MASK_KEY]
    return jnp.ones(graph.n_node.shape, bool)


def node_mask(graph: jraph.GraphsTuple, n_nodes: Optional[int] = None) -> jnp.ndarray:
    """``[N]`` bool, True for nodes of real graphs."""
    return jnp.asarray(graph_mask(graph))[node_graph_index(graph, n_nodes)]


def edge_mask(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """``[E]`` bool, True for edges of real graphs."""
    n_edges = graph.senders.shape[0]
    index = jnp.repeat(jnp.arange(graph.n_edge.shape[0]), graph.n_edge, total_repeat_length=n_edges)
    return jnp.asarray(graph_mask(graph))[index]


def node_graph_index(graph: jraph.GraphsTuple, n_nodes: Optional[int] = None) -> jnp.ndarray:
    """``[N]`` int, the graph each node belongs to (works under ``jit``: shapes are static).

    Args:
        graph: the graph.
        n_nodes: N, if ``graph.nodes`` holds no arrays to read it from.
    """
    n_graph = graph.n_node.shape[0]
    if n_nodes is None:
        n_nodes = jax.tree_util.tree_leaves(graph.nodes)[0].shape[0]
    return jnp.repeat(jnp.arange(n_graph), graph.n_node, total_repeat_length=n_nodes)


def unpad_graph(graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
    """Removes the padding added by :func:`pad_graph` (host side)."""
    real = np.asarray(graph_mask(graph))
    n_graphs = int(real.sum())
    if not real[:n_graphs].all():
        raise ValueError("padding graphs must come after the real graphs")
    n_nodes = int(np.sum(graph.n_node[:n_graphs]))
    n_edges = int(np.sum(graph.n_edge[:n_graphs]))
    take = lambda tree, n: jax.tree_util.tree_map(lambda x: np.asarray(x)[:n], tree)
    globals_ = {k: v for k, v in (graph.globals or {}).items() if k != GRAPH_MASK_KEY}
    return jraph.GraphsTuple(
        nodes=take(graph.nodes, n_nodes), edges=take(graph.edges, n_edges),
        senders=np.asarray(graph.senders)[:n_edges], receivers=np.asarray(graph.receivers)[:n_edges],
        n_node=np.asarray(graph.n_node)[:n_graphs], n_edge=np.asarray(graph.n_edge)[:n_graphs],
        globals=take(globals_, n_graphs))
