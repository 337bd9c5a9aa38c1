"""Graph builders against brute force, padding and unpadding, masks, input validation."""

import jax
import numpy as np
import pytest

import segnn_jax as sj


def brute_force_radius(positions, cutoff):
    d = np.sqrt(((positions[:, None] - positions[None]) ** 2).sum(-1))
    pairs = {(j, i) for i in range(len(positions)) for j in range(len(positions))
             if i != j and d[i, j] < cutoff}
    return pairs


@pytest.mark.parametrize("n,cutoff", [(30, 1.0), (300, 0.8), (1000, 0.5)])
def test_radius_graph_matches_brute_force(n, cutoff):
    positions = np.random.default_rng(n).uniform(-2, 2, size=(n, 3))
    senders, receivers = sj.radius_graph_edges(positions, cutoff)
    assert set(zip(senders.tolist(), receivers.tolist())) == brute_force_radius(positions, cutoff)
    assert len(senders) == len(set(zip(senders.tolist(), receivers.tolist())))


def test_knn_graph_matches_brute_force():
    positions = np.random.default_rng(0).normal(size=(50, 3))
    senders, receivers = sj.knn_graph_edges(positions, 6)
    d = ((positions[:, None] - positions[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    for i in range(50):
        assert set(senders[receivers == i]) == set(np.argsort(d[i])[:6])
    with pytest.raises(ValueError, match="k must be"):
        sj.knn_graph_edges(positions[:3], 3)


def test_fully_connected():
    senders, receivers = sj.fully_connected_edges(5)
    assert len(senders) == 20 and not np.any(senders == receivers)
    assert len(set(zip(senders.tolist(), receivers.tolist()))) == 20


def _graph(rng, n):
    positions = rng.normal(size=(n, 3))
    return sj.make_graph(positions, *sj.fully_connected_edges(n), nodes={"charge": rng.normal(size=n)},
                         globals={"target": rng.normal(size=(1, 2))})


def test_pad_unpad_round_trip_and_masks():
    rng = np.random.default_rng(1)
    graphs = [_graph(rng, 3), _graph(rng, 0), _graph(rng, 4)]
    batch = sj.batch_graphs(graphs)
    padded = sj.pad_graph(batch, 10, 30, 5)
    np.testing.assert_array_equal(sj.graph_mask(padded), [True, True, True, False, False])
    np.testing.assert_array_equal(sj.node_mask(padded), [True] * 7 + [False] * 3)
    np.testing.assert_array_equal(sj.edge_mask(padded), [True] * 18 + [False] * 12)
    np.testing.assert_array_equal(sj.node_graph_index(padded), [0, 0, 0, 2, 2, 2, 2, 3, 3, 3])
    restored = sj.unpad_graph(padded)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(batch)):
        np.testing.assert_array_equal(a, b)
    back = sj.unbatch_graphs(restored)
    assert [int(g.n_node[0]) for g in back] == [3, 0, 4]


def test_padding_budget_errors_name_the_budget():
    graph = _graph(np.random.default_rng(2), 4)
    with pytest.raises(sj.PaddingBudgetError, match="n_graph budget 1 < 1 real graphs"):
        sj.pad_graph(graph, 10, 20, 1)
    with pytest.raises(sj.PaddingBudgetError, match="n_node budget 4 < 4 real nodes"):
        sj.pad_graph(graph, 4, 20, 2)


def test_make_graph_validates_its_inputs():
    with pytest.raises(ValueError, match="edge indices"):
        sj.make_graph(np.zeros((2, 3)), np.array([0]), np.array([2]))
    with pytest.raises(ValueError, match="node field 'charge'"):
        sj.make_graph(np.zeros((2, 3)), np.array([0]), np.array([1]), nodes={"charge": np.zeros(3)})
    with pytest.raises(sj.InvalidPositionsError, match="non-finite"):
        sj.make_graph(np.array([[0.0, 0, 0], [np.inf, 0, 0]]), np.array([0]), np.array([1]))
    with pytest.raises(sj.InvalidPositionsError, match="same position"):
        sj.validate_positions(np.array([[0.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]]), allow_coincident=False)
    with pytest.raises(ValueError, match="cutoff must be positive"):
        sj.radius_graph_edges(np.zeros((3, 3)), 0.0)
