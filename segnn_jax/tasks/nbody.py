"""The N-body task: simulated systems -> steerable graphs -> SEGNN -> predicted positions.

Pipeline (SEGNN.md section 2.7, with the graph centroid instead of the reference's centring):

* node input ``x_i = [p_i - c (1o), v_i (1o), |v_i| (0e)]``, irreps ``2x1o+1x0e``, where ``c`` is
  the centroid of the node's graph (mean over its real nodes).
  ``centering="reference_per_particle"`` reproduces the reference instead,
  ``p_i - mean(p_i[x], p_i[y], p_i[z])`` (a per-particle mean over the three coordinates): it is
  NOT rotation- or translation-equivariant, and exists only to compare with the reference;
* edge attribute ``a_ij = Y(x_j - x_i)`` up to ``lmax_attr``, "integral" normalisation;
* node attribute ``a_i = mean_j a_ij + Y(v_i)`` (l = 0 component 1);
* extra message features ``[|x_j - x_i|, q_i q_j]`` (charged) or ``[|x_j - x_i|, m_i m_j]``
  (gravity), chosen by whether the graph's nodes carry "charges";
* output ``1x1o`` per node, added to the input position: the predicted position at the target frame.
  ``predict_from="constant_velocity"`` adds it to the constant-velocity guess ``p_i + h v_i``
  instead (``h`` the time between the input and target frames), so the network only learns the
  correction due to the forces; the inputs are the same and the guess is equivariant, so the
  model stays E(3)-equivariant.
* ``velocity_frame="centre_of_mass"`` (beyond the reference, which uses ``"lab"``): the velocity
  inputs and attributes are taken relative to the graph's centre-of-mass velocity ``V`` (the mean
  velocity weighted by the masses; unit masses for charged), and the prediction adds the drift
  ``h V`` (included in ``p_i + h v_i`` with ``predict_from="constant_velocity"``). The forces of
  both systems depend on relative positions only, so a boost of every velocity by ``u`` moves the
  target by ``h u``; in this frame the model has that symmetry exactly instead of learning it.
* ``force_input=True`` (beyond the reference): the force on each body at the input frame, from the
  simulator's force law summed over the graph's edges (:func:`input_forces`; every other body for
  the fully connected charged graphs, the k nearest for gravity), joins the inputs as a vector
  (1o) and its size (0e), both squashed by ``log(1 + |F_i|)`` because close encounters reach
  forces of 10^3 where the median is 0.2 (charged training set), and the attributes as
  ``Y(F_i)``: SEGNN's "physical quantity" attribute, computed from the same inputs (positions
  and charges or masses), so it adds knowledge of the force law but no data.

The loss is the MSE over all elements (systems x bodies x coordinates), the formula of the trivial
baselines of :func:`segnn_jax.datasets.nbody.trivial_baselines`: ``loss_fn`` returns the sum of
squared errors over the real nodes and ``count = 3 x real nodes``.

The config (see ``segnn_jax/configs/nbody_charged.py``) has the sections ``data``, ``batch``,
``model`` (:mod:`segnn_jax.tasks.models`) and ``train`` (:mod:`segnn_jax.training`). Task entry
points used by the ``segnn`` command: :func:`train` (= :func:`run_nbody`), :func:`evaluate`,
:func:`predict`.

Shape letters: S systems, N nodes, E edges, G graphs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from segnn_jax import training
from segnn_jax.attributes import (
    SteerableGraphsTuple,
    edge_attributes,
    edge_vectors,
    node_attributes,
    pair_products,
    safe_norm,
)
from segnn_jax.batching import GraphLoader
from segnn_jax.datasets import nbody as nbody_data
from segnn_jax.graph import edge_mask, node_graph_index, node_mask
from segnn_jax.segnn import transform_with_jitted_init
from segnn_jax.tasks import TaskInputError, models
from segnn_jax.tasks.common import batch_budget, positive_int, task_sections
from segnn_jax.training.config import ConfigError

__all__ = [
    "BATCH_DEFAULTS",
    "CENTERINGS",
    "DATA_DEFAULTS",
    "DESCRIPTION",
    "DOCUMENTED_BASELINES",
    "PREDICTION_ORIGINS",
    "EVALUATION_DATA",
    "NBodyInputError",
    "check_same_evaluation_data",
    "evaluate",
    "featurize",
    "horizon",
    "input_forces",
    "load_splits",
    "make_loaders",
    "make_loss_fn",
    "make_model",
    "predict",
    "predict_positions",
    "restore_params",
    "run_nbody",
    "train",
    "validate_config",
]

DESCRIPTION = "N-body: predict positions 1000 steps ahead (charged particles, gravity)"

CENTERINGS = ("centroid", "reference_per_particle")

# Velocities as given ("lab", the reference) or relative to the graph's centre-of-mass velocity.
VELOCITY_FRAMES = ("lab", "centre_of_mass")

# What the network's 1x1o output is added to: the input position (the reference) or the
# constant-velocity guess x + horizon v.
PREDICTION_ORIGINS = ("input_position", "constant_velocity")

# The reference's numbers on the charged test set (SEGNN.md section 4); none are documented for
# gravity.
DOCUMENTED_BASELINES = {"charged": {"input_position": 0.246, "constant_velocity": 0.122}}

DATA_DEFAULTS: Dict[str, Any] = {
    "dataset": "charged",
    "n_train": 3000,
    "n_valid": 2000,
    "n_test": 2000,
    "data_dir": None,
    "input_frame": 30,
    "target_frame": 40,
    "train_input_frames": None,
    "neighbours": None,
    "centering": "centroid",
    "predict_from": "input_position",
    "velocity_frame": "lab",
    "force_input": False,
}

BATCH_DEFAULTS: Dict[str, Any] = {
    "batch_size": 100,
    "eval_batch_size": None,
    "max_nodes": None,
    "max_edges": None,
}

#: The data settings that decide which systems and frames the validation and test splits hold: runs
#: that agree on them are evaluated on the same systems.
EVALUATION_DATA = ("dataset", "n_valid", "n_test", "data_dir", "input_frame", "target_frame")

_SECTIONS = ("task", "data", "batch", "model", "train")
_SPLIT_SIZE = {"train": "n_train", "valid": "n_valid", "test": "n_test"}


class NBodyInputError(TaskInputError):
    """An input file given to :func:`predict` is missing a field or has inconsistent shapes."""


# --------------------------------------------------------------------------------------------------
# Config


def validate_config(config: Any) -> Dict[str, Any]:
    """Checks a whole N-body config and returns it as a plain nested dict with defaults filled in.

    Runs on the host before any data is generated or anything is compiled.

    Raises:
        ConfigError: an unknown option or an invalid value; the message starts with its dotted
            name (e.g. ``config.batch.batch_size``).
    """
    config, sections = task_sections(config, "nbody", {
        "data": DATA_DEFAULTS,
        "batch": BATCH_DEFAULTS,
    })
    data, batch = sections["data"], sections["batch"]
    if data["dataset"] not in ("charged", "gravity"):
        raise ConfigError(f"config.data.dataset: expected 'charged' or 'gravity', "
                          f"got {data['dataset']!r}")
    for key in ("n_train", "n_valid", "n_test"):
        positive_int(data, key, "config.data")
    sizes = nbody_data.CHARGED if data["dataset"] == "charged" else nbody_data.GRAVITY
    for split, key in _SPLIT_SIZE.items():
        available = int(np.subtract(*sizes.split_range(split)[::-1]))
        if data[key] > available:
            raise ConfigError(f"config.data.{key}: the {data['dataset']} {split} split has "
                              f"{available} systems, got {data[key]}")
    for key in ("input_frame", "target_frame"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value not in sizes.frames:
            raise ConfigError(f"config.data.{key}: not a stored frame of {data['dataset']} "
                              f"({sizes.frames[0]}..{sizes.frames[-1]}), got {value!r}")
    if data["target_frame"] <= data["input_frame"]:
        raise ConfigError(f"config.data.target_frame: must come after input_frame "
                          f"({data['input_frame']}), got {data['target_frame']}")
    data["train_input_frames"] = _train_input_frames(data, sizes)
    positive_int(data, "neighbours", "config.data", optional=True)
    if data["centering"] not in CENTERINGS:
        raise ConfigError(f"config.data.centering: expected one of {CENTERINGS}, "
                          f"got {data['centering']!r}")
    if data["predict_from"] not in PREDICTION_ORIGINS:
        raise ConfigError(f"config.data.predict_from: expected one of {PREDICTION_ORIGINS}, "
                          f"got {data['predict_from']!r}")
    if data["velocity_frame"] not in VELOCITY_FRAMES:
        raise ConfigError(f"config.data.velocity_frame: expected one of {VELOCITY_FRAMES}, "
                          f"got {data['velocity_frame']!r}")
    if not isinstance(data["force_input"], bool):
        raise ConfigError(f"config.data.force_input: expected true or false, "
                          f"got {data['force_input']!r}")
    if data["data_dir"] is not None and not isinstance(data["data_dir"], str):
        raise ConfigError(f"config.data.data_dir: expected a path or None, "
                          f"got {data['data_dir']!r}")
    positive_int(batch, "batch_size", "config.batch")
    positive_int(batch, "eval_batch_size", "config.batch", optional=True)
    training.check_budgets({k: batch[k] for k in ("max_nodes", "max_edges")}, {})
    return {"task": "nbody", "data": data, "batch": batch,
            "model": models.validate_model_config(config.get("model")),
            "train": training.validate_train_config(config.get("train"))}


def _train_input_frames(data: Dict[str, Any], sizes: nbody_data.NBodyConfig) -> Optional[list]:
    frames = data["train_input_frames"]
    if frames is None:
        return None
    name = "config.data.train_input_frames"
    if isinstance(frames, (str, bytes)) or not isinstance(frames, (list, tuple)) or not frames:
        raise ConfigError(f"{name}: expected None or a non-empty list of input frames, "
                          f"got {frames!r}")
    gap = data["target_frame"] - data["input_frame"]
    for frame in frames:
        if isinstance(frame, bool) or not isinstance(frame, int) or frame not in sizes.frames \
                or frame + gap not in sizes.frames:
            raise ConfigError(f"{name}: every frame f needs f and its target f + {gap} stored "
                              f"({sizes.frames[0]}..{sizes.frames[-1]}), got {frame!r}")
    if len(set(frames)) != len(frames):
        raise ConfigError(f"{name}: repeated frames in {list(frames)}")
    return list(frames)


# --------------------------------------------------------------------------------------------------
# Featurizer and model


def _graph_mean(graph: jraph.GraphsTuple, values: jnp.ndarray,
                weights: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """``[N, 3]``: the weighted mean of ``values`` over the real nodes of each node's graph."""
    n_nodes, n_graphs = values.shape[0], graph.n_node.shape[0]
    index = node_graph_index(graph, n_nodes)
    weight = node_mask(graph, n_nodes).astype(values.dtype)  # padding nodes do not count
    if weights is not None:
        weight = weight * weights.astype(values.dtype)
    total = jax.ops.segment_sum(values * weight[:, None], index, num_segments=n_graphs)
    norm = jax.ops.segment_sum(weight, index, num_segments=n_graphs)
    mean = total / jnp.where(norm > 0, norm, 1.0)[:, None]  # [G, 3]
    return mean[index]


