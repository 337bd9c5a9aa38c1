"""Tests for segnn_jax.batching: packing, bucketed padding, epochs, devices, prefetching."""

import doctest
import threading
import time

import jax
import numpy as np
import pytest

from segnn_jax import batching
from segnn_jax.batching import (BatchBudget, GraphLoader, InconsistentGraphsError, bucket_budgets,
                                estimate_budget, estimate_budget_from_sizes, graph_sizes, prefetch)
from segnn_jax.graph import (PaddingBudgetError, batch_graphs, edge_mask, graph_mask, make_graph,
                             node_mask, pad_graph, radius_graph_edges)


def molecule_like(n_graphs, seed=0, min_nodes=3, max_nodes=29):
    """Random molecule-sized graphs (radius 2.0 graphs of 3-29 atoms), each with its index as id."""
    rng = np.random.default_rng(seed)
    graphs = []
    for index in range(n_graphs):
        n = int(rng.integers(min_nodes, max_nodes + 1))
        positions = rng.normal(size=(n, 3)) * 0.9 * n ** (1 / 3)
        senders, receivers = radius_graph_edges(positions, 2.0)
        graphs.append(make_graph(
            positions.astype(np.float32), senders, receivers,
            nodes={"species": rng.integers(0, 5, n).astype(np.int32)},
            edges={"shifts": rng.normal(size=(len(senders), 3)).astype(np.float32)},
            globals={"targets": rng.normal(size=(1, 2)).astype(np.float32),
                     "id": np.array([index])}))
    return graphs


@pytest.fixture(scope="module")
def graphs():
    return molecule_like(600)


def ids_of(batch):
    """The ids of the real graphs of a (non-stacked) padded batch."""
    return batch.globals["id"][np.asarray(graph_mask(batch))].tolist()


def epoch_ids(loader, epoch):
    return [ids_of(batch) for batch in loader.epoch_batches(epoch)]


def test_module_doctests():
    assert doctest.testmod(batching).failed == 0


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_graph_exactly_once_per_epoch(graphs, shuffle):
    loader = GraphLoader(graphs, 32, shuffle=shuffle, seed=3)
    for epoch in (0, 1):
        seen = [i for batch in epoch_ids(loader, epoch) for i in batch]
        assert sorted(seen) == list(range(len(graphs)))
        if not shuffle:
            assert seen == list(range(len(graphs)))


def test_batches_equal_jraph_reference_padding(graphs):
    """Each batch is exactly pad_graph(batch_graphs(its graphs)) to its bucket shape."""
    loader = GraphLoader(graphs, 16, shuffle=True, seed=1)
    plan = loader.epoch_plan(2)
    for (index,), batch in zip(plan, loader.epoch_batches(2)):
        n_node, n_edge, n_graph = (batch.nodes["positions"].shape[0], batch.senders.shape[0],
                                   batch.n_node.shape[0])
        expected = pad_graph(batch_graphs([graphs[i] for i in index]), n_node, n_edge, n_graph)
        jax.tree_util.tree_map(np.testing.assert_array_equal, batch, expected)
        # Same dtypes, except that jraph's batching promotes the edge indices to int64.
        def dtypes(g):
            no_indices = g._replace(senders=None, receivers=None)
            return jax.tree_util.tree_map(lambda a: a.dtype, no_indices)

        assert dtypes(batch) == dtypes(expected)
        assert batch.senders.dtype == batch.receivers.dtype == np.int32


def test_masks_mark_exactly_the_real_parts(graphs):
    loader = GraphLoader(graphs, 64, shuffle=True, seed=0)
    for (index,), batch in zip(loader.epoch_plan(0), loader.epoch_batches(0)):
        n_real_nodes = sum(int(graphs[i].n_node[0]) for i in index)
        n_real_edges = sum(int(graphs[i].n_edge[0]) for i in index)
        nodes, edges, graphs_ = (np.asarray(node_mask(batch)), np.asarray(edge_mask(batch)),
                                 np.asarray(graph_mask(batch)))
        assert nodes.sum() == n_real_nodes and nodes[:n_real_nodes].all()
        assert edges.sum() == n_real_edges and edges[:n_real_edges].all()
        assert graphs_.sum() == len(index) and graphs_[:len(index)].all()
        # Padding edges stay inside the padding: both ends on a padding node.
        assert not nodes[batch.senders[~edges]].any()
        assert not nodes[batch.receivers[~edges]].any()


