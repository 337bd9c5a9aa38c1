"""Fuzzing the graph builders against brute force: radius, k-NN, fully connected, periodic radius
graphs, padding (pad_graph / batch_graphs) and the budgeted GraphLoader.

Inputs include coincident points, points exactly at the cutoff, huge and tiny coordinates, empty
and one-node clouds. The documented exceptions are ValueError subclasses (InvalidPositionsError,
PeriodicGraphError, PaddingBudgetError); anything else, a hang or an edge set that differs from
brute force fails.
"""

import jax
import numpy as np
import pytest
from fuzz_support import budget, no_hang, record
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import segnn_jax as sj
from segnn_jax.batching import BatchBudget, GraphLoader
from segnn_jax.graph import PaddingBudgetError
from segnn_jax.periodic import PeriodicGraphError, periodic_radius_graph

_COORDINATE = st.one_of(
    st.floats(-3, 3, allow_nan=False),
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-300, 1e15, -1e15, 1e150, 1e300, -1e300]),
    st.floats(allow_nan=False, allow_infinity=False),
)


@st.composite
def point_clouds(draw, max_nodes=300):
    n = draw(st.integers(0, max_nodes))
    kind = draw(st.sampled_from(["gaussian", "lattice", "wild", "duplicates"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "gaussian":
        positions = rng.normal(size=(n, 3)) * draw(st.sampled_from([0.5, 3.0, 1e6]))
    elif kind == "lattice":  # many pairs exactly at the cutoff (spacing 1)
        positions = rng.integers(-3, 4, size=(n, 3)).astype(np.float64)
    elif kind == "duplicates":
        base = rng.normal(size=(max(n // 3, 1), 3))
        positions = base[rng.integers(0, len(base), size=n)]
    else:
        positions = draw(hnp.arrays(np.float64, (n, 3), elements=_COORDINATE))
    return positions


def _brute_force_radius(positions, cutoff):
    """Pairs (sender, receiver) with |x_s - x_r| < cutoff, and the ambiguous ones (within
    rounding of the cutoff, where either answer is right)."""
    n = len(positions)
    receiver, sender = np.nonzero(~np.eye(n, dtype=bool))
    diff = positions[sender] - positions[receiver]
    with np.errstate(over="ignore", invalid="ignore"):
        d2 = np.einsum("ij,ij->i", diff, diff)
        c2 = cutoff**2
        sure = d2 < c2 * (1 - 1e-12)
        unsure = ~sure & (d2 <= c2 * (1 + 1e-12))
    pairs = lambda m: set(zip(sender[m].tolist(), receiver[m].tolist()))
    return pairs(sure), pairs(unsure)


@budget(2.0)
@given(positions=point_clouds(), cutoff=st.sampled_from([1.0, 0.5, 2.0, 1e-3, 1e6]) | st.floats(
    1e-6, 1e3))
@example(positions=np.array([[0.0, 0, 0], [1e19, 0, 0], [1e19 + 2048, 0, 0]] + [[0, 0, 5.0 * k]
                                                                               for k in range(300)]),
         cutoff=1e4)  # the spread that overflowed the cell list's integer keys
def test_radius_graph_matches_brute_force(positions, cutoff):
    with no_hang():
        senders, receivers = sj.radius_graph_edges(positions, cutoff)
    assert senders.dtype == np.int32 and receivers.dtype == np.int32
    got = list(zip(senders.tolist(), receivers.tolist()))
    assert len(set(got)) == len(got), "duplicate edges"
    assert all(s != r for s, r in got), "self loops"
    assert got == sorted(got, key=lambda e: (e[1], e[0])), "not sorted by receiver, sender"
    sure, unsure = _brute_force_radius(positions, cutoff)
    assert sure <= set(got) <= sure | unsure
    record("graph.radius_graph_edges", "n>256 (cell list)" if len(positions) > 256 else "n<=256")


@budget(0.5)
@given(bad=st.sampled_from([np.nan, np.inf, -np.inf]), n=st.integers(1, 300),
       cutoff=st.sampled_from([1.0, np.nan, np.inf, 0.0, -1.0]))
def test_radius_graph_refuses_non_finite_input(bad, n, cutoff):
    """Regression: NaN cutoffs or positions gave an empty (or arbitrary) edge set silently."""
    positions = np.zeros((n, 3))
    positions[n // 2, 1] = bad
    with pytest.raises(ValueError, match="NaN|non-finite|positive"):
        sj.radius_graph_edges(positions, cutoff)
    record("graph.radius_graph_edges (non-finite)", "ValueError")


@budget(1.0)
@given(positions=point_clouds(max_nodes=30), data=st.data())
def test_knn_graph_is_the_k_nearest(positions, data):
    n = len(positions)
    k = data.draw(st.integers(-1, max(n, 1)))
    if not 0 < k < n:
        with pytest.raises(ValueError, match="k must be"):
            sj.knn_graph_edges(positions, k)
        record("graph.knn_graph_edges", "ValueError")
        return
    with no_hang():
        senders, receivers = sj.knn_graph_edges(positions, k)
    assert np.array_equal(receivers, np.repeat(np.arange(n), k))
    senders = senders.reshape(n, k)
    with np.errstate(over="ignore", invalid="ignore"):
        d2 = ((positions[None] - positions[:, None]) ** 2).sum(-1)
    for i in range(n):
        chosen = senders[i]
        assert i not in chosen and len(set(chosen.tolist())) == k
        others = np.setdiff1d(np.delete(np.arange(n), i), chosen)
        if len(others):
            assert d2[i, chosen].max() <= d2[i, others].min() * (1 + 1e-12)
    record("graph.knn_graph_edges", "accepted")


@budget(0.5)
@given(n=st.integers(0, 40))
def test_fully_connected_edges(n):
    senders, receivers = sj.fully_connected_edges(n)
    pairs = set(zip(senders.tolist(), receivers.tolist()))
    assert len(senders) == n * (n - 1) == len(pairs)
    assert pairs == {(j, i) for i in range(n) for j in range(n) if i != j}
    record("graph.fully_connected_edges", "accepted")


@st.composite
def periodic_systems(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(0, 12))
    kind = draw(st.sampled_from(["cubic", "random", "small", "thin", "degenerate", "wild"]))
    if kind == "cubic":
        cell = np.eye(3) * draw(st.sampled_from([1.0, 2.0, 3.5]))
    elif kind == "small":
        cell = np.eye(3) * 0.4 + rng.normal(size=(3, 3)) * 0.05
    elif kind == "thin":  # nearly degenerate: very many images within the cutoff
        cell = np.eye(3) * 3.0
        cell[2] = cell[1] + np.array([0, 0, draw(st.sampled_from([1e-2, 1e-5, 1e-9]))])
    elif kind == "degenerate":
        cell = np.eye(3)
        cell[2] = cell[0] * 2
    elif kind == "wild":
        cell = draw(hnp.arrays(np.float64, (3, 3), elements=_COORDINATE))
    else:
        cell = rng.normal(size=(3, 3)) * 2 + np.eye(3) * 3
    positions = rng.uniform(-0.5, 1.5, size=(n, 3)) @ cell if kind != "wild" else draw(
        hnp.arrays(np.float64, (n, 3), elements=_COORDINATE))
    pbc = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    cutoff = draw(st.sampled_from([0.5, 1.0, 2.5]) | st.floats(0.05, 4.0))
    return positions, cell, np.array(pbc), cutoff


def _brute_force_periodic(positions, cell, pbc, cutoff):
    """All (sender, receiver, image) within the cutoff, over every image that can be: the shift
    vector is at most cutoff + the cloud's diameter long, so |image| <= that / sigma_min."""
    periodic = cell[pbc]
    if len(periodic):
        sigma_min = np.linalg.svd(periodic, compute_uv=False).min()
        diameter = np.ptp(positions, axis=0).sum() if len(positions) else 0.0
        reach = (cutoff + diameter) / sigma_min
        if not reach < 100:
            return None  # too many images to enumerate here
        reach = int(np.ceil(reach)) + 1
    ranges = [np.arange(-reach, reach + 1) if flag else np.zeros(1, int) for flag in pbc]
    if np.prod([len(r) for r in ranges]) > 2_000_000:
        return None  # too many images to enumerate here
    shifts = np.stack([g.reshape(-1) for g in np.meshgrid(*ranges, indexing="ij")], axis=1)
    cartesian = shifts @ cell
    sure, unsure = set(), set()
    for i in range(len(positions)):
        for j in range(len(positions)):
            vectors = positions[j] - positions[i] + cartesian
            d2 = np.einsum("ij,ij->i", vectors, vectors)
            if i == j:
                d2[~shifts.any(axis=1)] = np.inf
            for target, mask in ((sure, d2 < cutoff**2 * (1 - 1e-9)),
                                 (unsure, (d2 >= cutoff**2 * (1 - 1e-9))
                                  & (d2 <= cutoff**2 * (1 + 1e-9)))):
                target.update((j, i, tuple(int(v) for v in shift)) for shift in shifts[mask])
    return sure, unsure


@budget(1.5)
@given(system=periodic_systems())
def test_periodic_radius_graph_matches_brute_force(system):
    positions, cell, pbc, cutoff = system
    try:
        with no_hang():
            edges = periodic_radius_graph(positions, cell, pbc, cutoff)
    except PeriodicGraphError as error:
        record("periodic.periodic_radius_graph", "PeriodicGraphError")
        assert str(error)
        return
    got = list(zip(edges.senders.tolist(), edges.receivers.tolist(),
                   map(tuple, edges.image_shifts.tolist())))
    assert len(set(got)) == len(got)
    np.testing.assert_allclose(edges.shifts_cartesian, edges.image_shifts @ cell, rtol=0, atol=0)
    periodic_cell = cell[pbc]
    if len(got) <= 20000 and np.isfinite(positions).all() and (
            not len(periodic_cell) or np.linalg.matrix_rank(periodic_cell) == len(periodic_cell)):
        reference = _brute_force_periodic(positions, cell, pbc, cutoff)
        if reference is not None:
            sure, unsure = reference
            assert sure <= set(got) <= sure | unsure
    record("periodic.periodic_radius_graph", "accepted")


def test_thin_slab_cell_without_full_periodicity_fails_fast():
    """Regression (found by the fuzz test above): in a cell 0.01 thick, periodic along two axes,
    ASE's search (vesin takes only fully periodic cells) looped over 360,000 bin offsets in
    Python, over a minute, at a cutoff of 1 as at 3.1 (its bins are at least 3 Angstrom). It now
    stops at once, naming the limit; a thicker cell still works."""
    cell = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.01]])
    pbc = np.array([False, True, True])
    positions = np.random.default_rng(0).uniform(-0.5, 1.5, size=(11, 3)) @ cell
    for cutoff in (1.0, 3.089583341854864):
        with no_hang(10), pytest.raises(PeriodicGraphError, match="ASE's neighbour search"):
            periodic_radius_graph(positions, cell, pbc, cutoff)
    cell[2, 2] = 0.3
    edges = periodic_radius_graph(positions, cell, pbc, 3.089583341854864)
    assert len(edges.senders) > 0


@pytest.mark.parametrize("thickness", [1e-5, 1e-7])
def test_periodic_nearly_degenerate_cell_fails_fast(thickness):
    """Regression: a cell 1e-5 thick (rank test passed) made the neighbour search run for
    minutes; it now stops at once, naming the number of images."""
    cell = np.eye(3) * 3.0
    cell[2] = cell[1] + np.array([0, 0, thickness])
    with no_hang(10), pytest.raises(PeriodicGraphError, match="periodic images of the cell"):
        periodic_radius_graph(np.array([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]]), cell, True, 2.5)


@pytest.mark.parametrize("positions, cell, pbc", [
    (np.array([[1e5, 0, 0], [0, 0, 0], [0.5, 0, 0]]), np.eye(3), False),
    (np.array([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]]), np.eye(3) * 1e300, True),
], ids=["far_atom_in_vacuum", "huge_box"])
def test_periodic_inputs_that_crash_vesin_go_to_ase(positions, cell, pbc):
    """Regression: vesin 0.6.2 killed the interpreter with SIGFPE on these (found by the large
    fuzz run: a dead pytest worker). 'auto' must route them to ASE; 'vesin' must refuse them."""
    edges = periodic_radius_graph(positions, cell, pbc, 1.0)
    pairs = set(zip(edges.senders.tolist(), edges.receivers.tolist()))
    sure, _ = _brute_force_radius(positions, 1.0)
    assert pairs == sure
    pytest.importorskip("vesin")
    with pytest.raises(PeriodicGraphError, match="use backend='ase'"):
        periodic_radius_graph(positions, cell, pbc, 1.0, backend="vesin")


@st.composite
def graph_lists(draw, max_graphs=6):
    sizes = draw(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 12)), min_size=1,
                          max_size=max_graphs))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    graphs = []
    for index, (n, e) in enumerate(sizes):
        e = e if n else 0
        senders = rng.integers(0, max(n, 1), size=e)
        receivers = rng.integers(0, max(n, 1), size=e)
        graphs.append(sj.make_graph(rng.normal(size=(n, 3)).astype(np.float32), senders, receivers,
                                    nodes={"z": np.arange(n, dtype=np.int32)},
                                    edges={"w": rng.normal(size=(e, 2)).astype(np.float32)},
                                    globals={"id": np.array([index])}))
    return graphs