def _centred_positions(graph: jraph.GraphsTuple, centering: str) -> jnp.ndarray:
    positions = graph.nodes["positions"]  # [N, 3]
    if centering == "reference_per_particle":
        # The reference's pos - pos.mean(1) on an [N, 3] array: each particle's mean over x, y, z.
        return positions - jnp.mean(positions, axis=1, keepdims=True)
    if centering != "centroid":
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    return positions - _graph_mean(graph, positions)


def centre_of_mass_velocity(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """``[N, 3]``: the centre-of-mass velocity of each node's graph (unit masses without a
    "masses" field, as in the charged systems)."""
    return _graph_mean(graph, graph.nodes["velocities"], graph.nodes.get("masses"))


def input_forces(graph: jraph.GraphsTuple, dataset: str) -> jnp.ndarray:
    """``[N, 3]``: each body's force at the input frame, summed over its incoming edges.

    Charged: ``F_i = sum_j q_i q_j (x_i - x_j) / |x_i - x_j|^3`` (without the simulator's
    per-component clipping, which is not rotation-equivariant). Gravity:
    ``F_i = sum_j m_i m_j (x_j - x_i) / (|x_j - x_i|^2 + eps^2)^1.5`` with the simulator's
    softening ``eps``. Padding edges contribute nothing; coincident bodies give a finite
    (huge) force instead of inf.
    """
    vectors = edge_vectors(graph)  # [E, 3] x_j - x_i, j the sender, i the receiver
    squared = jnp.sum(vectors * vectors, axis=-1)
    if dataset == "charged":
        strength = -pair_products(graph.nodes["charges"], graph)
        denominator = jnp.maximum(squared, 1e-12) ** 1.5
    elif dataset == "gravity":
        strength = pair_products(graph.nodes["masses"], graph)
        denominator = (squared + nbody_data.GRAVITY.softening ** 2) ** 1.5
    else:
        raise ValueError(f"dataset must be 'charged' or 'gravity', got {dataset!r}")
    per_edge = jnp.where(edge_mask(graph)[:, None],
                         strength[:, None] * vectors / denominator[:, None], 0.0)
    return jax.ops.segment_sum(per_edge, graph.receivers,
                               num_segments=graph.nodes["positions"].shape[0])


def featurize(graph: jraph.GraphsTuple, *, lmax_attr: int, centering: str = "centroid",
              velocity_frame: str = "lab", forces: Optional[jnp.ndarray] = None
              ) -> SteerableGraphsTuple:
    """The steerable inputs of an N-body graph (pure, jit-able, padding-safe).

    Args:
        graph: (padded) graph with node fields "positions", "velocities" ``[N, 3]`` and "charges"
            or "masses" ``[N]``.
        lmax_attr: highest order of the spherical-harmonic attributes.
        centering: "centroid" (equivariant) or "reference_per_particle" (the reference's centring,
            which breaks rotation and translation equivariance; for comparison only).
        velocity_frame: "lab" (the velocities as given) or "centre_of_mass" (relative to the
            graph's centre-of-mass velocity).
        forces: ``[N, 3]`` physical forces (:func:`input_forces`) to add to the inputs and the
            attributes, or None.

    Returns:
        Node features ``[N, 2x1o+1x0e]`` (``[N, 3x1o+2x0e]`` with forces, the force after the
        velocity in each), node and edge attributes ``[N or E, sh(lmax_attr)]``, extra message
        features ``[E, 2x0e]``.
    """
    # Host (NumPy) batches are accepted too, e.g. by Haiku's init.
    graph = jax.tree.map(jnp.asarray, graph)
    velocities = graph.nodes["velocities"]  # [N, 3]
    if velocity_frame == "centre_of_mass":
        velocities = velocities - centre_of_mass_velocity(graph)
    elif velocity_frame != "lab":
        raise ValueError(f"velocity_frame must be one of {VELOCITY_FRAMES}, got {velocity_frame!r}")
    n_nodes = velocities.shape[0]
    centred = _centred_positions(graph, centering)
    # Concatenating IrrepsArrays keeps each block's layout; simplify() then merges the vectors'
    # 1o+1o(+1o) into one block without moving data (each vector is one copy of 1o).
    vectors_in = [centred, velocities]
    scalars_in = [safe_norm(velocities, keepdims=True)]
    physical = [velocities]
    if forces is not None:
        size = safe_norm(forces, keepdims=True)
        squashed = jnp.log1p(size)
        vectors_in.append(forces * squashed / jnp.maximum(size, 1e-9))
        scalars_in.append(squashed)
        physical.append(forces)  # the attribute's harmonics see only the direction
    features = e3nn.concatenate([e3nn.IrrepsArray("1x1o", v) for v in vectors_in]
                                + [e3nn.IrrepsArray("1x0e", s) for s in scalars_in]).simplify()
    vectors = edge_vectors(graph)  # [E, 3] x_j - x_i
    edge_attr = edge_attributes(vectors, lmax_attr, normalization="integral")
    node_attr = node_attributes(edge_attr, graph.receivers, n_nodes, edge_mask=edge_mask(graph),
                                physical_vectors=physical, normalization="integral")
    scalar = graph.nodes["charges"] if "charges" in graph.nodes else graph.nodes["masses"]
    extra = e3nn.IrrepsArray("2x0e", jnp.stack(
        [safe_norm(vectors), pair_products(scalar, graph)], axis=-1).astype(vectors.dtype))
    return SteerableGraphsTuple(graph, features, node_attr, edge_attr, extra)


def horizon(config: Any) -> float:
    """Time between the input and the target frame of a config's data set (1.0 for 30 -> 40)."""
    data = validate_config(config)["data"]
    sizes = nbody_data.CHARGED if data["dataset"] == "charged" else nbody_data.GRAVITY
    steps = sizes.frame_step(data["target_frame"]) - sizes.frame_step(data["input_frame"])
    return float(steps * sizes.dt)


def make_model(config: Any) -> hk.TransformedWithState:
    """``forward(graph, is_training=False) -> [N, 3]`` predicted positions, transformed by Haiku.

    Its ``init`` is compiled (:func:`segnn_jax.transform_with_jitted_init`).

    The network's ``1x1o`` output is added to the input position, or with
    ``config.data.predict_from="constant_velocity"`` to ``position + horizon * velocity``; with
    ``config.data.velocity_frame="centre_of_mass"`` and the input position as origin, the drift
    ``horizon * centre-of-mass velocity`` is added too.

    Args:
        config: a whole N-body config (validated here).
    """
    cfg = validate_config(config)
    factory = models.create_model(cfg["model"], output_irreps="1x1o")
    data = cfg["data"]
    lmax_attr, centering = cfg["model"]["lmax_attr"], data["centering"]
    frame = data["velocity_frame"]
    # The guess is built from the raw inputs, so it adds no trainable freedom.
    constant_velocity = data["predict_from"] == "constant_velocity"
    drift = horizon(cfg) if constant_velocity or frame == "centre_of_mass" else 0.0

    dataset = data["dataset"] if data["force_input"] else None

    def forward(graph: jraph.GraphsTuple, is_training: bool = False) -> jnp.ndarray:
        forces = input_forces(graph, dataset) if dataset else None
        st_graph = featurize(graph, lmax_attr=lmax_attr, centering=centering,
                             velocity_frame=frame, forces=forces)
        displacement = factory()(st_graph, is_training)  # [N, 1x1o]
        origin = graph.nodes["positions"]
        if drift:
            velocity = graph.nodes["velocities"] if constant_velocity else \
                centre_of_mass_velocity(graph)
            origin = origin + drift * velocity
        return origin + displacement.array

    return transform_with_jitted_init(forward)


def make_loss_fn(model: hk.TransformedWithState):
    """The engine's objective: squared error summed over real nodes and xyz, count = 3 x nodes."""

    def loss_fn(params, model_state, graph, rng, is_training):
        predicted, model_state = model.apply(params, model_state, rng, graph, is_training)  # [N, 3]
        mask = node_mask(graph, predicted.shape[0])
        squared = jnp.sum((predicted - graph.nodes["targets"]) ** 2, axis=-1)  # [N]
        loss_sum = jnp.sum(jnp.where(mask, squared, 0.0))
        count = 3.0 * jnp.sum(mask).astype(predicted.dtype)
        return loss_sum, ({"count": count}, model_state)

    return loss_fn


# --------------------------------------------------------------------------------------------------
# Data


def load_splits(config: Any, splits=("train", "valid", "test"), *,
                progress: bool = True) -> Dict[str, nbody_data.NBodyData]:
    """Loads (simulating and caching on first use) the requested splits of a config's data set.

    With ``data.train_input_frames`` the training split holds one sample per system and listed
    frame ``f`` (input at ``f``, target at ``f + target_frame - input_frame``): more samples drawn
    from the same training simulations, since the dynamics do not depend on time. Validation and
    test always use ``input_frame -> target_frame``.
    """
    data = validate_config(config)["data"]

    def load(split, input_frame):
        return nbody_data.load_nbody(
            data["dataset"], split, data[_SPLIT_SIZE[split]], data["data_dir"],
            input_frame=input_frame,
            target_frame=input_frame + data["target_frame"] - data["input_frame"],
            progress=progress)

    loaded = {}
    for split in splits:
        if split == "train" and data["train_input_frames"] is not None:
            loaded[split] = nbody_data.concatenate(
                [load(split, frame) for frame in data["train_input_frames"]])
        else:
            loaded[split] = load(split, data["input_frame"])
    return loaded


def _graphs(cfg: Dict[str, Any], data: nbody_data.NBodyData) -> list:
    return nbody_data.nbody_graphs(data, k=cfg["data"]["neighbours"])


def make_loaders(config: Any, splits: Mapping[str, nbody_data.NBodyData]) -> Dict[str, GraphLoader]:
    """Graph loaders for the given splits; the training one shuffles with ``config.train.seed``.

    Budgets are estimated from the training graphs when present, else from the first split given
    (``config.batch.max_nodes`` / ``max_edges`` override them).

    Raises:
        ConfigError: a configured budget smaller than the largest graph.
        PaddingBudgetError: a graph of another split does not fit the estimated budget.
    """
    cfg = validate_config(config)
    graphs = {split: _graphs(cfg, data) for split, data in splits.items()}
    reference = graphs["train"] if "train" in graphs else next(iter(graphs.values()))
    batch_size = cfg["batch"]["batch_size"]
    eval_size = cfg["batch"]["eval_batch_size"] or batch_size
    loaders = {}
    for split, split_graphs in graphs.items():
        size = batch_size if split == "train" else eval_size
        budget = batch_budget(cfg["batch"], reference, size)
        loaders[split] = GraphLoader(split_graphs, size, budget=budget,
                                     shuffle=split == "train", seed=int(cfg["train"]["seed"]))
    return loaders


# --------------------------------------------------------------------------------------------------
# Training, evaluation, prediction


def _report(result_best: Optional[Dict[str, Any]], baselines: Dict[str, Dict[str, float]],
            dataset: str) -> str:
    lines = ["", "N-body test MSE (mean over systems, bodies and coordinates):"]
    if result_best is not None and "test" in result_best:
        lines.append(f"  model at best validation (epoch {result_best['epoch'] + 1}): "
                     f"{result_best['test']['loss']:.5f}  "
                     f"(validation {result_best['val']['loss']:.5f})")
    test, documented = baselines.get("test", {}), DOCUMENTED_BASELINES.get(dataset, {})
    for key, label in (("input_position", "input position"),
                       ("constant_velocity", "constant velocity")):
        value = test.get(key, float("nan"))
        line = f"  trivial baseline, {label:17s}: {value:.5f} on this test set"
        lines.append(line + (f" (documented {documented[key]})" if key in documented else ""))
    return "\n".join(lines)


def run_nbody(config: Any, run_dir: Union[str, Path], *, command: Optional[str] = None,
              progress: bool = True) -> Dict[str, Any]:
    """Trains and evaluates on N-body data, writes the run directory and ``results.json``.

    Test MSE is reported at the best validation evaluation (every ``config.train.eval_every``
    epochs), next to the two trivial baselines computed on the same test set and their documented
    values.

    Args:
        config: the whole N-body config.
        run_dir: the run directory (resumed if it holds checkpoints).
        command: the command line to record (default: ``sys.argv``).
        progress: progress bar while simulating data.

    Returns:
        The results written to ``run_dir/results.json``: ``test_mse``, ``val_mse``, ``best_epoch``
        (epochs trained when the best validation was reached), ``epochs``, ``n_train`` (training
        simulations), ``n_train_samples`` (their (input, target) pairs),
        ``wall_time_s``, ``command``, ``git_revision``, ``baselines`` and more.
    """
    cfg = validate_config(config)
    run_dir = Path(run_dir).resolve()  # orbax checkpoints need an absolute path
    start = time.perf_counter()
    splits = load_splits(cfg, progress=progress)
    loaders = make_loaders(cfg, splits)
    baselines = {split: nbody_data.trivial_baselines(data) for split, data in splits.items()}
    documented = DOCUMENTED_BASELINES.get(cfg["data"]["dataset"])
    print(f"trivial baselines on the test set: input position "
          f"{baselines['test']['input_position']:.4f}, constant velocity "
          f"{baselines['test']['constant_velocity']:.4f}"
          + (f" (documented {documented['input_position']} and {documented['constant_velocity']})"
             if documented else ""), flush=True)
    model = make_model(cfg)
    result = training.fit(
        model.init, make_loss_fn(model), loaders["train"], config=cfg["train"], run_dir=run_dir,
        val_data=loaders["valid"], test_data=loaders["test"], full_config=cfg,
        data_stats={"train": loaders["train"].describe(), "baselines": baselines,
                    "dataset": cfg["data"]["dataset"]})
    best = result.best
    results = {
        "task": "nbody",
        "dataset": cfg["data"]["dataset"],
        "model": cfg["model"]["name"],
        "test_mse": best["test"]["loss"] if best else None,
        "val_mse": best["val"]["loss"] if best else None,
        "best_epoch": best["epoch"] + 1 if best else None,
        "best_step": best["step"] if best else None,
        "epochs": cfg["train"]["num_epochs"],
        "n_train": cfg["data"]["n_train"],
        "train_input_frames": cfg["data"]["train_input_frames"],
        "n_train_samples": len(splits["train"].positions),
        "n_valid": cfg["data"]["n_valid"],
        "n_test": cfg["data"]["n_test"],
        "wall_time_s": round(time.perf_counter() - start, 1),
        "command": command if command is not None else " ".join(sys.argv),
        "git_revision": training.git_revision(),
        "baselines": baselines,
        "documented_baselines": DOCUMENTED_BASELINES.get(cfg["data"]["dataset"]),
        "num_parameters": training.count_parameters(result.state.params),
        "compilations": len(result.compilations),
    }
    training.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    print(_report(best, baselines, cfg["data"]["dataset"]), flush=True)
    return results


def train(config: Any, run_dir: Union[str, Path], *,
          command: Optional[str] = None) -> Dict[str, Any]:
    """The ``segnn train`` entry point of this task: :func:`run_nbody`."""
    return run_nbody(config, run_dir, command=command)


def _read_run_config(run_dir: Path) -> Dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    return validate_config(json.loads(path.read_text()))


def restore_params(config: Any, run_dir: Union[str, Path], example: jraph.GraphsTuple):
    """``(params, model_state, step)`` of the run's best checkpoint (see
    :func:`segnn_jax.training.restore_best_params`)."""
    cfg = validate_config(config)
    return training.restore_best_params(make_model(cfg).init, cfg["train"], run_dir, example)


def evaluate(run_dir: Union[str, Path], split: str = "test") -> Dict[str, Any]:
    """Evaluates the best checkpoint of a run on a split (``segnn evaluate``).

    Returns:
        ``{"split", "mse", "count", "checkpoint_step", "baselines"}``.
    """
    if split not in _SPLIT_SIZE:
        raise ValueError(f"split must be one of {tuple(_SPLIT_SIZE)}, got {split!r}")
    cfg = _read_run_config(Path(run_dir))
    data = load_splits(cfg, (split,))
    loader = make_loaders(cfg, data)[split]
    model = make_model(cfg)
    params, model_state, step = restore_params(cfg, run_dir, next(iter(loader.epoch_batches(0))))
    metrics = training.evaluate(training.make_eval_step(make_loss_fn(model)), params, model_state,
                                loader)
    out = {"split": split, "mse": metrics["loss"], "count": metrics["count"],
           "checkpoint_step": step, "baselines": nbody_data.trivial_baselines(data[split])}
    return out


def check_same_evaluation_data(runs: Sequence[Tuple[str, Mapping[str, Any]]]) -> None:
    """Checks that runs, given as ``(name, config)`` pairs, are validated and tested on the same
    systems (:data:`EVALUATION_DATA`), so that their predictions can be averaged or compared system
    by system.

    Raises:
        ValueError: a run whose validation or test data differ from the first run's.
    """
    (first, reference), *others = [(name, validate_config(config)["data"]) for name, config in runs]
    for name, data in others:
        differing = [key for key in EVALUATION_DATA if data[key] != reference[key]]
        if differing:
            raise ValueError(f"{name}: other validation or test data than {first} "
                             f"(data.{', data.'.join(differing)} differ)")


def _read_input(path: Path, dataset: str) -> Dict[str, np.ndarray]:
    scalar = "charges" if dataset == "charged" else "masses"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError) as e:
        raise NBodyInputError(f"{path}: not a readable .npz file ({e})") from e
    for key in ("positions", "velocities") + ((scalar,) if dataset == "charged" else ()):
        if key not in arrays:
            raise NBodyInputError(f"{path}: missing array {key!r} (has {sorted(arrays)})")
    positions = arrays["positions"].astype(np.float32)
    if positions.ndim == 2:
        arrays = {k: v[None] for k, v in arrays.items()}
        positions = positions[None]
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise NBodyInputError(f"{path}: positions must be [S, N, 3] or [N, 3], "
                              f"got {arrays['positions'].shape}")
    s, n = positions.shape[:2]
    velocities = arrays["velocities"].astype(np.float32)
    if velocities.shape != positions.shape:
        raise NBodyInputError(f"{path}: velocities have shape {velocities.shape}, positions "
                              f"{positions.shape}")
    values = arrays.get(scalar, np.ones((s, n))).astype(np.float32)
    if values.shape != (s, n):
        raise NBodyInputError(f"{path}: {scalar} must have shape {(s, n)}, got {values.shape}")
    for key, value in (("positions", positions), ("velocities", velocities), (scalar, values)):
        if not np.all(np.isfinite(value)):
            raise NBodyInputError(f"{path}: {key} holds non-finite values")
    return {"positions": positions, "velocities": velocities, scalar: values}