def test_order_is_a_pure_function_of_seed_and_epoch(graphs):
    first = GraphLoader(graphs, 32, shuffle=True, seed=7)
    second = GraphLoader(graphs, 32, shuffle=True, seed=7)
    assert epoch_ids(first, 3) == epoch_ids(second, 3)
    # Asking for another epoch in between does not change it (no hidden RNG state).
    epoch_ids(second, 0)
    assert epoch_ids(second, 3) == epoch_ids(first, 3)
    assert epoch_ids(first, 3) != epoch_ids(first, 4)
    assert epoch_ids(first, 3) != epoch_ids(GraphLoader(graphs, 32, shuffle=True, seed=8), 3)


def test_iteration_follows_set_epoch_and_len_is_exact(graphs):
    budget = estimate_budget(graphs, 32, sigmas=0.0)  # tight: some batches close early
    loader = GraphLoader(graphs, 32, budget=budget, shuffle=True, seed=0)
    for epoch in range(4):
        loader.set_epoch(epoch)
        batches = [ids_of(b) for b in loader]
        assert batches == epoch_ids(loader, epoch)
        assert len(loader) == len(batches) == loader.num_steps(epoch)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)


def test_resume_mid_epoch_gives_the_remaining_batches(graphs):
    loader = GraphLoader(graphs, 32, shuffle=True, seed=5)
    full = epoch_ids(loader, 2)
    resumed = GraphLoader(graphs, 32, shuffle=True, seed=5)
    assert [ids_of(b) for b in resumed.epoch_batches(2, start=7)] == full[7:]
    assert list(resumed.epoch_batches(2, start=len(full))) == []


def test_last_partial_batch_kept_or_dropped(graphs):
    budget = estimate_budget(graphs, 64, sigmas=None)  # worst case: every batch has 64 graphs
    kept = GraphLoader(graphs, 64, budget=budget)
    sizes = [len(b) for b in epoch_ids(kept, 0)]
    assert sizes == [64] * 9 + [600 - 9 * 64]
    assert len(kept) == 10
    dropped = GraphLoader(graphs, 64, budget=budget, drop_remainder=True)
    assert [len(b) for b in epoch_ids(dropped, 0)] == [64] * 9
    assert len(dropped) == 9
    exact = GraphLoader(graphs[:128], 64, budget=budget, drop_remainder=True)
    assert [len(b) for b in epoch_ids(exact, 0)] == [64, 64]


def test_batches_respect_the_budget_and_greedy_closes_early():
    graphs = molecule_like(300, seed=2)
    n_node, n_edge = graph_sizes(graphs)
    budget = BatchBudget(int(n_node.max()) * 3, int(n_edge.max()) * 3, 50)
    loader = GraphLoader(graphs, 40, budget=budget)
    counts = []
    for (index,), batch in zip(loader.epoch_plan(0), loader.epoch_batches(0)):
        assert n_node[index].sum() + 1 <= budget.n_node and n_edge[index].sum() <= budget.n_edge
        assert batch.n_node.shape == (50,)
        counts.append(len(index))
    # Greedy: a batch only closes when the next graph would not fit.
    plan = [index for (index,) in loader.epoch_plan(0)]
    for index, following in zip(plan, plan[1:]):
        nxt = following[0]
        assert (len(index) == 40 or n_node[index].sum() + n_node[nxt] + 1 > budget.n_node
                or n_edge[index].sum() + n_edge[nxt] > budget.n_edge)
    assert max(counts) < 40  # the node budget, not the graph count, limited these batches