@budget(2.0)
@given(graphs=graph_lists(), n_node=st.integers(0, 60), n_edge=st.integers(0, 80),
       n_graph=st.integers(0, 8))
def test_pad_graph_fits_exactly_or_names_the_budget(graphs, n_node, n_edge, n_graph):
    batch = sj.batch_graphs(graphs)
    nodes, edges = int(batch.n_node.sum()), int(batch.n_edge.sum())
    fits = nodes + 1 <= n_node and edges <= n_edge and len(graphs) + 1 <= n_graph
    if not fits:
        with pytest.raises(PaddingBudgetError, match="budget"):
            sj.pad_graph(batch, n_node, n_edge, n_graph)
        record("graph.pad_graph", "PaddingBudgetError")
        return
    padded = sj.pad_graph(batch, n_node, n_edge, n_graph)
    assert padded.nodes["positions"].shape == (n_node, 3) and padded.senders.shape == (n_edge,)
    assert padded.n_node.shape == (n_graph,) and int(padded.n_node.sum()) == n_node
    assert int(padded.n_edge.sum()) == n_edge
    assert np.asarray(sj.graph_mask(padded)).tolist() == [True] * len(graphs) + [False] * (
        n_graph - len(graphs))
    # Padding edges stay inside the padding nodes; real edges keep their endpoints.
    assert (padded.senders[edges:] >= nodes).all() and (padded.receivers[edges:] >= nodes).all()
    back = sj.unpad_graph(padded)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(batch)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    record("graph.pad_graph", "accepted")