def predict_positions(model: Any, data: nbody_data.NBodyData) -> np.ndarray:
    """The positions ``[S, N, 3]`` a trained model predicts at the target frame of ``data``.

    Args:
        model: a :class:`segnn_jax.artifact.TrainedModel` of the N-body task, or anything
            :func:`segnn_jax.artifact.load_trained` accepts (a run directory, an artifact file).
        data: the systems at the input frame (``targets`` are not read).
    """
    from segnn_jax.artifact import load_trained

    trained = load_trained(model, task="nbody")
    cfg = trained.config
    s, n = data.positions.shape[:2]
    graphs = _graphs(cfg, data)
    eval_size = cfg["batch"]["eval_batch_size"] or cfg["batch"]["batch_size"]
    loader = GraphLoader(graphs, eval_size, budget=batch_budget(cfg["batch"], graphs, eval_size))
    # The loader keeps the data order when not shuffling, so the real nodes of the batches,
    # concatenated, are the input's nodes in order.
    rows = []
    for batch in loader.epoch_batches(0):
        predicted = trained.apply(batch)
        rows.append(predicted[np.asarray(node_mask(batch, predicted.shape[0]))])
    return np.concatenate(rows).reshape(s, n, 3)


def predict(run_dir: Union[str, Path], input_path: Union[str, Path],
            output_path: Union[str, Path, None] = None) -> Path:
    """Predicts target-frame positions for new systems with the best checkpoint of a run.

    The input is an ``.npz`` file with ``positions`` and ``velocities`` ``[S, N, 3]`` (or ``[N, 3]``
    for one system) at the input frame, and ``charges`` ``[S, N]`` (charged runs) or optionally
    ``masses`` ``[S, N]`` (gravity runs; ones by default). The output ``.npz`` holds
    ``positions`` ``[S, N, 3]``, the predicted positions at the target frame.

    Args:
        run_dir: a trained run directory, an artifact of one (``segnn export``), or a loaded
            :class:`segnn_jax.artifact.TrainedModel`.
        input_path: the input file.
        output_path: where to write; default ``<input stem>_predicted.npz`` next to the input.

    Returns:
        The output path.

    Raises:
        NBodyInputError: a missing array, inconsistent shapes or non-finite values.
    """
    from segnn_jax.artifact import load_trained

    input_path = Path(input_path)
    trained = load_trained(run_dir, task="nbody")
    cfg = trained.config
    dataset = cfg["data"]["dataset"]
    arrays = _read_input(input_path, dataset)
    s, n = arrays["positions"].shape[:2]
    data = nbody_data.NBodyData(
        positions=arrays["positions"], velocities=arrays["velocities"],
        charges=arrays.get("charges"), masses=arrays.get("masses", np.ones((s, n), np.float32)),
        targets=np.zeros_like(arrays["positions"]), horizon=float("nan"), name=dataset)
    positions = predict_positions(trained, data)
    output_path = Path(output_path) if output_path is not None else \
        input_path.with_name(input_path.stem + "_predicted.npz")
    np.savez(output_path, positions=positions)
    return output_path
