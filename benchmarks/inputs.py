"""The benchmark configurations and their input batches, as plain NumPy arrays.

Every model (ours and the earlier port) is timed on exactly these arrays: they are built here once,
in this project's environment, and handed to the peer worker through an ``.npz`` file.

Configurations (the reference hyper-parameters of the SEGNN paper, see ``shared/reference/SEGNN.md``):

- ``nbody``: charged N-body, batch 100 systems of 5 fully connected particles (500 nodes, 2,000 edges),
  hidden 32x0e+32x1o, 4 layers, input 2x1o+1x0e (centred position, velocity, speed), output 1x1o,
  extra message features [|r_ij|, q_i q_j], spherical harmonics up to l=1 ("integral"), node
  attributes = mean edge harmonics + harmonics of the velocity, MSE loss.
- ``qm9``: batch 128 QM9 molecules (seeded random sample of the installed set) with radius graphs at
  2 Angstrom, hidden 36x0e+36x1o+36x2e, 7 layers, instance norm, mean pooling, input one-hot H C N O F
  (5x0e), output 1x0e, extra |r_ij|^2, harmonics up to l=3 ("component"), L1 loss. Without the data,
  random molecule-like graphs of the same size statistics are used (recorded in the batch's ``source``).
- ``oc20``: an OC20-like IS2RE batch of 8 periodic adsorbate+slab systems: fcc(111) slabs of 8 metals
  (4x4 surface cell, 4 layers, 64 atoms) with a small adsorbate (2-4 atoms), periodic radius graph at
  a 6 Angstrom cutoff (the cutoff of the OC20 baselines; about 50-70 neighbours per metal atom),
  hidden 188x0e+61x1o (``weight_balanced_irreps(256, sh(2), lmax=1, sh=False)``), 6 layers, mean
  pooling, input a learned 256-dimensional embedding of the atomic number, extra |r_ij|^2, harmonics
  up to l=2 ("component"), L1 loss.

Each configuration also names the contraction order of its tensor products (the same function):
the faster one measured here: weights first for N-body and OC20 (training step and forward),
hybrid for QM9 (weights first in the training step, couple first in the forward). QM9 also names
the XLA options its experiment configs compile with (``config.train.compiler_options``: XLA's
legacy fusion emitters, faster to compile and to run there; ``segnn_jax/compile_options.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

CONFIGS: dict[str, dict] = {
    "nbody": {
        "hidden": "32x0e+32x1o",
        "layers": 4,
        "input": "2x1o+1x0e",
        "output": "1x1o",
        "extra": "2x0e",
        "lmax": 1,
        "sh_normalization": "integral",
        "task": "node",
        "pool": "avg",
        "norm": None,
        "loss": "mse",
        "n_graphs": 100,
        "contraction_order": "weights_first",
    },
    "qm9": {
        "hidden": "36x0e+36x1o+36x2e",
        "layers": 7,
        "input": "5x0e",
        "output": "1x0e",
        "extra": "1x0e",
        "lmax": 3,
        "sh_normalization": "component",
        "task": "graph",
        "pool": "avg",
        "norm": "instance",
        "loss": "l1",
        "n_graphs": 128,
        "cutoff": 2.0,
        "contraction_order": "hybrid",
        "edge_frame": True,
        "compiler_options": {"xla_cpu_use_fusion_emitters": False},
    },
    "oc20": {
        "hidden": "188x0e+61x1o",
        "layers": 6,
        "input": "embedding(Z)->256x0e",
        "output": "1x0e",
        "extra": "1x0e",
        "lmax": 2,
        "sh_normalization": "component",
        "task": "graph",
        "pool": "avg",
        "norm": None,
        "loss": "l1",
        "n_graphs": 8,
        "cutoff": 6.0,
        "embedding_dim": 256,
        "contraction_order": "weights_first",
    },
}


class UnknownConfigError(ValueError):
    """Raised for a configuration name not in :data:`CONFIGS`."""


def _concatenate(parts: list) -> dict[str, np.ndarray]:
    """Batches per-graph ``(positions, senders, receivers, shifts, extras)`` into one flat graph."""
    node_offset = 0
    out = {
        "positions": [],
        "senders": [],
        "receivers": [],
        "shifts": [],
        "n_node": [],
        "n_edge": [],
    }
    extras: dict[str, list] = {}
    for positions, senders, receivers, shifts, more in parts:
        out["positions"].append(positions)
        out["senders"].append(senders + node_offset)
        out["receivers"].append(receivers + node_offset)
        out["shifts"].append(shifts)
        out["n_node"].append(len(positions))
        out["n_edge"].append(len(senders))
        for key, value in more.items():
            extras.setdefault(key, []).append(value)
        node_offset += len(positions)
    batch = {
        "positions": np.concatenate(out["positions"]).astype(np.float32),
        "senders": np.concatenate(out["senders"]).astype(np.int32),
        "receivers": np.concatenate(out["receivers"]).astype(np.int32),
        "shifts": np.concatenate(out["shifts"]).astype(np.float32),
        "n_node": np.asarray(out["n_node"], np.int32),
        "n_edge": np.asarray(out["n_edge"], np.int32),
    }
    batch.update({key: np.concatenate(values) for key, values in extras.items()})
    return batch


def nbody_batch(n_graphs: int = 100, n_particles: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Charged N-body-like systems: Gaussian positions and velocities, charges +-1, fully connected."""
    from segnn_jax.graph import fully_connected_edges

    rng = np.random.default_rng(seed)
    senders, receivers = fully_connected_edges(n_particles)
    parts = []
    for _ in range(n_graphs):
        positions = rng.normal(size=(n_particles, 3))
        velocities = rng.normal(scale=0.5, size=(n_particles, 3))
        charges = rng.choice([-1.0, 1.0], size=(n_particles, 1))
        centred = positions - positions.mean(axis=0)
        speed = np.linalg.norm(velocities, axis=1, keepdims=True)
        features = np.concatenate([centred, velocities, speed], axis=1)  # 2x1o + 1x0e
        targets = positions + velocities * 0.1 + rng.normal(scale=0.05, size=positions.shape)
        parts.append(
            (
                positions,
                senders,
                receivers,
                np.zeros((len(senders), 3)),
                {
                    "velocities": velocities.astype(np.float32),
                    "charges": charges.astype(np.float32),
                    "features": features.astype(np.float32),
                    "targets": targets.astype(np.float32),
                },
            )
        )
    return _concatenate(parts)