def test_padded_shapes_are_bounded_over_an_epoch():
    graphs = molecule_like(2000, seed=4)
    for batch_size in (8, 32, 128):
        loader = GraphLoader(graphs, batch_size, shuffle=True, seed=0)
        for epoch in range(2):
            shapes = {(b.nodes["positions"].shape[0], b.senders.shape[0], b.n_node.shape[0])
                      for b in loader.epoch_batches(epoch)}
            assert len(shapes) <= 4
            assert shapes == set(loader.shapes(epoch))
            assert shapes <= {b.shape for b in loader.buckets}
        assert loader.shapes_seen == set().union(*(loader.shapes(e) for e in range(2)))
        assert sum(loader.shapes(0).values()) == len(loader)


def test_graph_larger_than_budget_is_named():
    graphs = molecule_like(20, seed=1, max_nodes=10)
    big = molecule_like(1, seed=9, min_nodes=29)[0]
    graphs.insert(13, big)
    with pytest.raises(PaddingBudgetError, match=r"graph 13 \(29 nodes"):
        GraphLoader(graphs, 4, budget=BatchBudget(25, 10_000, 5))
    n_edge = graph_sizes(graphs)[1]
    most_edges = int(n_edge.argmax())
    with pytest.raises(PaddingBudgetError,
                       match=rf"graph {most_edges} \(\d+ nodes, {n_edge.max()} edges\)"):
        GraphLoader(graphs, 4, budget=BatchBudget(1000, int(n_edge.max()) - 1, 5))
    # A graph that exactly fills the budget (with its padding node) is fine.
    loader = GraphLoader(graphs, 4, budget=BatchBudget(30, int(n_edge.max()), 5))
    assert sorted(i for b in epoch_ids(loader, 0) for i in b) == \
        sorted(int(g.globals["id"][0]) for g in graphs)


@pytest.mark.parametrize("shuffle", [False, True])
def test_multi_device_stacking_and_filler_slots(graphs, shuffle):
    single = GraphLoader(graphs, 20, shuffle=shuffle, seed=2)
    stacked = GraphLoader(graphs, 20, shuffle=shuffle, seed=2, n_devices=4)
    per_device = epoch_ids(single, 1)
    assert len(per_device) % 4 != 0  # the last step needs filler slots
    assert len(stacked) == -(-len(per_device) // 4)
    steps = list(stacked.epoch_batches(1))
    seen = []
    for step_number, step in enumerate(steps):
        leading = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(step)}
        assert leading == {4}
        n_node, n_edge = step.nodes["positions"].shape[1], step.senders.shape[1]
        assert (n_node, n_edge, step.n_node.shape[1]) in {b.shape for b in stacked.buckets}
        for d in range(4):
            device_batch = jax.tree_util.tree_map(lambda leaf, d=d: leaf[d], step)
            assert device_batch.n_node.sum() == n_node and device_batch.n_edge.sum() == n_edge
            ids = ids_of(device_batch)
            seen.append(ids)
            if step_number * 4 + d >= len(per_device):  # filler: nothing real
                assert ids == []
                assert not np.asarray(node_mask(device_batch)).any()
                assert not np.asarray(edge_mask(device_batch)).any()
                assert not np.asarray(graph_mask(device_batch)).any()
    # The data order does not depend on the number of devices.
    assert [ids for ids in seen if ids] == per_device
    assert len(seen) == 4 * len(steps)
    assert len(stacked.shapes(1)) <= 4


def test_one_device_axis_and_dropping_incomplete_steps(graphs):
    one = next(iter(GraphLoader(graphs, 20, n_devices=1)))
    assert one.nodes["positions"].shape[0] == 1 and one.senders.ndim == 2
    full = GraphLoader(graphs, 20, n_devices=4)
    dropped = GraphLoader(graphs, 20, n_devices=4, drop_remainder=True)
    assert len(dropped) == len(full) - 1
    plan = full.epoch_plan(0)
    assert len(dropped.epoch_plan(0)) == len(plan) - 1
    assert all(np.array_equal(a, b)
               for x, y in zip(dropped.epoch_plan(0), plan) for a, b in zip(x, y))
    assert any(len(index) < 20 for index in plan[-1])  # the dropped step was incomplete


