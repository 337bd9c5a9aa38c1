"""What inference needs to know about each task, beyond its config and ``make_model``.

Used by :mod:`segnn_jax.artifact` (exporting and reloading trained models) and
:mod:`segnn_jax.plots` (parity plots). Per task:

* :func:`example_graph`: the smallest valid padded batch of the task's raw graphs; parameter shapes
  never depend on the graph, so it serves as the template to restore or initialise parameters
  without the task's data;
* :func:`run_side_files`: the JSON files of a run directory that a prediction needs besides the
  config and parameters (the training standardisation of QM9 and OC20, the fitted constants of
  a potential);
* :func:`to_physical`: the model's raw output in the task's units;
* :func:`split_outputs`: predictions and targets of a whole data split, in the task's units.

Adding a task here is one entry in each of the small tables below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Union

import jraph
import numpy as np

from segnn_jax.graph import batch_graphs, graph_mask, node_mask, pad_graph

__all__ = ["SIDE_FILES", "UnsupportedTaskError", "example_graph", "run_side_files",
           "split_outputs", "to_physical"]

#: JSON files of a run directory that inference reads, per task (besides ``config.json``).
SIDE_FILES: Dict[str, tuple] = {
    "nbody": (),
    "qm9": ("qm9_standardisation.json",),
    "oc20": ("oc20_standardisation.json",),
    "potential": ("potential_spec.json",),  # the fitted constants the network is built from
}


class UnsupportedTaskError(ValueError):
    """A task this module has no inference entry for."""


def _check(task: str, table: Mapping[str, Any]) -> None:
    if task not in table:
        raise UnsupportedTaskError(
            f"task {task!r} has no inference support in segnn_jax.tasks.inference (supported: "
            f"{', '.join(sorted(table))})")


def _padded(graphs) -> jraph.GraphsTuple:
    graph = batch_graphs(graphs)
    return pad_graph(graph, int(graph.n_node.sum()) + 1, int(graph.n_edge.sum()),
                     len(graph.n_node) + 1)


def _nbody_example(cfg: Mapping[str, Any]) -> jraph.GraphsTuple:
    from segnn_jax.datasets import nbody as nbody_data

    rng = np.random.default_rng(0)
    shape = (1, 5, 3)  # one system of the data sets' five particles
    data = nbody_data.NBodyData(
        positions=rng.normal(size=shape).astype(np.float32),
        velocities=rng.normal(size=shape).astype(np.float32),
        charges=np.array([[1, -1, 1, -1, 1]], np.float32) if cfg["data"]["dataset"] == "charged"
        else None,
        masses=np.ones(shape[:2], np.float32), targets=np.zeros(shape, np.float32),
        horizon=float("nan"), name=cfg["data"]["dataset"])
    return _padded(nbody_data.nbody_graphs(data, k=cfg["data"]["neighbours"]))


def _qm9_example(cfg: Mapping[str, Any]) -> jraph.GraphsTuple:
    from segnn_jax.datasets import qm9 as qm9_data

    # Methane, roughly: C at the origin, four H at 1.09 Angstrom.
    positions = np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                          [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]], np.float64)
    molecule = qm9_data.QM9Molecules(np.array([6, 1, 1, 1, 1]), positions, [5], [0],
                                     np.zeros((1, len(qm9_data.PROPERTY_NAMES))))
    graph = qm9_data.molecules_to_graphs(molecule, cutoff=float(cfg["data"]["cutoff"]))[0]
    return _padded([graph._replace(globals={"targets": np.zeros((1, 1), np.float32)})])


def _oc20_example(cfg: Mapping[str, Any]) -> jraph.GraphsTuple:
    from segnn_jax.tasks import oc20

    # Two copper atoms in a periodic cubic cell.
    system = oc20.System(np.array([[0.0, 0.0, 0.0], [1.8, 1.8, 0.0]]), 3.6 * np.eye(3),
                         np.array([True, True, True]), np.array([29, 29]), np.array([1, 1]),
                         float("nan"), "", "Cu", "example")
    return _padded([oc20.system_graph(system, float(cfg["data"]["cutoff"]))])


def _potential_example(cfg: Mapping[str, Any]) -> jraph.GraphsTuple:
    from segnn_jax.tasks import potential

    return potential.example_graph(float(cfg["data"]["cutoff"]))


_EXAMPLES: Dict[str, Callable[[Mapping[str, Any]], jraph.GraphsTuple]] = {
    "nbody": _nbody_example,
    "qm9": _qm9_example,
    "oc20": _oc20_example,
    "potential": _potential_example,
}


def example_graph(task: str, cfg: Mapping[str, Any]) -> jraph.GraphsTuple:
    """A small padded batch the task's model accepts (a template for parameter shapes).

    Args:
        task: the task's name.
        cfg: the task's validated config.
    """
    _check(task, _EXAMPLES)
    return _EXAMPLES[task](cfg)


def run_side_files(task: str, run_dir: Union[str, Path]) -> Dict[str, Any]:
    """``{file name: parsed JSON}`` of the run's files that inference needs (:data:`SIDE_FILES`).

    Raises:
        FileNotFoundError: one of them is missing.
    """
    _check(task, SIDE_FILES)
    out = {}
    for name in SIDE_FILES[task]:
        path = Path(run_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: {name}, which predictions of a {task} run need, "
                                    f"is missing")
        out[name] = json.loads(path.read_text())
    return out


def to_physical(task: str, outputs: np.ndarray, side_files: Mapping[str, Any]) -> np.ndarray:
    """Raw model outputs in the task's units (float64).

    N-body: positions, unchanged. QM9: ``z * mad + mean`` of the learnt target (an atomisation
    energy when the run used atom references). OC20: ``z * std + mean`` (eV; the residual
    after the per-element reference when the run used ``data.energy_reference``).
    """
    outputs = np.asarray(outputs, np.float64)
    if task == "nbody":
        return outputs
    if task == "qm9":
        stats = side_files["qm9_standardisation.json"]
        return outputs * stats["mad"] + stats["mean"]
    if task == "oc20":
        stats = side_files["oc20_standardisation.json"]
        return outputs * stats["std"] + stats["mean"]
    _check(task, SIDE_FILES)
    raise AssertionError("unreachable")


def _nbody_loader(cfg, side_files, split):
    from segnn_jax.tasks import nbody

    return nbody.make_loaders(cfg, nbody.load_splits(cfg, (split,), progress=False))[split]


def _qm9_loader(cfg, side_files, split):
    from segnn_jax.tasks import qm9

    stats = qm9.Standardisation(**side_files["qm9_standardisation.json"])
    return qm9.make_loaders(cfg, qm9.load_splits(cfg, (split,)), stats)[split]


_LOADERS = {"nbody": _nbody_loader, "qm9": _qm9_loader}

#: What the parity plot shows, per task: (quantity, unit).
QUANTITIES = {"nbody": ("position at the target frame", "simulation units"),
              "qm9": ("target", None)}


def split_outputs(model, split: str = "test") -> Dict[str, Any]:
    """Predictions and targets of a whole split of the trained model's task, in its units.

    Args:
        model: a :class:`segnn_jax.artifact.TrainedModel`.
        split: "train", "valid" or "test".

    Returns:
        ``predicted`` and ``target`` (float64; N-body ``[nodes, 3]`` positions, QM9
        ``[molecules]``), ``inputs`` (N-body: the input positions ``[nodes, 3]``; absent
        otherwise), ``quantity`` and ``unit``.
    """
    task = model.task
    _check(task, _LOADERS)
    loader = _LOADERS[task](model.config, model.side_files, split)
    predicted, target, inputs = [], [], []
    for batch in loader.epoch_batches(0):  # evaluation loaders keep the data order
        out = np.asarray(model.apply(batch))
        if task == "nbody":
            mask = np.asarray(node_mask(batch, out.shape[0]))
            predicted.append(out[mask])
            target.append(np.asarray(batch.nodes["targets"])[mask])
            inputs.append(np.asarray(batch.nodes["positions"])[mask])
        else:
            mask = np.asarray(graph_mask(batch))
            predicted.append(out[mask])
            target.append(np.asarray(batch.globals["targets"])[mask, 0])
    quantity, unit = QUANTITIES[task]
    out = {"predicted": to_physical(task, np.concatenate(predicted), model.side_files),
           "target": to_physical(task, np.concatenate(target), model.side_files),
           "quantity": quantity, "unit": unit}
    if task == "qm9":
        stats = model.side_files["qm9_standardisation.json"]
        out["quantity"] = stats["target"] + (" (atomisation)" if stats["atom_reference"] else "")
        out["unit"] = stats["unit"]
    if inputs:
        out["inputs"] = np.concatenate(inputs).astype(np.float64)
    return out
