"""Host-side batching: greedy packing under budgets, a few padded shapes, prefetching.

A jitted step recompiles for every new input shape, so batches are packed on the host (NumPy) under
a node/edge/graph budget and padded to one of a handful of *bucketed* shapes (fractions of the
budget). Over an epoch at most ``len(buckets)`` distinct shapes reach the device (4 by default),
and :attr:`GraphLoader.buckets` lists them all beforehand.

Typical use::

    budget = estimate_budget(train_graphs, batch_size=128)
    loader = GraphLoader(train_graphs, 128, budget=budget, shuffle=True, seed=0)
    for epoch in range(start_epoch, n_epochs):
        for batch in prefetch(loader.epoch_batches(epoch), transfer=jax.device_put):
            state, metrics = train_step(state, batch)

The data is stored once, column by column (every node field of every graph in one array), so a batch
is a few vectorised gathers, not a Python loop over graphs; packing 10,000 molecule-sized graphs
takes a fraction of a second.

Shape letters: G graphs (of the data set or a batch), N nodes, E edges, D devices.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import queue
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jraph
import numpy as np

from segnn_jax.graph import GRAPH_MASK_KEY, PaddingBudgetError

__all__ = [
    "BatchBudget",
    "GraphLoader",
    "InconsistentGraphsError",
    "Prefetcher",
    "bucket_budgets",
    "estimate_budget",
    "estimate_budget_from_sizes",
    "graph_sizes",
    "prefetch",
]

DEFAULT_BUCKETS = (0.25, 0.5, 0.75, 1.0)


class InconsistentGraphsError(ValueError):
    """The graphs given to a loader do not share one structure (fields, trailing shapes, dtypes)."""


@dataclasses.dataclass(frozen=True)
class BatchBudget:
    """Sizes a padded batch has: ``n_node`` nodes, ``n_edge`` edges and ``n_graph`` graphs.

    These count the padding, which always takes at least one node and one graph (jraph's
    convention), so a budget holds at most ``n_node - 1`` real nodes and ``n_graph - 1`` real
    graphs.
    """

    n_node: int
    n_edge: int
    n_graph: int

    def __post_init__(self):
        for name, minimum in (("n_node", 2), ("n_edge", 0), ("n_graph", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"BatchBudget.{name} must be an int, got {value!r}")
            if value < minimum:
                raise ValueError(f"BatchBudget.{name} must be >= {minimum}, got {value}")
            object.__setattr__(self, name, int(value))

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(n_node, n_edge, n_graph)``."""
        return (self.n_node, self.n_edge, self.n_graph)


