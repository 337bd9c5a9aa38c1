"""Tests of segnn_jax.periodic against a brute-force search over periodic images, for each
neighbour-list backend (ASE and vesin)."""

import itertools

import numpy as np
import pytest

from segnn_jax.periodic import PeriodicEdges, PeriodicGraphError, periodic_radius_graph


@pytest.fixture(params=["ase", "vesin"])
def backend(request):
    if request.param == "vesin":
        pytest.importorskip("vesin", reason="vesin (optional, experiments extra) is not installed")
    return request.param


def _brute_force(positions, cell, pbc, cutoff, extra_images=0):
    """Set of (receiver, sender, n1, n2, n3) with |x_j - x_i + n @ cell| < cutoff."""
    cell = np.asarray(cell, dtype=np.float64)
    ranges = []
    for k in range(3):
        if not pbc[k]:
            ranges.append([0])
            continue
        # Distance between the lattice planes spanned by the two other vectors.
        other = cell[[m for m in range(3) if m != k]]
        normal = np.cross(other[0], other[1])
        if np.linalg.norm(normal) == 0.0:  # non-periodic partner vectors may be zero
            spacing = np.linalg.norm(cell[k])
        else:
            spacing = abs(cell[k] @ normal) / np.linalg.norm(normal)
        n_max = int(np.ceil(cutoff / spacing)) + 1 + extra_images
        ranges.append(range(-n_max, n_max + 1))
    found = set()
    for image in itertools.product(*ranges):
        shift = np.asarray(image, dtype=np.float64) @ cell
        diff = positions[None, :, :] - positions[:, None, :] + shift  # [i, j]
        dist = np.sqrt((diff**2).sum(-1))
        for i, j in zip(*np.nonzero(dist < cutoff)):
            if i == j and not any(image):
                continue
            found.add((int(i), int(j), *image))
    return found


def _as_set(edges: PeriodicEdges):
    return {
        (int(r), int(s), *map(int, n))
        for r, s, n in zip(edges.receivers, edges.senders, edges.image_shifts)
    }


def _check(positions, cell, pbc, cutoff, backend, extra_images=0):
    edges = periodic_radius_graph(positions, cell, pbc, cutoff, backend=backend)
    expected = _brute_force(positions, cell, pbc, cutoff, extra_images)
    got = _as_set(edges)
    assert len(got) == len(edges.senders), "duplicate edges"
    assert got == expected
    vec = edges.vectors(positions)
    assert np.all(np.sqrt((vec**2).sum(-1)) < cutoff)
    np.testing.assert_allclose(edges.shifts_cartesian, edges.image_shifts @ np.asarray(cell))
    assert edges.senders.dtype == np.int32 and edges.receivers.dtype == np.int32
    return edges


@pytest.mark.parametrize("seed", range(3))
def test_orthorhombic_cell_larger_than_cutoff(seed, backend):
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(6.0, 9.0, size=3))
    positions = rng.uniform(size=(12, 3)) @ cell
    _check(positions, cell, [True, True, True], 3.0, backend)


@pytest.mark.parametrize("seed", range(3))
def test_cell_smaller_than_cutoff_many_images(seed, backend):
    rng = np.random.default_rng(100 + seed)
    cell = np.diag(rng.uniform(1.0, 2.0, size=3))
    positions = rng.uniform(size=(4, 3)) @ cell
    edges = _check(positions, cell, [True, True, True], 3.5, backend)
    # Every atom sees many images of itself and of each other atom.
    self_images = edges.senders == edges.receivers
    assert self_images.sum() > 4 * 10
    assert np.abs(edges.image_shifts).max() >= 2


@pytest.mark.parametrize("seed", range(3))
def test_skewed_cell(seed, backend):
    rng = np.random.default_rng(200 + seed)
    cell = np.array([[3.0, 0.0, 0.0], [2.6, 2.2, 0.0], [1.9, -1.4, 2.5]])
    cell = cell + rng.normal(scale=0.1, size=(3, 3))
    positions = rng.uniform(size=(6, 3)) @ cell
    _check(positions, cell, [True, True, True], 4.0, backend)


