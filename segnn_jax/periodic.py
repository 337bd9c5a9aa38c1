"""Radius graphs under periodic boundary conditions (host side, NumPy).

The neighbour search is delegated to ASE's ``primitive_neighbor_list`` (a
binned, well-tested implementation) rather than written here. This module only
validates the input, converts ASE's conventions to the project's graph
conventions and orders the edges deterministically.

Convention (same as ``segnn_jax.graph``): a message flows from ``senders`` (j)
to ``receivers`` (i) and the relative vector of an edge is::

    r_ij = positions[senders] - positions[receivers] + shifts_cartesian

with ``shifts_cartesian = image_shifts @ cell``: the sender is taken in the
periodic image translated by the integer combination ``image_shifts`` of the
cell vectors (rows of ``cell``). Several edges may connect the same pair of
atoms through different images (cells smaller than the cutoff), and an atom may
be its own neighbour through a non-zero image; only the self-pair at zero shift
is excluded. An edge exists when ``|r_ij| < cutoff`` (strict).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from ase.neighborlist import primitive_neighbor_list

__all__ = ["PeriodicEdges", "PeriodicGraphError", "periodic_radius_graph"]


class PeriodicGraphError(ValueError):
    """Raised when positions, cell, pbc flags or the cutoff are invalid."""


class PeriodicEdges(NamedTuple):
    """Edges of a periodic radius graph.

    Attributes:
        senders: [n_edges] int32, index j of the source atom.
        receivers: [n_edges] int32, index i of the destination atom.
        image_shifts: [n_edges, 3] int32, integer image offset of the sender in
            units of the cell vectors.
        shifts_cartesian: [n_edges, 3] float64, ``image_shifts @ cell`` (Angstrom
            or whatever unit the positions use).
    """

    senders: np.ndarray
    receivers: np.ndarray
    image_shifts: np.ndarray
    shifts_cartesian: np.ndarray

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """Relative vectors r_ij = x_j - x_i + shift, shape [n_edges, 3]."""
        positions = np.asarray(positions, dtype=np.float64)
        return positions[self.senders] - positions[self.receivers] + self.shifts_cartesian


def _validate(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise PeriodicGraphError(f"positions must have shape [n_atoms, 3], got {positions.shape}")
    if not np.all(np.isfinite(positions)):
        raise PeriodicGraphError("positions contain non-finite values")
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape == (1, 3, 3):
        # The legacy OC20 LMDB stores the cell with a leading batch axis.
        cell = cell[0]
    if cell.shape != (3, 3):
        raise PeriodicGraphError(
            f"cell must have shape [3, 3] (rows = cell vectors), got {cell.shape}"
        )
    if not np.all(np.isfinite(cell)):
        raise PeriodicGraphError("cell contains non-finite values")
    pbc_arr = np.asarray(pbc)
    if pbc_arr.shape == ():
        pbc_arr = np.full(3, bool(pbc_arr))
    if pbc_arr.shape != (3,):
        raise PeriodicGraphError(f"pbc must be a bool or have shape [3], got {pbc_arr.shape}")
    pbc_arr = pbc_arr.astype(bool)
    cutoff = float(cutoff)
    if not np.isfinite(cutoff) or cutoff <= 0.0:
        raise PeriodicGraphError(f"cutoff must be a positive finite number, got {cutoff}")
    periodic = cell[pbc_arr]
    if len(periodic) and np.linalg.matrix_rank(
        periodic, tol=1e-8 * max(1.0, np.abs(cell).max())
    ) < len(periodic):
        # A degenerate periodic vector would mean infinitely many images within the cutoff.
        raise PeriodicGraphError(
            f"the periodic cell vectors {periodic.tolist()} are linearly dependent"
        )
    return positions, cell, pbc_arr, cutoff


def periodic_radius_graph(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray | bool, cutoff: float
) -> PeriodicEdges:
    """All pairs (i, j, image) with |x_j - x_i + shift| < cutoff.

    Positions need not be wrapped into the cell. Along non-periodic directions
    the corresponding cell vector is ignored (it may be zero).

    Args:
        positions: [n_atoms, 3] Cartesian positions.
        cell: [3, 3] cell vectors as rows (``[1, 3, 3]`` is accepted as well).
        pbc: [3] periodicity flags per cell vector, or one bool for all three.
        cutoff: radius of the neighbourhood, > 0.

    Returns:
        PeriodicEdges sorted by (receiver, sender, image shift).

    Raises:
        PeriodicGraphError: on malformed input or linearly dependent periodic
            cell vectors.
    """
    positions, cell, pbc_arr, cutoff = _validate(positions, cell, pbc, cutoff)
    if len(positions) == 0:
        empty = np.zeros(0, dtype=np.int32)
        return PeriodicEdges(empty, empty.copy(), np.zeros((0, 3), np.int32), np.zeros((0, 3)))
    # ASE's i is the centre atom and j the neighbour with D = x_j - x_i + S @ cell, i.e.
    # ASE's (i, j, S) is our (receiver, sender, image shift).
    i, j, shifts = primitive_neighbor_list(
        "ijS", pbc_arr, cell, positions, cutoff, self_interaction=False, use_scaled_positions=False
    )
    shifts = shifts.astype(np.int32)
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
    receivers = i[order].astype(np.int32)
    senders = j[order].astype(np.int32)
    shifts = shifts[order]
    return PeriodicEdges(senders, receivers, shifts, shifts.astype(np.float64) @ cell)
