"""Figures from real data: QM9 graph statistics against the cutoff, steerable-feature glyphs, and
the learning curves and parity plots of a trained run.

Each figure has a data function (pure NumPy/JAX, tested) and a plotting function (matplotlib, an
optional dependency imported only when plotting, with the Agg backend). The command::

    python -m segnn_jax.plots qm9-messages --out benchmarks/results/qm9_messages_vs_cutoff.png
    python -m segnn_jax.plots glyph        --out benchmarks/results/glyph_rotation.png
    python -m segnn_jax.plots run RUN_DIR  --out benchmarks/results/nbody_charged_paper_parity.png

writes each PNG with a JSON of the plotted numbers beside it (same stem, ``.json``), holding the
``command`` and ``git_revision`` that produced it.

Shape letters: M molecules, A atoms, n atoms of one molecule, K cutoffs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = [
    "GLYPH_IRREPS",
    "MissingMatplotlibError",
    "glyph_data",
    "learning_curves",
    "main",
    "message_statistics",
    "minimum_connecting_cutoff",
    "parity_summary",
    "plot_glyphs",
    "plot_message_statistics",
    "plot_run",
    "random_rotation",
    "run_figure_data",
    "sphere_grid",
]

PathLike = Union[str, Path]


class MissingMatplotlibError(ImportError):
    """Plotting needs matplotlib, which is not installed."""


def _pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (figures are only written)."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingMatplotlibError(
            "segnn_jax.plots needs matplotlib to draw figures: pip install 'matplotlib>=3.7' "
            "(or the package's [experiments] extra); the *_data functions work without it") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------------
# a. Messages per atom and disconnected molecules against the cutoff (QM9)


def _size_blocks(molecules, chunk: int):
    """Yields squared distances ``[m, n, n]`` (float64, diagonal +inf) of molecules of equal size
    n, computed as :func:`segnn_jax.datasets.qm9.radius_edges` does, so that comparing them with
    the squared cutoff gives exactly the task's edges."""
    offsets = molecules.offsets
    for size in np.unique(molecules.n_atoms):
        members = np.nonzero(molecules.n_atoms == size)[0]
        for start in range(0, len(members), chunk):
            block = members[start:start + chunk]
            pos = molecules.positions[offsets[block][:, None] + np.arange(size)]  # [m, n, 3]
            diff = pos[:, None, :, :] - pos[:, :, None, :]
            squared = np.einsum("mijk,mijk->mij", diff, diff)
            squared[:, np.arange(size), np.arange(size)] = np.inf
            yield squared


def minimum_connecting_cutoff(distances: np.ndarray) -> np.ndarray:
    """The longest edge of each molecule's minimum spanning tree (Prim's algorithm, vectorised).

    A radius graph with edges ``d < r`` is connected exactly when ``r`` exceeds this length, so one
    pass gives connectivity at every cutoff. The tree depends only on the order of the distances,
    so squared distances give the squared length.

    Args:
        distances: ``[m, n, n]`` pairwise distances of m molecules of n atoms (diagonal ignored).

    Returns:
        ``[m]`` float64; 0 for single atoms.
    """
    m, n = distances.shape[:2]
    rows = np.arange(m)
    in_tree = np.zeros((m, n), bool)
    in_tree[:, 0] = True
    to_tree = distances[:, 0, :].copy()  # distance of every atom to the tree
    longest = np.zeros(m)
    for _ in range(n - 1):
        candidates = np.where(in_tree, np.inf, to_tree)
        nearest = np.argmin(candidates, axis=1)
        longest = np.maximum(longest, candidates[rows, nearest])
        in_tree[rows, nearest] = True
        to_tree = np.minimum(to_tree, distances[rows, nearest, :])
    return longest