def test_estimate_budget():
    n_node = np.array([3, 5, 4, 29, 7])
    n_edge = np.array([6, 20, 12, 300, 30])
    worst = estimate_budget_from_sizes(n_node, n_edge, 2, sigmas=None, round_to=1)
    assert worst == BatchBudget(29 + 7 + 1, 300 + 30, 3)
    # Dataset smaller than a batch: the worst case is all graphs.
    assert estimate_budget_from_sizes(n_node, n_edge, 100, sigmas=None, round_to=1) == \
        BatchBudget(48 + 1, 368, 101)
    typical = estimate_budget_from_sizes(n_node, n_edge, 2, sigmas=0.0, round_to=1)
    assert typical.n_node == max(int(np.ceil(2 * n_node.mean())), 29) + 1
    rounded = estimate_budget_from_sizes(n_node, n_edge, 2, round_to=8)
    assert rounded.n_node % 8 == 0 and rounded.n_edge % 8 == 0
    # Always holds the largest graph, never exceeds the worst case (up to rounding).
    for sigmas in (0.0, 1.0, 3.0, 100.0):
        b = estimate_budget_from_sizes(n_node, n_edge, 2, sigmas=sigmas, round_to=1)
        assert 30 <= b.n_node <= worst.n_node and 300 <= b.n_edge <= worst.n_edge
    with pytest.raises(ValueError, match="batch_size"):
        estimate_budget_from_sizes(n_node, n_edge, 0)
    with pytest.raises(ValueError, match="sigmas"):
        estimate_budget_from_sizes(n_node, n_edge, 2, sigmas=-1.0)
    with pytest.raises(ValueError, match="round_to"):
        estimate_budget_from_sizes(n_node, n_edge, 2, round_to=0)
    with pytest.raises(ValueError, match="equal length"):
        estimate_budget_from_sizes(n_node, n_edge[:-1], 2)


def test_estimated_budget_is_close_to_typical_batches():
    graphs = molecule_like(2000, seed=6)
    budget = estimate_budget(graphs, 128)
    loader = GraphLoader(graphs, 128, budget=budget, shuffle=True)
    stats = loader.describe(0)
    # 3 sigma headroom: nearly all batches hold 128 graphs, with little padding.
    full = sum(len(index) == 128 for (index,) in loader.epoch_plan(0))
    assert full >= len(loader) - 2
    assert stats["real_node_fraction"] > 0.8
    assert stats["graphs"] == 2000 and stats["steps_per_epoch"] == len(loader)


def test_bucket_budgets():
    shapes = [b.shape for b in bucket_budgets(BatchBudget(100, 1000, 9))]
    assert shapes == [(25, 250, 9), (50, 500, 9), (75, 750, 9), (100, 1000, 9)]
    # Duplicates from tiny budgets collapse; the full budget is always present.
    assert [b.shape for b in bucket_budgets(BatchBudget(2, 0, 2))] == [(2, 0, 2)]
    assert bucket_budgets(BatchBudget(10, 10, 3), (0.5,))[-1].shape == (10, 10, 3)
    for bad in ((), (0.5, 0.5), (0.0, 1.0), (0.5, 1.5), (1.0, 0.5)):
        with pytest.raises(ValueError, match="buckets"):
            bucket_budgets(BatchBudget(10, 10, 3), bad)