@budget(1.5)
@given(graphs=graph_lists(max_graphs=10), batch_size=st.integers(1, 5),
       budget_=st.tuples(st.integers(2, 30), st.integers(0, 40), st.integers(2, 6)),
       shuffle=st.booleans(), epoch=st.integers(0, 3))
def test_graph_loader_respects_budget_and_sees_every_graph_once(graphs, batch_size, budget_,
                                                               shuffle, epoch):
    budget_ = BatchBudget(*budget_)
    n_node = np.array([int(g.n_node[0]) for g in graphs])
    n_edge = np.array([int(g.n_edge[0]) for g in graphs])
    too_big = (n_node + 1 > budget_.n_node) | (n_edge > budget_.n_edge)
    if too_big.any():
        with pytest.raises(PaddingBudgetError, match=f"graph {int(np.argmax(too_big))} "):
            GraphLoader(graphs, batch_size, budget=budget_, shuffle=shuffle)
        record("batching.GraphLoader", "PaddingBudgetError")
        return
    loader = GraphLoader(graphs, batch_size, budget=budget_, shuffle=shuffle, seed=1)
    seen = []
    with no_hang():
        batches = list(loader.epoch_batches(epoch))
    for batch in batches:
        real = np.asarray(batch.globals["graph_mask"])
        assert batch.nodes["positions"].shape[0] <= budget_.n_node
        assert batch.senders.shape[0] <= budget_.n_edge
        assert len(real) <= budget_.n_graph and real.sum() <= batch_size
        seen += batch.globals["id"][real].reshape(-1).tolist()
        ids = batch.globals["id"][real].reshape(-1)
        # Each real graph's nodes are the ones it was built with (z = 0..n-1 in order).
        z = np.asarray(batch.nodes["z"])[: int(np.asarray(batch.n_node)[real].sum())]
        assert z.tolist() == [k for i in ids for k in range(n_node[i])]
    assert sorted(seen) == list(range(len(graphs)))
    record("batching.GraphLoader", "accepted")