def test_mixed_periodicity_slab(backend):
    rng = np.random.default_rng(7)
    cell = np.array([[2.5, 0.0, 0.0], [1.25, 2.165, 0.0], [0.0, 0.0, 0.0]])
    positions = rng.uniform(size=(5, 3)) * [2.5, 2.0, 6.0]
    edges = _check(positions, cell, [True, True, False], 3.2, backend)
    assert np.all(edges.image_shifts[:, 2] == 0)


def test_no_periodicity_matches_plain_radius_graph(backend):
    rng = np.random.default_rng(8)
    positions = rng.uniform(size=(15, 3)) * 5.0
    edges = _check(positions, np.zeros((3, 3)), [False, False, False], 2.0, backend)
    assert np.all(edges.image_shifts == 0)
    assert np.all(edges.senders != edges.receivers)


def test_unwrapped_positions(backend):
    rng = np.random.default_rng(9)
    cell = np.array([[4.0, 0.0, 0.0], [1.0, 3.5, 0.0], [0.5, 0.3, 5.0]])
    fractional = rng.uniform(-1.5, 2.5, size=(7, 3))
    _check(fractional @ cell, cell, [True, True, True], 3.0, backend, extra_images=3)


def test_every_edge_has_its_reverse(backend):
    rng = np.random.default_rng(10)
    cell = np.diag([2.0, 3.0, 2.5])
    positions = rng.uniform(size=(5, 3)) @ cell
    edges = periodic_radius_graph(positions, cell, True, 3.0, backend=backend)
    forward = _as_set(edges)
    backward = {(s, r, -a, -b, -c) for r, s, a, b, c in forward}
    assert forward == backward


def test_legacy_batched_cell_and_empty_input(backend):
    cell = np.eye(3)[None] * 3.0
    edges = periodic_radius_graph(np.zeros((0, 3)), cell, True, 2.0, backend=backend)
    assert edges.senders.shape == (0,) and edges.image_shifts.shape == (0, 3)


@pytest.mark.parametrize(
    "positions, cell, pbc, cutoff, match",
    [
        (np.zeros((2, 2)), np.eye(3), True, 1.0, "positions must have shape"),
        (np.full((2, 3), np.nan), np.eye(3), True, 1.0, "non-finite"),
        (np.zeros((2, 3)), np.eye(2), True, 1.0, "cell must have shape"),
        (np.zeros((2, 3)), np.eye(3), [True, True], 1.0, "pbc must be"),
        (np.zeros((2, 3)), np.eye(3), True, 0.0, "cutoff must be"),
        (np.zeros((2, 3)), np.eye(3), True, np.inf, "cutoff must be"),
        (np.zeros((2, 3)), np.diag([1.0, 1.0, 0.0]), True, 1.0, "linearly dependent"),
    ],
)
def test_invalid_input(positions, cell, pbc, cutoff, match, backend):
    with pytest.raises(PeriodicGraphError, match=match):
        periodic_radius_graph(positions, cell, pbc, cutoff, backend=backend)


def test_unknown_backend():
    with pytest.raises(PeriodicGraphError, match="backend must be one of"):
        periodic_radius_graph(np.zeros((2, 3)), np.eye(3), True, 1.0, backend="matscipy")


def test_adsorbate_slab_with_vacuum(backend):
    """An OC20-like system: adsorbate on a 3x3x3 fcc(111) slab, periodic in z across the vacuum."""
    from ase.build import add_adsorbate, fcc111

    atoms = fcc111("Pt", size=(3, 3, 3), vacuum=7.5)
    add_adsorbate(atoms, "O", 1.2, "fcc")
    atoms.rattle(0.05, seed=3)
    _check(atoms.positions, atoms.cell.array, [True, True, True], 5.0, backend)