def graph_sizes(graphs: Sequence[jraph.GraphsTuple]) -> Tuple[np.ndarray, np.ndarray]:
    """Nodes and edges of each single graph, as two ``[G]`` int64 arrays.

    Raises:
        ValueError: an element is not a single graph (``len(n_node) != 1``).
    """
    n_node = np.empty(len(graphs), np.int64)
    n_edge = np.empty(len(graphs), np.int64)
    for index, graph in enumerate(graphs):
        if np.shape(graph.n_node) != (1,):
            raise ValueError(f"graph {index} is not a single graph: n_node = {graph.n_node}")
        n_node[index] = graph.n_node[0]
        n_edge[index] = graph.n_edge[0]
    return n_node, n_edge


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def estimate_budget_from_sizes(
    n_node: np.ndarray,
    n_edge: np.ndarray,
    batch_size: int,
    *,
    sigmas: Optional[float] = 3.0,
    round_to: int = 8,
) -> BatchBudget:
    """A budget for batches of ``batch_size`` graphs drawn from graphs of the given sizes.

    ``n_graph = batch_size + 1`` (one padding graph). For nodes and edges separately, the sum over
    ``batch_size`` randomly drawn graphs has mean ``B mu`` and standard deviation ``sqrt(B) sigma``
    (``mu``, ``sigma`` over the data set); the budget is ``B mu + sigmas sqrt(B) sigma`` (plus the
    padding node), so with the default 3 about one random batch in 700 exceeds it and is closed
    early by the greedy packer with fewer graphs. That wastes far less padding than the worst case
    (the ``B`` largest graphs: about 60 % more nodes than the mean for QM9 at B = 128). With
    ``sigmas=None`` the worst case is used and every batch holds exactly ``batch_size`` graphs.
    Either way the budget is capped by the worst case, is at least the largest single graph, and is
    rounded up to a multiple of ``round_to``.

    Args:
        n_node, n_edge: ``[G]`` sizes of the graphs (e.g. from :func:`graph_sizes`).
        batch_size: graphs per batch, >= 1.
        sigmas: headroom in standard deviations of the batch sum, >= 0; None for the worst case.
        round_to: round node and edge budgets up to a multiple of this, >= 1.

    Returns:
        The budget.

    >>> estimate_budget_from_sizes(np.array([3, 5, 4]), np.array([6, 20, 12]), 2, sigmas=None,
    ...                            round_to=1)
    BatchBudget(n_node=10, n_edge=32, n_graph=3)
    """
    n_node = np.asarray(n_node, np.int64)
    n_edge = np.asarray(n_edge, np.int64)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if n_node.ndim != 1 or n_node.shape != n_edge.shape or len(n_node) == 0:
        raise ValueError(f"n_node and n_edge must be non-empty [G] arrays of equal length, got "
                         f"shapes {n_node.shape} and {n_edge.shape}")
    if sigmas is not None and not sigmas >= 0:
        raise ValueError(f"sigmas must be >= 0 or None, got {sigmas}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    size = min(int(batch_size), len(n_node))

    def bound(sizes: np.ndarray) -> float:
        worst = float(np.sort(sizes)[-size:].sum())
        if sigmas is None:
            return worst
        typical = size * sizes.mean() + sigmas * math.sqrt(size) * sizes.std()
        return max(min(typical, worst), float(sizes.max()))

    return BatchBudget(
        n_node=_round_up(math.ceil(bound(n_node)) + 1, round_to),
        n_edge=_round_up(math.ceil(bound(n_edge)), round_to),
        n_graph=int(batch_size) + 1,
    )


def estimate_budget(
    graphs: Sequence[jraph.GraphsTuple],
    batch_size: int,
    *,
    sigmas: Optional[float] = 3.0,
    round_to: int = 8,
) -> BatchBudget:
    """A budget derived from the (training) graphs; see :func:`estimate_budget_from_sizes`."""
    n_node, n_edge = graph_sizes(graphs)
    return estimate_budget_from_sizes(n_node, n_edge, batch_size, sigmas=sigmas, round_to=round_to)


def bucket_budgets(budget: BatchBudget,
                   buckets: Sequence[float] = DEFAULT_BUCKETS) -> Tuple[BatchBudget, ...]:
    """The padded shapes a loader may produce: node and edge budgets scaled by each fraction.

    A batch takes the smallest bucket it fits, so a nearly full batch is padded to the full budget
    and a small last batch to a small shape. ``n_graph`` is the same for all buckets (graphs are
    cheap). The full budget is always the last bucket.

    Args:
        budget: the full budget.
        buckets: increasing fractions in (0, 1].

    Returns:
        Distinct budgets, increasing; at most ``len(buckets) + 1`` (the full one is added if
        absent).

    >>> [b.shape for b in bucket_budgets(BatchBudget(101, 400, 9), (0.5, 1.0))]
    [(51, 200, 9), (101, 400, 9)]
    """
    fractions = [float(f) for f in buckets]
    if not fractions or any(not 0 < f <= 1 for f in fractions) \
            or any(a >= b for a, b in zip(fractions, fractions[1:])):
        raise ValueError(f"buckets must be strictly increasing fractions in (0, 1], got {buckets}")
    shapes = []
    for fraction in fractions + [1.0]:
        shape = BatchBudget(max(2, math.ceil(fraction * budget.n_node)),
                            math.ceil(fraction * budget.n_edge), budget.n_graph)
        if shape not in shapes:
            shapes.append(shape)
    return tuple(shapes)


def _structure_signature(tree: Any) -> Tuple[Any, List[np.ndarray], Tuple]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [np.asarray(leaf) for leaf in leaves]
    return treedef, leaves, tuple((leaf.shape[1:], leaf.dtype) for leaf in leaves)


class _Columns:
    """One part of a graph (nodes, edges or globals), all graphs concatenated leaf by leaf."""

    def __init__(self, name: str, trees: Sequence[Any], counts: np.ndarray):
        treedef, first_leaves, signature = _structure_signature(trees[0])
        per_leaf = [[] for _ in first_leaves]
        for index, tree in enumerate(trees):
            this_treedef, leaves, this_signature = _structure_signature(tree)
            if this_treedef != treedef or this_signature != signature:
                raise InconsistentGraphsError(
                    f"graph {index} has {name} {this_treedef} with (trailing shape, dtype) "
                    f"{this_signature}, but graph 0 has {treedef} with {signature}")
            for slot, leaf in zip(per_leaf, leaves):
                if leaf.ndim == 0 or leaf.shape[0] != counts[index]:
                    raise InconsistentGraphsError(
                        f"graph {index}: a {name} field has shape {leaf.shape}, expected leading "
                        f"dimension {counts[index]}")
                slot.append(leaf)
        self.treedef = treedef
        self.leaves = [np.concatenate(slot) for slot in per_leaf]

    def allocate(self, lead: Tuple[int, ...]) -> List[np.ndarray]:
        """Zero arrays of shape ``lead + trailing`` for every leaf (``lead`` ends with the rows)."""
        return [np.zeros(lead + leaf.shape[1:], leaf.dtype) for leaf in self.leaves]

    def fill(self, arrays: List[np.ndarray], slot: Tuple[int, ...], index: np.ndarray) -> None:
        """Writes rows ``index`` of every leaf to the first rows of ``arrays[...][slot]``."""
        for out, leaf in zip(arrays, self.leaves):
            out[slot][:len(index)] = leaf[index]

    def unflatten(self, arrays: List[np.ndarray]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, arrays)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class GraphLoader:
    """Packs graphs into padded batches with a bounded number of shapes, epoch by epoch.

    Packing is greedy in data order (shuffled per epoch if ``shuffle``): graphs join the current
    batch until it holds ``batch_size`` graphs or the next graph would exceed the budget. Each batch
    is then padded (jraph convention: padding graphs at the end) to the smallest of the
    :func:`bucket_budgets` it fits, so an epoch produces at most ``len(loader.buckets)`` shapes.
    Every graph appears exactly once per epoch (unless ``drop_remainder``). As
    :func:`segnn_jax.graph.pad_graph` does, the batch records its real graphs in
    ``globals["graph_mask"]`` (``[G]`` bool), from which the masks of :mod:`segnn_jax.graph` derive
    the real nodes and edges.

    The order is a pure function of ``(seed, epoch)``: ``epoch_batches(epoch, start=k)`` gives, in
    a resumed run, exactly the batches an uninterrupted run would have seen from step ``k`` of that
    epoch. Iterating the loader itself yields the batches of ``loader.epoch`` (see
    :meth:`set_epoch`); it does not advance the epoch.

    With ``n_devices = D`` (an int, also 1) every leaf gets a leading device axis ``[D, ...]``: one
    step is D consecutive per-device batches, each padded on its own to the same (largest needed)
    bucket. At the end of an epoch missing slots are filled with all-padding batches, whose graphs
    are all masked out. ``batch_size`` and the budget are per device. Because a step is D
    consecutive batches of the same packing, the data order does not depend on D.

    Args:
        graphs: unpadded single graphs (``len(n_node) == 1``) sharing one structure: same
            node/edge/global fields (globals a dict), trailing shapes and dtypes.
        batch_size: at most this many real graphs per (per-device) batch.
        budget: padded size of a batch; by default :func:`estimate_budget` of ``graphs``. Must hold
            the largest graph, and ``n_graph - 1`` further limits the graphs per batch.
        shuffle: reshuffle every epoch; otherwise keep the given order (evaluation).
        seed: shuffling seed, >= 0.
        drop_remainder: drop the last step of an epoch when it is not full (its last batch holds
            fewer than ``batch_size`` graphs or a device slot is filler). Never for evaluation.
        n_devices: None for plain batches, or the size D of a leading device axis.
        buckets: increasing fractions of the budget to pad to (see :func:`bucket_budgets`).

    Raises:
        PaddingBudgetError: a graph does not fit the budget (the message names the graph).
        InconsistentGraphsError: the graphs do not share one structure, or have bad edge indices.
        ValueError: bad arguments.

    Example:
        >>> from segnn_jax.graph import make_graph
        >>> graphs = [make_graph(np.eye(3) * (i + 1), [0, 1], [1, 2], globals={"id": [i]})
        ...           for i in range(5)]
        >>> loader = GraphLoader(graphs, 2, budget=BatchBudget(8, 8, 3))
        >>> [batch.globals["id"].tolist() for batch in loader]
        [[0, 1, 0], [2, 3, 0], [4, 0, 0]]
        >>> batch = next(iter(loader))
        >>> batch.globals["graph_mask"], batch.n_node
        (array([ True,  True, False]), array([3, 3, 2], dtype=int32))
        >>> sorted(loader.shapes_seen)
        [(4, 4, 3), (8, 8, 3)]
    """

    def __init__(
        self,
        graphs: Sequence[jraph.GraphsTuple],
        batch_size: int,
        *,
        budget: Optional[BatchBudget] = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_remainder: bool = False,
        n_devices: Optional[int] = None,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ):
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.n_devices = None if n_devices is None else _check_int("n_devices", n_devices, 1)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        if len(graphs) == 0:
            raise ValueError("GraphLoader needs at least one graph")
        n_node, n_edge = graph_sizes(graphs)
        if budget is None:
            budget = estimate_budget_from_sizes(n_node, n_edge, self.batch_size)
        elif not isinstance(budget, BatchBudget):
            raise TypeError(f"budget must be a BatchBudget, got {type(budget).__name__}")
        _check_fits(n_node, n_edge, budget)
        self.budget = budget
        self.buckets = bucket_budgets(budget, buckets)
        self._bucket_nodes = np.array([b.n_node for b in self.buckets])
        self._bucket_edges = np.array([b.n_edge for b in self.buckets])
        self._max_graphs = min(self.batch_size, budget.n_graph - 1)

        self._n_node, self._n_edge = n_node, n_edge
        self._node_offsets = np.concatenate([[0], np.cumsum(n_node)])
        self._edge_offsets = np.concatenate([[0], np.cumsum(n_edge)])
        self._nodes = _Columns("nodes", [g.nodes for g in graphs], n_node)
        self._edges = _Columns("edges", [g.edges for g in graphs], n_edge)
        self._globals = _Columns("globals", [_plain_globals(g, i) for i, g in enumerate(graphs)],
                                 np.ones_like(n_node))
        if not self._nodes.leaves:
            raise InconsistentGraphsError("graphs need at least one node field (e.g. positions)")
        self._senders = np.concatenate([np.asarray(g.senders, np.int32) for g in graphs])
        self._receivers = np.concatenate([np.asarray(g.receivers, np.int32) for g in graphs])
        self._check_edge_indices()

        self.epoch = 0
        self.shapes_seen: set = set()
        self._plans: "collections.OrderedDict[int, Tuple[List[Tuple[np.ndarray, ...]], np.ndarray]]"
        self._plans = collections.OrderedDict()

    def _check_edge_indices(self) -> None:
        n_edges = self._edge_offsets[-1]
        if len(self._senders) != n_edges or len(self._receivers) != n_edges:
            raise InconsistentGraphsError(
                f"senders/receivers hold {len(self._senders)}/{len(self._receivers)} entries, but "
                f"n_edge sums to {self._edge_offsets[-1]}")
        limit = np.repeat(self._n_node, self._n_edge)
        bad = (self._senders < 0) | (self._senders >= limit) \
            | (self._receivers < 0) | (self._receivers >= limit)
        if bad.any():
            edge = int(np.argmax(bad))
            index = int(np.searchsorted(self._edge_offsets, edge, side="right") - 1)
            raise InconsistentGraphsError(
                f"graph {index} has an edge with sender/receiver outside "
                f"[0, {self._n_node[index]})")

    @property
    def num_graphs(self) -> int:
        """Graphs in the data set (each appears once per epoch)."""
        return len(self._n_node)

    @property
    def num_nodes(self) -> int:
        return int(self._node_offsets[-1])

    @property
    def num_edges(self) -> int:
        return int(self._edge_offsets[-1])

    @property
    def graphs_per_step(self) -> int:
        """The most real graphs one step can hold (over all devices)."""
        return self._max_graphs * (self.n_devices or 1)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch that iterating the loader (and ``len``) refers to."""
        self.epoch = _check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        """Steps in the current epoch (exact; greedy packing depends on the shuffled order)."""
        return self.num_steps(self.epoch)

    def num_steps(self, epoch: int) -> int:
        """Steps (batches, or device-stacked batches) in ``epoch``."""
        return len(self._plan(epoch)[0])

    def epoch_plan(self, epoch: int) -> List[Tuple[np.ndarray, ...]]:
        """The graph indices of every step of ``epoch``: one ``[G_b]`` array per device slot.

        Without a device axis each step has one slot; filler slots are empty arrays. Use it to map
        predictions back to the input graphs.
        """
        return list(self._plan(epoch)[0])

    def shapes(self, epoch: int) -> Dict[Tuple[int, int, int], int]:
        """How many steps of ``epoch`` have each padded ``(n_node, n_edge, n_graph)``."""
        counts = collections.Counter(self._plan(epoch)[1].tolist())
        return {self.buckets[k].shape: n for k, n in sorted(counts.items())}

    def __iter__(self) -> Iterator[jraph.GraphsTuple]:
        return self.epoch_batches(self.epoch)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[jraph.GraphsTuple]:
        """Yields the padded batches of ``epoch``, from step ``start`` on (to resume mid-epoch).

        Leaves are NumPy arrays; with ``n_devices`` they have a leading ``[D]`` axis.
        """
        steps, bucket_of_step = self._plan(epoch)
        start = _check_int("start", start, 0)
        for step in range(start, len(steps)):
            yield self._materialise(steps[step], self.buckets[bucket_of_step[step]])

    def describe(self, epoch: int = 0) -> Dict[str, Any]:
        """Data and padding statistics for a run directory's log (plain Python values)."""
        steps, bucket_of_step = self._plan(epoch)
        padded = [self.buckets[k] for k in bucket_of_step.tolist()]
        slots = self.n_devices or 1
        padded_nodes = slots * sum(b.n_node for b in padded)
        padded_edges = slots * sum(b.n_edge for b in padded)
        return {
            "graphs": self.num_graphs,
            "nodes": self.num_nodes,
            "edges": self.num_edges,
            "max_nodes_per_graph": int(self._n_node.max()),
            "max_edges_per_graph": int(self._n_edge.max()),
            "mean_nodes_per_graph": float(self._n_node.mean()),
            "mean_edges_per_graph": float(self._n_edge.mean()),
            "batch_size": self.batch_size,
            "n_devices": self.n_devices,
            "budget": dataclasses.asdict(self.budget),
            "bucket_shapes": [list(b.shape) for b in self.buckets],
            "steps_per_epoch": len(steps),
            "steps_per_shape": {str(k): v for k, v in self.shapes(epoch).items()},
            "real_node_fraction": self.num_nodes / max(padded_nodes, 1),
            "real_edge_fraction": self.num_edges / max(padded_edges, 1),
        }

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_graphs)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_graphs)

    def _plan(self, epoch: int) -> Tuple[List[Tuple[np.ndarray, ...]], np.ndarray]:
        epoch = _check_int("epoch", epoch, 0)
        if epoch in self._plans:
            return self._plans[epoch]
        order = self._order(epoch)
        n_node = self._n_node[order]
        n_edge = self._n_edge[order]
        # Greedy packing is sequential by nature; on Python ints it costs well under a microsecond
        # per graph, far less than building the batches.
        node_cap, edge_cap, graph_cap = self.budget.n_node - 1, self.budget.n_edge, self._max_graphs
        bounds = [0]
        nodes = edges = count = 0
        for k, (a, b) in enumerate(zip(n_node.tolist(), n_edge.tolist())):
            if count == graph_cap or nodes + a > node_cap or edges + b > edge_cap:
                bounds.append(k)
                nodes = edges = count = 0
            nodes += a
            edges += b
            count += 1
        starts = np.array(bounds)
        bucket = np.maximum(
            np.searchsorted(self._bucket_nodes, np.add.reduceat(n_node, starts) + 1),
            np.searchsorted(self._bucket_edges, np.add.reduceat(n_edge, starts)))
        batches = np.split(order, starts[1:])
        slots = self.n_devices or 1
        n_steps = -(-len(batches) // slots)
        missing = n_steps * slots - len(batches)
        batches += [order[:0]] * missing
        bucket = np.concatenate([bucket, np.zeros(missing, bucket.dtype)])
        steps = [tuple(batches[i * slots:(i + 1) * slots]) for i in range(n_steps)]
        bucket_of_step = bucket.reshape(n_steps, slots).max(axis=1)
        if self.drop_remainder and (missing or len(batches[len(batches) - missing - 1])
                                    < self._max_graphs):
            steps, bucket_of_step = steps[:-1], bucket_of_step[:-1]
        self._plans[epoch] = (steps, bucket_of_step)
        while len(self._plans) > 2:
            self._plans.popitem(last=False)
        return self._plans[epoch]

    def _materialise(self, step: Tuple[np.ndarray, ...], shape: BatchBudget) -> jraph.GraphsTuple:
        n_node_pad, n_edge_pad, n_graph_pad = shape.shape
        lead = () if self.n_devices is None else (self.n_devices,)
        nodes = self._nodes.allocate(lead + (n_node_pad,))
        edges = self._edges.allocate(lead + (n_edge_pad,))
        globals_ = self._globals.allocate(lead + (n_graph_pad,))
        senders = np.zeros(lead + (n_edge_pad,), np.int32)
        receivers = np.zeros(lead + (n_edge_pad,), np.int32)
        n_node = np.zeros(lead + (n_graph_pad,), np.int32)
        n_edge = np.zeros(lead + (n_graph_pad,), np.int32)
        real_graphs = np.zeros(lead + (n_graph_pad,), bool)
        for slot_number, index in enumerate(step):
            slot = () if self.n_devices is None else (slot_number,)
            n_graph = len(index)
            sizes_n = self._n_node[index]
            sizes_e = self._n_edge[index]
            real_nodes, real_edges = int(sizes_n.sum()), int(sizes_e.sum())
            # Where each graph's nodes start in the batch, and where they start in the store.
            node_start = np.cumsum(sizes_n) - sizes_n
            edge_start = np.cumsum(sizes_e) - sizes_e
            node_rows = np.repeat(self._node_offsets[index] - node_start, sizes_n) \
                + np.arange(real_nodes)
            edge_rows = np.repeat(self._edge_offsets[index] - edge_start, sizes_e) \
                + np.arange(real_edges)
            shift = np.repeat(node_start, sizes_e)
            self._nodes.fill(nodes, slot, node_rows)
            self._edges.fill(edges, slot, edge_rows)
            self._globals.fill(globals_, slot, index)
            # jraph's convention: the padding edges are self-loops on the first padding node, which
            # belongs to the first padding graph together with all other padding nodes and edges.
            senders[slot][:real_edges] = self._senders[edge_rows] + shift
            senders[slot][real_edges:] = real_nodes
            receivers[slot][:real_edges] = self._receivers[edge_rows] + shift
            receivers[slot][real_edges:] = real_nodes
            n_node[slot][:n_graph] = sizes_n
            n_node[slot][n_graph] = n_node_pad - real_nodes
            n_edge[slot][:n_graph] = sizes_e
            n_edge[slot][n_graph] = n_edge_pad - real_edges
            real_graphs[slot][:n_graph] = True
        self.shapes_seen.add(shape.shape)
        return jraph.GraphsTuple(
            nodes=self._nodes.unflatten(nodes), edges=self._edges.unflatten(edges),
            globals={**self._globals.unflatten(globals_), GRAPH_MASK_KEY: real_graphs},
            senders=senders, receivers=receivers, n_node=n_node, n_edge=n_edge)


def _plain_globals(graph: jraph.GraphsTuple, index: int) -> Dict[str, Any]:
    """The globals of an input graph as a dict; the loader itself adds the padding mask."""
    if graph.globals is None:
        return {}
    if not isinstance(graph.globals, dict):
        raise InconsistentGraphsError(
            f"graph {index}: globals must be a dict, got {type(graph.globals).__name__}")
    if GRAPH_MASK_KEY in graph.globals:
        raise InconsistentGraphsError(
            f"graph {index} already has globals[{GRAPH_MASK_KEY!r}]: pass unpadded single graphs")
    return graph.globals


def _check_fits(n_node: np.ndarray, n_edge: np.ndarray, budget: BatchBudget) -> None:
    """Raises if some single graph (plus the one padding node) exceeds the budget."""
    too_big = (n_node + 1 > budget.n_node) | (n_edge > budget.n_edge)
    if too_big.any():
        index = int(np.argmax(too_big))
        largest_n, largest_e = int(n_node.argmax()), int(n_edge.argmax())
        raise PaddingBudgetError(
            f"graph {index} ({n_node[index]} nodes, {n_edge[index]} edges) does not fit the budget "
            f"{budget} (which must hold one padding node besides); {int(too_big.sum())} graph(s) "
            f"too large in all; the largest have {n_node[largest_n]} nodes (graph {largest_n}) and "
            f"{n_edge[largest_e]} edges (graph {largest_e})")


_ITEM, _END, _ERROR = "item", "end", "error"


class Prefetcher:
    """Runs an iterator in a background thread, ``size`` items ahead of the consumer.

    Use :func:`prefetch` to make one. An exception raised by the producer (or by ``transfer``) is
    re-raised in the consumer at the position where it happened, with its original traceback.
    Stopping early is safe: :meth:`close` (also called by ``with``, by ``del`` and on garbage
    collection) tells the producer to stop, closes the source iterator in the producer thread, and
    waits for the thread.
    """

    def __init__(self, iterable: Iterable[Any], size: int = 2,
                 transfer: Optional[Callable[[Any], Any]] = None, join_timeout: float = 10.0):
        self._size = _check_int("size", size, 1)
        self._queue: queue.Queue = queue.Queue(maxsize=self._size)
        self._stop = threading.Event()
        self._done = False
        self._join_timeout = join_timeout
        self._thread = threading.Thread(target=self._produce, args=(iter(iterable), transfer),
                                        name="segnn-prefetch", daemon=True)
        self._thread.start()

    def _put(self, message: Tuple[str, Any]) -> bool:
        # A bounded wait, so that a consumer that went away (stop set) never leaves us blocked.
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, iterator: Iterator[Any], transfer: Optional[Callable[[Any], Any]]) -> None:
        try:
            for item in iterator:
                if transfer is not None:
                    item = transfer(item)
                if not self._put((_ITEM, item)):
                    return
            self._put((_END, None))
        except BaseException as error:  # noqa: BLE001 (handed over to the consumer thread)
            self._put((_ERROR, error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, payload = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if kind == _ITEM:
            return payload
        self._done = True
        self.close()
        if kind == _ERROR:
            raise payload
        raise StopIteration

    def close(self) -> None:
        """Stops the producer and waits (up to ``join_timeout`` s) for its thread to end."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(self._join_timeout)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def prefetch(iterable: Iterable[Any], size: int = 2,
             transfer: Optional[Callable[[Any], Any]] = None) -> Prefetcher:
    """Iterates ``iterable`` in a background thread, ``size`` items ahead.

    The host prepares (and, with ``transfer``, copies to the device) the next batches while the
    device computes on the current one; JAX releases the GIL during dispatch and transfer.

    Args:
        iterable: e.g. ``loader.epoch_batches(epoch)``.
        size: items held ready, >= 1.
        transfer: applied to each item in the background thread, e.g. ``jax.device_put`` or
            ``functools.partial(jax.device_put, device=sharding)`` for device-stacked batches.

    Returns:
        An iterator; use it in a ``with`` block (or call ``close``) when stopping early.

    >>> with prefetch(range(3)) as batches:
    ...     list(batches)
    [0, 1, 2]
    """
    return Prefetcher(iterable, size=size, transfer=transfer)