def test_bad_arguments_and_inconsistent_graphs(graphs):
    with pytest.raises(ValueError, match="batch_size"):
        GraphLoader(graphs, -1)
    with pytest.raises(ValueError, match="n_devices"):
        GraphLoader(graphs, 4, n_devices=0)
    with pytest.raises(ValueError, match="at least one graph"):
        GraphLoader([], 4)
    with pytest.raises(TypeError, match="budget"):
        GraphLoader(graphs, 4, budget=(100, 100, 5))
    with pytest.raises(ValueError, match="n_graph"):
        BatchBudget(10, 10, 1)
    with pytest.raises(ValueError, match="not a single graph"):
        GraphLoader([batch_graphs(graphs[:2])], 4)
    other = molecule_like(3)
    other[1] = other[1]._replace(nodes={**other[1].nodes, "species": other[1].nodes["species"]
                                        .astype(np.int64)})
    with pytest.raises(InconsistentGraphsError, match="graph 1 has nodes"):
        GraphLoader(other, 2)
    missing = molecule_like(3)
    missing[2] = missing[2]._replace(globals={"id": missing[2].globals["id"]})
    with pytest.raises(InconsistentGraphsError, match="graph 2 has globals"):
        GraphLoader(missing, 2)
    bad_edges = molecule_like(3)
    bad_edges[1] = bad_edges[1]._replace(senders=bad_edges[1].senders + 100)
    with pytest.raises(InconsistentGraphsError, match="graph 1 has an edge"):
        GraphLoader(bad_edges, 2)
    padded = molecule_like(2)
    padded[1] = padded[1]._replace(globals={**padded[1].globals, "graph_mask": np.ones(1, bool)})
    with pytest.raises(InconsistentGraphsError, match="graph 1 already has"):
        GraphLoader(padded, 2)


def test_graphs_without_nodes_stay_real(graphs):
    empty = make_graph(np.zeros((0, 3), np.float32), [], [],
                       nodes={"species": np.zeros(0, np.int32)},
                       edges={"shifts": np.zeros((0, 3), np.float32)},
                       globals={"targets": np.zeros((1, 2), np.float32), "id": np.array([1])})
    loader = GraphLoader([graphs[0], empty], 4)
    (batch,) = list(loader)
    assert np.asarray(graph_mask(batch)).tolist() == [True, True] + [False] * 3
    assert ids_of(batch) == [0, 1]
    assert np.asarray(node_mask(batch)).sum() == graphs[0].n_node[0]


def test_prefetch_preserves_order_and_applies_transfer():
    with prefetch(range(20), size=3, transfer=lambda x: 2 * x) as items:
        assert list(items) == [2 * i for i in range(20)]
    loader = GraphLoader(molecule_like(50), 8)
    batches = list(prefetch(loader.epoch_batches(0), transfer=jax.device_put))
    assert isinstance(batches[0].senders, jax.Array)
    assert [ids_of(jax.device_get(b)) for b in batches] == epoch_ids(loader, 0)


def test_prefetch_propagates_exceptions():
    def source():
        yield 1
        yield 2
        raise KeyError("broken sample 3")

    items = prefetch(source())
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(KeyError, match="broken sample 3"):
        next(items)
    with pytest.raises(StopIteration):
        next(items)

    def failing_transfer(x):
        raise RuntimeError(f"transfer failed on {x}")

    with pytest.raises(RuntimeError, match="transfer failed on 0"):
        list(prefetch(range(3), transfer=failing_transfer))


def test_prefetch_stops_cleanly_when_the_consumer_stops_early():
    closed = threading.Event()
    produced = []

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    items = prefetch(endless(), size=2)
    assert [next(items) for _ in range(5)] == list(range(5))
    start = time.perf_counter()
    items.close()
    assert time.perf_counter() - start < 5
    assert closed.wait(5)  # the source generator was closed in its own thread
    assert not items._thread.is_alive()
    assert len(produced) <= 5 + 2 + 1  # never ran more than `size` ahead
    with pytest.raises(StopIteration):
        next(items)

    # Breaking out of a `with` block does the same.
    closed.clear()
    with prefetch(endless()) as items:
        for item in items:
            if item == 3:
                break
    assert closed.wait(5) and not items._thread.is_alive()