def _molecule_like(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random molecule-like geometry: heavy atoms 1.2-1.6 A from an earlier one, H 1.0-1.1 A."""
    n_heavy = int(rng.integers(3, 10))
    n_h = int(rng.integers(0, 2 * n_heavy + 3))
    positions, numbers = [np.zeros(3)], [6]
    while len(positions) < n_heavy + n_h:
        heavy = len(positions) < n_heavy
        anchor = positions[int(rng.integers(0, min(len(positions), n_heavy)))]
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        candidate = anchor + direction * (rng.uniform(1.2, 1.6) if heavy else rng.uniform(1.0, 1.1))
        if min(np.linalg.norm(candidate - p) for p in positions) > 0.95:
            positions.append(candidate)
            numbers.append(int(rng.choice([6, 7, 8, 9], p=[0.7, 0.12, 0.15, 0.03])) if heavy else 1)
    return np.asarray(positions), np.asarray(numbers)


def qm9_batch(
    n_graphs: int = 128, cutoff: float = 2.0, seed: int = 0, use_data: bool = True
) -> tuple[dict[str, np.ndarray], str]:
    """QM9 molecules (a seeded sample of the installed data) or molecule-like stand-ins.

    Args:
        n_graphs: molecules in the batch.
        cutoff: radius graph cutoff in Angstrom.
        seed: of the sample (or of the stand-ins).
        use_data: False skips the data and always builds stand-ins.

    Returns:
        ``(batch, source)`` with source ``"qm9"`` or ``"random molecule-like graphs"``.
    """
    from segnn_jax.datasets import qm9
    from segnn_jax.graph import radius_graph_edges

    rng = np.random.default_rng(seed)
    molecules = None
    if use_data:
        try:
            molecules = qm9.load_qm9()
        except qm9.QM9DataNotFoundError:
            pass
    parts = []
    if molecules is not None:
        chosen = np.sort(rng.choice(len(molecules), size=n_graphs, replace=False))
        for graph in qm9.molecules_to_graphs(molecules.subset(chosen), cutoff=cutoff):
            n_edge = len(graph.senders)
            parts.append(
                (
                    graph.nodes["positions"],
                    graph.senders,
                    graph.receivers,
                    np.zeros((n_edge, 3)),
                    {
                        "features": graph.nodes["features"],
                        "targets": rng.normal(size=(1, 1)).astype(np.float32),
                    },
                )
            )
        return _concatenate(parts), "qm9"
    for _ in range(n_graphs):
        positions, numbers = _molecule_like(rng)
        senders, receivers = radius_graph_edges(positions, cutoff)
        parts.append(
            (
                positions,
                senders,
                receivers,
                np.zeros((len(senders), 3)),
                {
                    "features": qm9.one_hot_elements(numbers),
                    "targets": rng.normal(size=(1, 1)).astype(np.float32),
                },
            )
        )
    return _concatenate(parts), "random molecule-like graphs"


OC20_METALS = ("Cu", "Pt", "Ag", "Pd", "Au", "Ni", "Rh", "Al")
OC20_ADSORBATES = ("CO", "OH", "CH3", "NH2", "H2O", "CH", "N2", "CO2")  # ASE g2 names


def oc20_batch(n_graphs: int = 8, cutoff: float = 6.0, seed: int = 0) -> dict[str, np.ndarray]:
    """OC20-like periodic systems: 4x4x4 fcc(111) slabs (10 A vacuum) with an adsorbate on top."""
    from ase.build import add_adsorbate, fcc111, molecule

    from segnn_jax.periodic import periodic_radius_graph

    rng = np.random.default_rng(seed)
    parts = []
    for index in range(n_graphs):
        slab = fcc111(OC20_METALS[index % len(OC20_METALS)], size=(4, 4, 4), vacuum=10.0)
        adsorbate = molecule(OC20_ADSORBATES[index % len(OC20_ADSORBATES)])
        add_adsorbate(slab, adsorbate, height=rng.uniform(1.5, 2.2), position="fcc")
        slab.rattle(stdev=0.05, seed=seed + index)
        edges = periodic_radius_graph(slab.positions, slab.cell.array, slab.pbc, cutoff)
        parts.append(
            (
                slab.positions,
                edges.senders,
                edges.receivers,
                edges.shifts_cartesian,
                {
                    "atomic_numbers": slab.numbers.astype(np.int32),
                    "targets": rng.normal(size=(1, 1)).astype(np.float32),
                },
            )
        )
    return _concatenate(parts)


def build(name: str, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """The input batch and settings of configuration ``name``.

    Returns:
        ``(arrays, spec)``: ``arrays`` has ``positions [N, 3]``, ``senders [E]``, ``receivers [E]``,
        ``shifts [E, 3]`` (Cartesian periodic offsets, zero when not periodic), ``n_node [G]``,
        ``n_edge [G]``, ``targets`` (``[N, 3]`` node task, ``[G, 1]`` graph task) and the
        configuration's node inputs (``features``, ``velocities``/``charges`` or ``atomic_numbers``);
        ``spec`` is the configuration's settings plus ``source``.
    """
    if name not in CONFIGS:
        raise UnknownConfigError(f"unknown configuration {name!r}; choose from {sorted(CONFIGS)}")
    spec = dict(CONFIGS[name], name=name)
    if name == "nbody":
        arrays, spec["source"] = nbody_batch(spec["n_graphs"], seed=seed), "random charged systems"
    elif name == "qm9":
        arrays, spec["source"] = qm9_batch(spec["n_graphs"], spec["cutoff"], seed=seed)
    else:
        arrays = oc20_batch(spec["n_graphs"], spec["cutoff"], seed=seed)
        spec["source"] = "ase fcc(111) slabs + adsorbates, periodic radius graph"
    return arrays, spec


def build_or_load(name: str, batches: Optional[Path] = None) -> tuple[dict[str, np.ndarray], dict]:
    """:func:`build`, or the batch saved as ``batches/NAME.npz`` by this module's command line.

    Saved batches let a machine without the QM9 data or ASE (an accelerator node, say) time
    exactly the batches built here.

    Raises:
        FileNotFoundError: ``batches`` is given but holds no batch of that name.
    """
    if batches is None:
        return build(name)
    path = Path(batches) / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no saved batch {path}; write it with "
                                f"'python benchmarks/inputs.py --save {batches} --configs {name}'")
    return load(path)


def save(path: Path, arrays: dict[str, np.ndarray], spec: dict) -> None:
    """Writes a batch for another process: plain arrays plus the spec as a JSON string (no pickle)."""
    np.savez(path, __spec__=np.asarray(json.dumps(spec)), **arrays)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Reads what :func:`save` wrote (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as data:
        spec = json.loads(str(data["__spec__"]))
        arrays = {key: data[key] for key in data.files if key != "__spec__"}
    return arrays, spec


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the benchmark batches as .npz files.")
    parser.add_argument("--save", type=Path, required=True, help="folder to write NAME.npz into")
    parser.add_argument("--configs", nargs="+", default=sorted(CONFIGS), choices=sorted(CONFIGS))
    args = parser.parse_args(argv)
    args.save.mkdir(parents=True, exist_ok=True)
    for name in args.configs:
        arrays, spec = build(name)
        save(args.save / f"{name}.npz", arrays, spec)
        print(f"{name}: {len(arrays['positions'])} nodes, {len(arrays['senders'])} edges, "
              f"source: {spec['source']}")


if __name__ == "__main__":
    if str(Path(__file__).resolve().parent.parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