def message_statistics(molecules, cutoffs: Sequence[float], *,
                       chunk: int = 2048) -> Dict[str, Any]:
    """Messages (incoming radius-graph edges) per atom and connectivity against the cutoff.

    Edges are those of the task's radius graph (:func:`segnn_jax.datasets.qm9.radius_edges`):
    distinct atoms closer than the cutoff, strictly.

    Args:
        molecules: :class:`segnn_jax.datasets.qm9.QM9Molecules`.
        cutoffs: K radii in Angstrom.
        chunk: molecules per vectorised block.

    Returns:
        Lists of K values: ``mean_messages_per_atom`` and ``std_messages_per_atom`` (over all
        atoms), ``mean_messages_per_molecule``, ``fraction_disconnected`` (molecules whose graph
        is not connected), ``fraction_with_isolated_atom``; ``all_connected_above``, the
        cutoff above which every molecule is connected; and ``cutoffs``, ``n_molecules``,
        ``n_atoms``.
    """
    cutoffs = np.asarray(cutoffs, np.float64)
    if cutoffs.ndim != 1 or not np.all(cutoffs > 0):
        raise ValueError(f"cutoffs must be a list of positive radii, got {cutoffs.tolist()}")
    degree_sum = np.zeros(len(cutoffs), np.int64)
    degree_sq_sum = np.zeros(len(cutoffs), np.int64)
    spanning, farthest_nearest = [], []  # squared lengths per molecule
    for squared in _size_blocks(molecules, chunk):
        for k, cutoff in enumerate(cutoffs):
            degrees = np.count_nonzero(squared < cutoff**2, axis=-1)  # [m, n] messages per atom
            degree_sum[k] += degrees.sum()
            degree_sq_sum[k] += np.sum(degrees.astype(np.int64) ** 2)
        spanning.append(minimum_connecting_cutoff(squared))
        # An atom is isolated when even its nearest neighbour is at or beyond the cutoff (a lone
        # atom always: its only distance is the +inf diagonal).
        farthest_nearest.append(squared.min(axis=-1).max(axis=-1))
    n_atoms, n_molecules = int(molecules.n_atoms.sum()), len(molecules)
    if n_molecules == 0:
        raise ValueError("no molecules")
    spanning = np.concatenate(spanning)
    farthest_nearest = np.concatenate(farthest_nearest)
    mean = degree_sum / n_atoms
    std = np.sqrt(np.maximum(degree_sq_sum / n_atoms - mean**2, 0.0))
    return {
        "cutoffs": cutoffs.tolist(),
        "n_molecules": n_molecules,
        "n_atoms": n_atoms,
        "mean_messages_per_atom": mean.tolist(),
        "std_messages_per_atom": std.tolist(),
        "mean_messages_per_molecule": (degree_sum / n_molecules).tolist(),
        "fraction_disconnected": [float(np.mean(spanning >= c**2)) for c in cutoffs],
        # Every molecule's graph is connected for cutoffs above this, any grid aside.
        "all_connected_above": float(np.sqrt(spanning.max())),
        "fraction_with_isolated_atom": [float(np.mean(farthest_nearest >= c**2))
                                        for c in cutoffs],
    }


def plot_message_statistics(stats: Mapping[str, Any], path: PathLike, *,
                            title: str = "QM9 training split") -> Path:
    """Two panels against the cutoff: messages per atom (mean +- std) and disconnected molecules."""
    plt = _pyplot()
    cutoffs = np.asarray(stats["cutoffs"])
    mean = np.asarray(stats["mean_messages_per_atom"])
    std = np.asarray(stats["std_messages_per_atom"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    left.plot(cutoffs, mean, color="C0", label="mean")
    left.fill_between(cutoffs, mean - std, mean + std, color="C0", alpha=0.25, label="± 1 std")
    left.set_xlabel("cutoff radius (Å)")
    left.set_ylabel("messages per atom (incoming edges)")
    left.grid(alpha=0.3)
    left.legend(loc="upper left")
    right.plot(cutoffs, 100 * np.asarray(stats["fraction_disconnected"]), color="C3",
               label="graph not connected")
    right.plot(cutoffs, 100 * np.asarray(stats["fraction_with_isolated_atom"]), color="C1",
               ls="--", label="with an isolated atom")
    right.set_xlabel("cutoff radius (Å)")
    right.set_ylabel("molecules (%)")
    right.set_yscale("symlog", linthresh=0.01)
    right.grid(alpha=0.3)
    right.legend(loc="upper right")
    fig.suptitle(f"{title}: {stats['n_molecules']:,} molecules, {stats['n_atoms']:,} atoms")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# b. Glyphs of steerable features before and after a rotation of the input


# One function on the sphere, f(x) = sum_l c_l . Y_l(x); no l = 0 part, which would only add a
# rotation-invariant sphere to the glyph.
GLYPH_IRREPS = "1x1o+1x2e"


def random_rotation(seed: int) -> np.ndarray:
    """A uniformly random proper rotation matrix ``[3, 3]`` (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def sphere_grid(resolution: int) -> np.ndarray:
    """Unit vectors ``[resolution, 2 resolution, 3]`` on a closed latitude-longitude grid (poles
    and the 0 = 2 pi meridian included, so that a surface drawn on it has no gap)."""
    polar = np.linspace(0.0, np.pi, resolution)[:, None]
    azimuth = np.linspace(0.0, 2 * np.pi, 2 * resolution)[None, :]
    return np.stack(np.broadcast_arrays(np.sin(polar) * np.cos(azimuth),
                                        np.sin(polar) * np.sin(azimuth), np.cos(polar)), axis=-1)


def _sphere_values(coefficients: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``f(x) = sum_lm c_lm Y_lm(x)`` at unit vectors ``[..., 3]`` (e3nn's "component"
    spherical harmonics, the convention of ``e3nn.to_s2grid(..., normalization="integral")``)."""
    import e3nn_jax as e3nn

    sh = e3nn.spherical_harmonics(GLYPH_IRREPS, np.asarray(vectors, np.float32), normalize=True,
                                  normalization="component")
    return np.asarray(np.sum(np.asarray(sh.array) * coefficients, axis=-1), np.float64)


def glyph_data(atomic_numbers: np.ndarray, positions: np.ndarray, rotation: np.ndarray, *,
               node: Optional[int] = None, cutoff: float = 2.0, seed: int = 0,
               hidden_irreps: str = "4x0e+2x1o+2x2e", num_layers: int = 2,
               resolution: int = 40) -> Dict[str, Any]:
    """One node's steerable output of a small SEGNN on a molecule, as a function on the sphere,
    for the molecule as given and rotated.

    The network is the QM9 task's featurisation (:func:`segnn_jax.tasks.qm9.featurize`, attributes
    up to l = 2) and a node-level SEGNN (:func:`segnn_jax.tasks.models.create_model`) with randomly
    initialised weights (``seed``) and output irreps :data:`GLYPH_IRREPS`. Equivariance means the
    function computed from the rotated molecule is the original one rotated:
    ``f_rotated(x) = f(R^T x)``.

    Args:
        atomic_numbers: ``[n]`` of H, C, N, O, F.
        positions: ``[n, 3]`` Angstrom.
        rotation: ``[3, 3]`` proper rotation, applied about the molecule's centroid.
        node: the atom to show; default the one receiving the most messages.
        cutoff: radius graph cutoff (Angstrom).
        seed: initialisation of the weights.
        hidden_irreps, num_layers: the network.
        resolution: grid points in polar angle (twice as many in azimuth; :func:`sphere_grid`).

    Returns:
        ``positions`` and ``rotated_positions`` ``[n, 3]``, ``atomic_numbers``, ``node``,
        ``coefficients`` and ``rotated_coefficients`` (the node's output ``[8]``), ``directions``
        ``[b, a, 3]`` (unit grid vectors), ``values`` and ``rotated_values`` ``[b, a]`` (the two
        functions on the grid), and ``equivariance_error``: the largest
        ``|f_rotated(x) - f(R^T x)|`` on the grid relative to ``max |f|``.
    """
    import haiku as hk
    import jax

    from segnn_jax.datasets import qm9 as qm9_data
    from segnn_jax.tasks import models
    from segnn_jax.tasks.qm9 import featurize

    atomic_numbers = np.asarray(atomic_numbers)
    positions = np.asarray(positions, np.float64)
    rotation = np.asarray(rotation, np.float64)
    if rotation.shape != (3, 3) or not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6) \
            or not np.isclose(np.linalg.det(rotation), 1.0, atol=1e-6):
        raise ValueError("rotation must be a proper 3x3 rotation matrix")
    centroid = positions.mean(axis=0)
    rotated_positions = (positions - centroid) @ rotation.T + centroid
    model_config = {"hidden_irreps": hidden_irreps, "lmax_attr": 2, "num_layers": num_layers,
                    "task": "node"}
    factory = models.create_model(model_config, output_irreps=GLYPH_IRREPS)

    def graph_of(pos):
        molecule = qm9_data.QM9Molecules(atomic_numbers, pos, [len(atomic_numbers)], [0],
                                         np.zeros((1, len(qm9_data.PROPERTY_NAMES))))
        return qm9_data.molecules_to_graphs(molecule, cutoff=cutoff)[0]

    graph, rotated_graph = graph_of(positions), graph_of(rotated_positions)
    if node is None:
        node = int(np.argmax(np.bincount(graph.receivers, minlength=len(atomic_numbers))))
    if not 0 <= node < len(atomic_numbers):
        raise ValueError(f"node must be in [0, {len(atomic_numbers)}), got {node}")
    model = hk.without_apply_rng(hk.transform_with_state(
        lambda g: factory()(featurize(g, lmax_attr=2), False).array))

    @jax.jit  # one compilation for initialisation and both evaluations
    def outputs(key, graph, rotated_graph):
        params, state = model.init(key, graph)
        return model.apply(params, state, graph)[0], model.apply(params, state, rotated_graph)[0]

    original, rotated = outputs(jax.random.PRNGKey(seed), graph, rotated_graph)
    coefficients = np.asarray(original[node], np.float64)
    rotated_coefficients = np.asarray(rotated[node], np.float64)
    directions = sphere_grid(resolution)
    values = _sphere_values(coefficients, directions)
    rotated_values = _sphere_values(rotated_coefficients, directions)
    expected = _sphere_values(coefficients, directions @ rotation)  # f(R^T x), row vectors
    scale = max(float(np.abs(values).max()), 1e-30)
    return {
        "atomic_numbers": atomic_numbers,
        "positions": positions,
        "rotated_positions": rotated_positions,
        "rotation": rotation,
        "node": node,
        "irreps": GLYPH_IRREPS,
        "coefficients": coefficients,
        "rotated_coefficients": rotated_coefficients,
        "directions": directions,
        "values": values,
        "rotated_values": rotated_values,
        "equivariance_error": float(np.abs(rotated_values - expected).max() / scale),
    }


_ELEMENT_COLOURS = {1: "#d9d9d9", 6: "#404040", 7: "#3050f8", 8: "#ff0d0d", 9: "#90e050"}


def _draw_glyph(ax, positions, atomic_numbers, node, directions, values, size, limits):
    """A molecule (atoms, bonds under 1.6 Angstrom) and, at ``node``, the glyph: the surface
    ``|f(x)| x`` scaled to ``size``, red where f > 0 and blue where f < 0."""
    from matplotlib import cm, colors

    for i in range(len(positions)):
        for j in range(i + 1, len(positions)):
            if np.linalg.norm(positions[i] - positions[j]) < 1.6:
                ax.plot(*zip(positions[i], positions[j]), color="0.6", lw=1.5, zorder=1)
    ax.scatter(*positions.T, s=[60 if z == 1 else 140 for z in atomic_numbers],
               c=[_ELEMENT_COLOURS.get(int(z), "m") for z in atomic_numbers],
               edgecolors="k", linewidths=0.5, depthshade=False, alpha=0.5)
    surface = positions[node] + size * np.abs(values)[..., None] * directions
    norm = colors.TwoSlopeNorm(vmin=-1.0, vcenter=0.0, vmax=1.0)
    ax.plot_surface(*np.moveaxis(surface, -1, 0), facecolors=cm.coolwarm(norm(values)),
                    linewidth=0, antialiased=True, shade=False, alpha=0.95)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_zlim(*limits[2])
    ax.set_box_aspect((1, 1, 1))
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    ax.set_zlabel("z (Å)")


def plot_glyphs(data: Mapping[str, Any], path: PathLike, *, title: str = "") -> Path:
    """The molecule and the glyph of one node's features, as given and rotated, side by side."""
    plt = _pyplot()
    scale = float(np.abs(data["values"]).max()) or 1.0
    everything = np.concatenate([data["positions"], data["rotated_positions"]])
    centre = everything.mean(axis=0)
    half = 0.5 * float(np.ptp(everything, axis=0).max()) + 1.0
    limits = [(c - half, c + half) for c in centre]
    fig = plt.figure(figsize=(11, 5.5), dpi=120)
    panels = (("positions", "values", "input molecule"),
              ("rotated_positions", "rotated_values", "rotated input molecule"))
    for k, (positions_key, values_key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        ax.view_init(elev=20, azim=-60)
        _draw_glyph(ax, np.asarray(data[positions_key]), data["atomic_numbers"], data["node"],
                    data["directions"], np.asarray(data[values_key]) / scale, 1.2, limits)
        ax.set_title(f"{label}: glyph of atom {data['node']}")
    fig.suptitle((title + "\n" if title else "") + f"f(x) from the {data['irreps']} output of "
                 f"the atom; relative equivariance error {data['equivariance_error']:.1e}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# c. Learning curves and parity plots of a trained run


def learning_curves(events: Sequence[Mapping[str, Any]], metric: str) -> Dict[str, Any]:
    """``{split: {"step": [...], metric: [...]}}`` from a run's metrics events: "train" (the logged
    training windows) and every evaluated split, plus ``best`` (the summary's best step) if any."""
    curves: Dict[str, Dict[str, list]] = {}
    best = None
    for event in events:
        kind = event.get("event")
        if kind in ("train", "eval") and isinstance(event.get(metric), (int, float)):
            split = "train" if kind == "train" else str(event.get("split"))
            curve = curves.setdefault(split, {"step": [], metric: []})
            curve["step"].append(int(event["step"]))
            curve[metric].append(float(event[metric]))
        elif kind == "summary" and isinstance(event.get("best"), Mapping):
            best = {"step": event["best"].get("step"), "epoch": event["best"].get("epoch")}
    return {"metric": metric, "curves": curves, "best": best}


def parity_summary(predicted: np.ndarray, target: np.ndarray) -> Dict[str, float]:
    """MSE, MAE, the coefficient of determination R^2 and the count of predicted-vs-true pairs."""
    predicted = np.asarray(predicted, np.float64).ravel()
    target = np.asarray(target, np.float64).ravel()
    if predicted.shape != target.shape or predicted.size == 0:
        raise ValueError(f"predicted and target must be non-empty and alike, got {predicted.shape} "
                         f"and {target.shape}")
    error = predicted - target
    variance = np.sum((target - target.mean()) ** 2)
    return {"count": int(predicted.size), "mse": float(np.mean(error**2)),
            "mae": float(np.mean(np.abs(error))),
            "r2": float(1.0 - np.sum(error**2) / variance) if variance > 0 else float("nan")}


_CURVE_METRIC = {"nbody": "loss", "qm9": "mae"}


def run_figure_data(run_dir: PathLike, split: str = "test") -> Dict[str, Any]:
    """Learning curves and best-checkpoint predictions on a split of any N-body or QM9 run.

    The parameters come from the run's best checkpoint through the library's restore path
    (:meth:`segnn_jax.artifact.TrainedModel.from_run`); predictions and targets from
    :func:`segnn_jax.tasks.inference.split_outputs` (which reads or regenerates the split's data).

    Returns:
        ``task``, ``split``, ``checkpoint_step``, ``learning_curves`` (:func:`learning_curves`),
        ``predicted`` / ``target`` arrays (and N-body ``inputs``), ``quantity``, ``unit``, and
        ``parity``: :func:`parity_summary` of the predictions (N-body also ``parity_displacement``,
        of the displacements from the input positions, which is what the network learns).
    """
    from segnn_jax.artifact import TrainedModel
    from segnn_jax.tasks import inference
    from segnn_jax.training import read_metrics

    model = TrainedModel.from_run(run_dir)
    outputs = inference.split_outputs(model, split)
    data = {"task": model.task, "split": split, "run_dir": str(Path(run_dir).resolve()),
            "checkpoint_step": model.info["checkpoint_step"],
            "learning_curves": learning_curves(read_metrics(run_dir),
                                               _CURVE_METRIC.get(model.task, "loss")),
            **outputs, "parity": parity_summary(outputs["predicted"], outputs["target"])}
    if "inputs" in outputs:
        data["parity_displacement"] = parity_summary(outputs["predicted"] - outputs["inputs"],
                                                     outputs["target"] - outputs["inputs"])
    return data


def _parity_panel(ax, predicted, target, label, summary):
    predicted, target = np.ravel(predicted), np.ravel(target)
    ax.scatter(target, predicted, s=2, alpha=0.25, color="C0", rasterized=True)
    low, high = float(min(target.min(), predicted.min())), float(max(target.max(),
                                                                     predicted.max()))
    ax.plot([low, high], [low, high], color="k", lw=0.8, ls="--")
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.text(0.03, 0.97, f"MSE {summary['mse']:.3g}\nMAE {summary['mae']:.3g}\n"
            f"R² {summary['r2']:.4f}\nn = {summary['count']:,}", transform=ax.transAxes,
            va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})


def plot_run(data: Mapping[str, Any], path: PathLike, *, title: str = "") -> Path:
    """Learning curves beside the parity plot(s) of :func:`run_figure_data`."""
    plt = _pyplot()
    displacement = "parity_displacement" in data
    fig, axes = plt.subplots(1, 3 if displacement else 2, figsize=(15 if displacement else 10, 4.5),
                             dpi=120)
    curves = data["learning_curves"]
    metric = curves["metric"]
    ax = axes[0]
    for split, curve in curves["curves"].items():
        ax.plot(curve["step"], curve[metric], lw=0.8 if split == "train" else 1.2,
                alpha=0.6 if split == "train" else 1.0, label=split)
    if curves["best"] and curves["best"].get("step") is not None:
        ax.axvline(curves["best"]["step"], color="k", lw=0.8, ls=":",
                   label=f"best validation (step {curves['best']['step']})")
    values = [v for c in curves["curves"].values() for v in c[metric]]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("learning curves")
    unit = f" ({data['unit']})" if data.get("unit") else ""
    _parity_panel(axes[1], data["predicted"], data["target"], f"{data['quantity']}{unit}",
                  data["parity"])
    axes[1].set_title(f"{data['split']} split, best checkpoint (step {data['checkpoint_step']})")
    if displacement:
        inputs = np.asarray(data["inputs"])
        _parity_panel(axes[2], np.asarray(data["predicted"]) - inputs,
                      np.asarray(data["target"]) - inputs, "displacement",
                      data["parity_displacement"])
        axes[2].set_title("displacement from the input position")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# The command


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_json(path: Path, payload: Mapping[str, Any], command: str) -> Path:
    from segnn_jax.training import git_revision

    record = {"command": command, "git_revision": git_revision(), **payload}
    path.write_text(json.dumps(_jsonable(record), indent=1) + "\n")
    return path


def _qm9_training_molecules(source: Optional[str]):
    from segnn_jax.datasets import qm9 as qm9_data

    molecules = qm9_data.load_qm9(source)
    return qm9_data.split_molecules(molecules)["train"]


def _cmd_qm9_messages(args, command: str) -> None:
    cutoffs = np.round(np.arange(args.min_cutoff, args.max_cutoff + 1e-9, args.step), 6)
    train = _qm9_training_molecules(args.source)
    start = time.process_time()
    stats = message_statistics(train, cutoffs)
    stats["cpu_seconds"] = round(time.process_time() - start, 1)  # one core, data loading aside
    out = Path(args.out)
    plot_message_statistics(stats, out)
    _write_json(out.with_suffix(".json"), {
        "description": "Radius graphs (edges between distinct atoms closer than the cutoff) of "
                       "the QM9 training split (Cormorant split, 100,000 molecules): messages "
                       "(incoming edges) per atom, mean and standard deviation over all atoms; "
                       "molecules whose graph is not connected; molecules with an isolated atom",
        "figure": out.name, **stats}, command)
    print(f"wrote {out} and {out.with_suffix('.json')}")


def _cmd_glyph(args, command: str) -> None:
    from segnn_jax.datasets import qm9 as qm9_data

    molecules = qm9_data.load_qm9(args.source)
    found = np.nonzero(molecules.index == args.qm9_index)[0]
    if not len(found):
        raise SystemExit(f"QM9 index {args.qm9_index} is not in the data")
    numbers, positions = molecules.molecule(int(found[0]))
    data = glyph_data(numbers, positions, random_rotation(args.rotation_seed), node=args.node,
                      seed=args.seed)
    out = Path(args.out)
    plot_glyphs(data, out, title=f"QM9 molecule {args.qm9_index}, SEGNN with random weights "
                                 f"(seed {args.seed}), input rotated by a random rotation")
    keep = ("atomic_numbers", "positions", "rotated_positions", "rotation", "node", "irreps",
            "coefficients", "rotated_coefficients", "equivariance_error")
    _write_json(out.with_suffix(".json"), {
        "description": "One atom's 1x1o+1x2e output of a 2-layer SEGNN (random weights) on a QM9 "
                       "molecule, drawn as the glyph r(x) = |f(x)| x, f(x) = sum_l c_l . Y_l(x) "
                       "(red f > 0, blue f < 0), for the molecule as given and rotated about its "
                       "centroid; equivariance_error = max |f_rotated(x) - f(R^T x)| / max |f| "
                       "on the grid",
        "figure": out.name, "qm9_index": args.qm9_index, "seed": args.seed,
        **{k: data[k] for k in keep}}, command)
    print(f"wrote {out} and {out.with_suffix('.json')} (equivariance error "
          f"{data['equivariance_error']:.2e})")


def _cmd_run(args, command: str) -> None:
    data = run_figure_data(args.run_dir, args.split)
    out = Path(args.out)
    plot_run(data, out, title=f"{Path(args.run_dir).name} ({data['task']})")
    summary = {k: data[k] for k in ("task", "split", "run_dir", "checkpoint_step", "quantity",
                                    "unit", "parity") if k in data}
    if "parity_displacement" in data:
        summary["parity_displacement"] = data["parity_displacement"]
    curves = data["learning_curves"]
    summary["best"] = curves["best"]
    summary["eval_curves"] = {k: v for k, v in curves["curves"].items() if k != "train"}
    _write_json(out.with_suffix(".json"), {"figure": out.name, **summary}, command)
    print(f"wrote {out} and {out.with_suffix('.json')}: {data['split']} parity {data['parity']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m segnn_jax.plots {qm9-messages,glyph,run} ... --out FIGURE.png``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m segnn_jax.plots", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True)
    messages = sub.add_parser("qm9-messages", help="messages per atom and disconnected molecules "
                                                   "against the cutoff (QM9 training split)")
    messages.add_argument("--min-cutoff", type=float, default=1.0)
    messages.add_argument("--max-cutoff", type=float, default=5.0)
    messages.add_argument("--step", type=float, default=0.05)
    glyph = sub.add_parser("glyph", help="glyph of one atom's steerable features, molecule as "
                                         "given and rotated")
    glyph.add_argument("--qm9-index", type=int, default=1000, help="QM9 (gdb) index")
    glyph.add_argument("--node", type=int, default=None,
                       help="atom to show (default: the one receiving most messages)")
    glyph.add_argument("--seed", type=int, default=0, help="weights of the random network")
    glyph.add_argument("--rotation-seed", type=int, default=0)
    run = sub.add_parser("run", help="learning curves and parity plot of a trained run")
    run.add_argument("run_dir")
    run.add_argument("--split", default="test", choices=("train", "valid", "test"))
    for p in (messages, glyph):
        p.add_argument("--source", default=None,
                       help="QM9 source (default: the installed qm9pack, cached)")
    for p in (messages, glyph, run):
        p.add_argument("--out", required=True, help="the PNG to write (a JSON goes beside it)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m segnn_jax.plots", *argv])
    try:
        {"qm9-messages": _cmd_qm9_messages, "glyph": _cmd_glyph, "run": _cmd_run}[args.figure](
            args, command)
    except MissingMatplotlibError as e:
        print(f"segnn_jax.plots: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
