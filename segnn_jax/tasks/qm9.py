"""The QM9 task: molecules -> radius graphs -> SEGNN -> one molecular property per model.

Pipeline (SEGNN.md sections 2.7 and 3):

* node input ``x_i``: one-hot of H, C, N, O, F, irreps ``5x0e``;
* edge attribute ``a_ij = Y(x_j - x_i)`` up to ``lmax_attr`` (3 in the reference), "component"
  normalisation; radius graph at ``data.cutoff`` (2 Angstrom);
* node attribute ``a_i = mean_j a_ij`` with the l = 0 component set to 1 (an isolated atom gets
  ``(1, 0, ...)``);
* extra message feature ``|x_j - x_i|^2`` (``1x0e``);
* a graph-level SEGNN (7 layers, instance norm, mean pool) with output ``1x0e`` per molecule.

Targets are standardised on the host in float64 with the TRAINING set's mean and mean absolute
deviation (MAD): the model predicts ``z = (y - mean) / MAD`` and the loss is the L1 error on ``z``
(one model per target, ``data.target``). The eval step returns sums, so the reported MAE covers
every molecule of the validation and test sets once; ``mae`` is in the paper's units
(:data:`segnn_jax.datasets.qm9.TARGETS`: meV for energies), ``loss`` is the MAE on ``z``.

The improved recipe for the extensive targets (U0, U, H, G, ZPVE, R2; SEGNN.md section 5 item 2)
is two options: ``data.atom_reference=True`` (learn atomisation energies of U0/U/H/G, i.e. the total
energy minus the free atoms' energies; the offset is added back at prediction) and
``model.pool="sum"``; :mod:`segnn_jax.configs.qm9_extensive` sets both.

The config (``segnn_jax/configs/qm9.py``) has the sections ``data`` (:data:`DATA_DEFAULTS`),
``batch`` (:data:`BATCH_DEFAULTS`), ``model`` (:mod:`segnn_jax.tasks.models`) and ``train``
(:mod:`segnn_jax.training`). Entry points of the ``segnn`` command: :func:`train`
(= :func:`run_qm9`), :func:`evaluate`, :func:`predict`.

Shape letters: M molecules, N nodes (atoms), E edges, G graphs of a batch.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

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
)
from segnn_jax.batching import GraphLoader
from segnn_jax.datasets import qm9 as qm9_data
from segnn_jax.graph import edge_mask, graph_mask
from segnn_jax.segnn import transform_with_jitted_init
from segnn_jax.tasks import TaskInputError, models
from segnn_jax.tasks.common import (batch_budget, check_budget_options, positive_int,
                                    task_sections)
from segnn_jax.training.config import ConfigError

__all__ = [
    "BATCH_DEFAULTS",
    "DATA_DEFAULTS",
    "DESCRIPTION",
    "MODEL_DEFAULTS",
    "SPLITS",
    "QM9InputError",
    "Standardisation",
    "evaluate",
    "featurize",
    "load_splits",
    "make_loaders",
    "make_loss_fn",
    "make_model",
    "predict",
    "read_structures",
    "restore_params",
    "run_qm9",
    "standardise",
    "train",
    "validate_config",
    "write_predictions",
]

DESCRIPTION = "QM9: one molecular property per model (12 targets, Cormorant split, paper units)"

DATA_DEFAULTS: Dict[str, Any] = {
    "target": "alpha",
    "source": None,
    "data_dir": None,
    "cutoff": 2.0,
    "atom_reference": False,
    "split": "cormorant",
    "split_seed": 0,
    "n_train": None,
    "n_valid": None,
    "n_test": None,
}

BATCH_DEFAULTS: Dict[str, Any] = {
    "batch_size": 128,
    "eval_batch_size": None,
    "max_nodes": None,
    "max_edges": None,
    "buckets": (0.25, 0.5, 0.75, 1.0),
}

#: The reference QM9 model (SEGNN.md sections 2.6 and 3); the defaults of a QM9 config's model
#: section (weight-balanced hidden irreps 36x0e+36x1o+36x2e, 1,033,525 parameters).
MODEL_DEFAULTS: Dict[str, Any] = dict(
    models.default_model_config(), name="segnn", hidden_features=128, lmax_hidden=2, lmax_attr=3,
    num_layers=7, norm="instance", pool="avg", task="graph")

SPLITS = ("train", "valid", "test")
_SPLIT_LIMIT = {"train": "n_train", "valid": "n_valid", "test": "n_test"}
_SPLIT_CHOICES = ("cormorant", "random")
_STATS_FILE = "qm9_standardisation.json"


class QM9InputError(TaskInputError):
    """A structure file given to :func:`predict` cannot be read or holds an element QM9 lacks."""


class Standardisation(NamedTuple):
    """``z = (y - mean) / mad`` of a target, from the training set (float64, the target's unit)."""

    target: str
    unit: str
    mean: float
    mad: float
    atom_reference: bool

    def to_json(self) -> Dict[str, Any]:
        return dict(self._asdict())


# --------------------------------------------------------------------------------------------------
# Config


def validate_config(config: Any) -> Dict[str, Any]:
    """Checks a whole QM9 config and returns it as a plain nested dict with defaults filled in.

    Runs on the host before any data is read or anything is compiled.

    Raises:
        ConfigError: an unknown option or an invalid value; the message starts with its dotted
            name (e.g. ``config.data.target``).
    """
    config, sections = task_sections(config, "qm9", {
        "data": DATA_DEFAULTS,
        "batch": BATCH_DEFAULTS,
    })
    data, batch = sections["data"], sections["batch"]
    if data["target"] not in qm9_data.TARGETS:
        raise ConfigError(f"config.data.target: expected one of {', '.join(qm9_data.TARGETS)}, "
                          f"got {data['target']!r}")
    if not isinstance(data["atom_reference"], bool):
        raise ConfigError(f"config.data.atom_reference: expected True or False, "
                          f"got {data['atom_reference']!r}")
    if data["atom_reference"] and data["target"] not in qm9_data.ATOM_REFERENCES_HARTREE:
        raise ConfigError(f"config.data.atom_reference: atom references exist for "
                          f"{', '.join(qm9_data.ATOM_REFERENCES_HARTREE)}, not for target "
                          f"{data['target']!r}")
    cutoff = data["cutoff"]
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not cutoff > 0:
        raise ConfigError(f"config.data.cutoff: expected a positive number (Angstrom), "
                          f"got {cutoff!r}")
    if data["split"] not in _SPLIT_CHOICES:
        raise ConfigError(f"config.data.split: expected one of {_SPLIT_CHOICES}, "
                          f"got {data['split']!r}")
    seed = data["split_seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"config.data.split_seed: expected an integer >= 0, got {seed!r}")
    for key in ("n_train", "n_valid", "n_test"):
        positive_int(data, key, "config.data", optional=True)
    for key in ("source", "data_dir"):
        if data[key] is not None and not isinstance(data[key], str):
            raise ConfigError(f"config.data.{key}: expected a path or None, got {data[key]!r}")
    for key in ("batch_size", "eval_batch_size"):
        positive_int(batch, key, "config.batch", optional=True)
    if batch["batch_size"] is None:
        raise ConfigError("config.batch.batch_size: expected a positive integer, got None")
    check_budget_options(batch)
    model = models.validate_model_config(dict(MODEL_DEFAULTS, **(config.get("model") or {})))
    if model["task"] != "graph":
        raise ConfigError(f"config.model.task: QM9 predicts one value per molecule, expected "
                          f"'graph', got {model['task']!r}")
    return {"task": "qm9", "data": data, "batch": batch, "model": model,
            "train": training.validate_train_config(config.get("train"))}


# --------------------------------------------------------------------------------------------------
# Featurizer and model


def featurize(graph: jraph.GraphsTuple, *, lmax_attr: int) -> SteerableGraphsTuple:
    """The steerable inputs of a (padded) batch of molecules (pure, jit-able, padding-safe).

    Args:
        graph: nodes "positions" ``[N, 3]`` (Angstrom) and "features" ``[N, 5]`` (one-hot
            H, C, N, O, F); radius-graph edges.
        lmax_attr: highest order of the spherical-harmonic attributes.

    Returns:
        Node features ``[N, 5x0e]``, node and edge attributes ``[N or E, sh(lmax_attr)]``
        ("component" normalisation), extra message features ``[E, 1x0e]`` = ``|x_j - x_i|^2``.
    """
    graph = jax.tree.map(jnp.asarray, graph)  # host batches too (e.g. Haiku's init)
    positions = graph.nodes["positions"]
    vectors = edge_vectors(graph)  # [E, 3] x_j - x_i
    edge_attr = edge_attributes(vectors, lmax_attr, normalization="component")
    node_attr = node_attributes(edge_attr, graph.receivers, positions.shape[0],
                                edge_mask=edge_mask(graph))
    features = e3nn.IrrepsArray("5x0e", graph.nodes["features"].astype(positions.dtype))
    extra = e3nn.IrrepsArray("1x0e", jnp.sum(vectors**2, axis=-1, keepdims=True))
    return SteerableGraphsTuple(graph, features, node_attr, edge_attr, extra)


def make_model(config: Any) -> hk.TransformedWithState:
    """``forward(graph, is_training=False) -> [G]`` standardised predictions, transformed by Haiku.

    Its ``init`` is compiled (:func:`segnn_jax.transform_with_jitted_init`).

    Args:
        config: a whole QM9 config (validated here).
    """
    cfg = validate_config(config)
    factory = models.create_model(cfg["model"], output_irreps="1x0e")
    lmax_attr = cfg["model"]["lmax_attr"]

    def forward(graph: jraph.GraphsTuple, is_training: bool = False) -> jnp.ndarray:
        st_graph = featurize(graph, lmax_attr=lmax_attr)
        return factory()(st_graph, is_training).array[:, 0]  # [G]

    return transform_with_jitted_init(forward)


def make_loss_fn(model: hk.TransformedWithState, mad: float):
    """The engine's objective: L1 on standardised targets, summed over the real graphs.

    Sums: ``loss_sum`` (|z_pred - z|), ``mae_sum`` (the same in the target's unit, ``mad`` times
    it), ``count`` (real molecules). The engine divides them once after summing over batches.

    Args:
        model: from :func:`make_model`.
        mad: the training MAD, the factor from standardised to physical units.
    """
    mad = float(mad)

    def loss_fn(params, model_state, graph, rng, is_training):
        predicted, model_state = model.apply(params, model_state, rng, graph, is_training)  # [G]
        mask = graph_mask(graph)
        error = jnp.where(mask, jnp.abs(predicted - graph.globals["targets"][:, 0]), 0.0)
        loss_sum = jnp.sum(error)
        sums = {"count": jnp.sum(mask).astype(predicted.dtype), "mae_sum": mad * loss_sum}
        return loss_sum, (sums, model_state)

    return loss_fn


# --------------------------------------------------------------------------------------------------
# Data


def _split_positions(cfg: Dict[str, Any], n_molecules: int) -> Dict[str, np.ndarray]:
    data = cfg["data"]
    if data["split"] == "cormorant":
        if n_molecules != qm9_data.N_CHARACTERISED:
            raise ConfigError(
                f"config.data.split: the Cormorant split needs the {qm9_data.N_CHARACTERISED} "
                f"characterised molecules, the source has {n_molecules}; use "
                f"--config.data.split=random for other data")
        return qm9_data.cormorant_split(n_molecules, seed=data["split_seed"])
    # The Cormorant proportions (100,000 / 17,748 / 13,083 of 130,831), seeded.
    perm = np.random.RandomState(data["split_seed"]).permutation(n_molecules)
    n_train = round(n_molecules * qm9_data.SPLIT_SIZES["train"] / qm9_data.N_CHARACTERISED)
    n_valid = round(n_molecules * qm9_data.SPLIT_SIZES["valid"] / qm9_data.N_CHARACTERISED)
    return {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid],
            "test": perm[n_train + n_valid:]}


def load_splits(config: Any, splits: Sequence[str] = SPLITS) -> Dict[str, qm9_data.QM9Molecules]:
    """The molecules of the requested splits (through the checked ``.npz`` cache).

    ``data.n_train`` / ``n_valid`` / ``n_test`` keep the first molecules of a split (the split is
    already a random permutation, so this is a random subset); None keeps the whole split.

    Raises:
        ConfigError: the Cormorant split on a source that is not the full characterised set, or a
            split that is empty.
        QM9DataNotFoundError: the source is missing (e.g. qm9pack not installed).
    """
    cfg = validate_config(config)
    data = cfg["data"]
    molecules = qm9_data.load_qm9(data["source"], data_dir=data["data_dir"])
    if np.any(np.diff(molecules.index) <= 0):
        molecules = molecules.sorted_by_index()
    positions = _split_positions(cfg, len(molecules))
    out = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        limit = data[_SPLIT_LIMIT[split]]
        chosen = positions[split][:limit] if limit is not None else positions[split]
        if len(chosen) == 0:
            raise ConfigError(f"config.data: the {split} split of this source is empty "
                              f"({len(molecules)} molecules)")
        out[split] = molecules.subset(chosen)
    return out


def standardise(cfg: Dict[str, Any], train: qm9_data.QM9Molecules) -> Standardisation:
    """Mean and mean absolute deviation of the target over the TRAINING molecules (float64)."""
    data = cfg["data"]
    values = qm9_data.target_values(train, data["target"],
                                    atom_reference=data["atom_reference"])[:, 0]
    mean = float(np.mean(values))
    mad = float(np.mean(np.abs(values - mean)))
    if not mad > 0:
        raise ValueError(f"target {data['target']!r} is constant over the {len(train)} training "
                         f"molecules; cannot standardise")
    return Standardisation(data["target"], qm9_data.TARGETS[data["target"]].unit, mean, mad,
                           bool(data["atom_reference"]))


def _graphs(cfg: Dict[str, Any], molecules: qm9_data.QM9Molecules,
            stats: Standardisation) -> List[jraph.GraphsTuple]:
    """Radius graphs whose ``globals["targets"]`` ``[1, 1]`` are standardised, float32."""
    data = cfg["data"]
    graphs = qm9_data.molecules_to_graphs(molecules, data["target"], cutoff=float(data["cutoff"]),
                                          atom_reference=data["atom_reference"])
    # float64 subtraction first: total energies (~1e7 meV) lose their meV digits in float32.
    return [g._replace(globals={"targets": ((g.globals["targets"] - stats.mean) / stats.mad)
                                .astype(np.float32)}) for g in graphs]


def make_loaders(config: Any, splits: Mapping[str, qm9_data.QM9Molecules],
                 stats: Standardisation) -> Dict[str, GraphLoader]:
    """Graph loaders for the given splits; the training one shuffles with ``config.train.seed``.

    One budget is estimated from the graphs of all given splits together (so training and
    evaluation batches of equal size share their padded shapes, ``config.batch.buckets``
    fractions of it); ``config.batch.max_nodes`` / ``max_edges`` override it. Evaluation never
    drops a molecule.
    """
    cfg = validate_config(config)
    batch_size = cfg["batch"]["batch_size"]
    eval_size = cfg["batch"]["eval_batch_size"] or batch_size
    graphs = {split: _graphs(cfg, molecules, stats) for split, molecules in splits.items()}
    every = [g for split_graphs in graphs.values() for g in split_graphs]
    budgets = {size: batch_budget(cfg["batch"], every, size) for size in {batch_size, eval_size}}
    loaders = {}
    for split, split_graphs in graphs.items():
        size = batch_size if split == "train" else eval_size
        loaders[split] = GraphLoader(split_graphs, size, budget=budgets[size],
                                     shuffle=split == "train", seed=int(cfg["train"]["seed"]),
                                     buckets=cfg["batch"]["buckets"])
    return loaders


# --------------------------------------------------------------------------------------------------
# Training, evaluation


def _train_throughput(run_dir: Path) -> Optional[float]:
    """Median training molecules/s over the logged windows, the first (compilation) excluded."""
    events = [e for e in training.read_metrics(run_dir) if e.get("event") == "train"]
    rates = [e["graphs_per_s"] for e in events[1:] if "graphs_per_s" in e]
    if not rates and events:
        rates = [events[0]["graphs_per_s"]]
    return float(np.median(rates)) if rates else None


def run_qm9(config: Any, run_dir: Union[str, Path], *,
            command: Optional[str] = None) -> Dict[str, Any]:
    """Trains and evaluates one QM9 target, writes the run directory and ``results.json``.

    The validation and test MAE (whole sets, the target's unit) are those at the best validation
    evaluation (every ``config.train.eval_every`` epochs, and after the last epoch).

    Args:
        config: the whole QM9 config.
        run_dir: the run directory (resumed if it holds checkpoints).
        command: the command line to record (default: ``sys.argv``).

    Returns:
        The results written to ``run_dir/results.json``: ``target``, ``unit``, ``val_mae``,
        ``test_mae``, ``n_train``, ``n_valid``, ``n_test``, ``epochs``, ``best_epoch``,
        ``wall_time_s``, ``train_graphs_per_s``, ``command``, ``git_revision`` and more.
    """
    cfg = validate_config(config)
    run_dir = Path(run_dir).resolve()  # orbax checkpoints need an absolute path
    start = time.perf_counter()
    splits = load_splits(cfg)
    stats = standardise(cfg, splits["train"])
    loaders = make_loaders(cfg, splits, stats)
    run_dir.mkdir(parents=True, exist_ok=True)
    training.atomic_write_text(run_dir / _STATS_FILE, json.dumps(stats.to_json(), indent=2))
    print(f"QM9 {stats.target} [{stats.unit}]: {len(splits['train'])} training, "
          f"{len(splits['valid'])} validation, {len(splits['test'])} test molecules; training "
          f"mean {stats.mean:.6g}, MAD {stats.mad:.6g}"
          + (" (atomisation energies)" if stats.atom_reference else ""), flush=True)
    data_seconds = time.perf_counter() - start
    model = make_model(cfg)
    result = training.fit(
        model.init, make_loss_fn(model, stats.mad), loaders["train"], config=cfg["train"],
        run_dir=run_dir, val_data=loaders["valid"], test_data=loaders["test"], full_config=cfg,
        data_stats={"train": loaders["train"].describe(), "standardisation": stats.to_json()})
    best = result.best
    results = {
        "task": "qm9",
        "target": stats.target,
        "unit": stats.unit,
        "val_mae": best["val"]["mae"] if best else None,
        "test_mae": best["test"]["mae"] if best else None,
        "val_count": best["val"]["count"] if best else None,
        "test_count": best["test"]["count"] if best else None,
        "best_epoch": best["epoch"] + 1 if best else None,
        "best_step": best["step"] if best else None,
        "epochs": cfg["train"]["num_epochs"],
        "steps": int(jax.device_get(result.state.step)),
        "time_budget_s": cfg["train"]["time_budget_s"],
        "stopped_by_time_budget": result.stopped_by_time_budget,
        "n_train": len(splits["train"]),
        "n_valid": len(splits["valid"]),
        "n_test": len(splits["test"]),
        "split": cfg["data"]["split"],
        "atom_reference": cfg["data"]["atom_reference"],
        "pool": cfg["model"]["pool"],
        "hidden_irreps": str(models.hidden_irreps(cfg["model"])),
        "num_layers": cfg["model"]["num_layers"],
        "standardisation": stats.to_json(),
        "data_time_s": round(data_seconds, 1),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "train_graphs_per_s": _train_throughput(run_dir),
        "command": command if command is not None else " ".join(sys.argv),
        "git_revision": training.git_revision(),
        "num_parameters": training.count_parameters(result.state.params),
        "compilations": len(result.compilations),
    }
    training.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    if best:
        print(f"\nQM9 {stats.target} MAE at the best validation (epoch {results['best_epoch']}): "
              f"validation {results['val_mae']:.5g} {stats.unit} ({int(results['val_count'])} "
              f"molecules), test {results['test_mae']:.5g} {stats.unit} "
              f"({int(results['test_count'])} molecules)", flush=True)
    return results


def train(config: Any, run_dir: Union[str, Path], *,
          command: Optional[str] = None) -> Dict[str, Any]:
    """The ``segnn train`` entry point of this task: :func:`run_qm9`."""
    return run_qm9(config, run_dir, command=command)


def _read_run(run_dir: Path) -> Tuple[Dict[str, Any], Standardisation]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    cfg = validate_config(json.loads(path.read_text()))
    stats_path = Path(run_dir) / _STATS_FILE
    if not stats_path.is_file():
        raise FileNotFoundError(f"{run_dir}: {stats_path.name} (the training standardisation) "
                                f"is missing")
    stats = Standardisation(**json.loads(stats_path.read_text()))
    return cfg, stats


def restore_params(config: Any, run_dir: Union[str, Path], example: jraph.GraphsTuple):
    """``(params, model_state, step)`` of the run's best checkpoint (see
    :func:`segnn_jax.training.restore_best_params`)."""
    cfg = validate_config(config)
    return training.restore_best_params(make_model(cfg).init, cfg["train"], run_dir, example)


def evaluate(run_dir: Union[str, Path], split: str = "test") -> Dict[str, Any]:
    """Evaluates the best checkpoint of a run on a whole split (``segnn evaluate``).

    Returns:
        ``{"split", "target", "unit", "mae", "loss" (MAE of the standardised target), "count",
        "checkpoint_step"}``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cfg, stats = _read_run(Path(run_dir))
    molecules = load_splits(cfg, (split,))
    loader = make_loaders(cfg, molecules, stats)[split]
    model = make_model(cfg)
    params, model_state, step = restore_params(cfg, run_dir, next(iter(loader.epoch_batches(0))))
    metrics = training.evaluate(training.make_eval_step(make_loss_fn(model, stats.mad)), params,
                                model_state, loader)
    out = {"split": split, "target": stats.target, "unit": stats.unit, "mae": metrics["mae"],
           "loss": metrics["loss"], "count": metrics["count"], "checkpoint_step": step}
    print(f"QM9 {stats.target} {split} MAE: {out['mae']:.5g} {stats.unit} over "
          f"{int(out['count'])} molecules", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Prediction


def _read_one_file(path: Path) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """``[(name, atomic_numbers [n], positions [n, 3])]`` of one file (ASE, or QM9's own xyz)."""
    import ase.io

    try:
        structures = ase.io.read(str(path), index=":")
        return [(f"{path.name}:{k}", np.asarray(a.numbers), np.asarray(a.positions, np.float64))
                for k, a in enumerate(structures)]
    except Exception as ase_error:  # noqa: BLE001 -- ASE raises many types; QM9's layout next
        try:
            _, numbers, positions, _ = qm9_data.parse_xyz_text(
                path.read_text(errors="replace"), source=str(path))
        except (qm9_data.QM9FormatError, OSError):
            raise QM9InputError(f"{path}: not a structure file ASE can read ({ase_error})"
                                ) from ase_error
        return [(f"{path.name}:0", numbers, positions)]


def read_structures(paths: Sequence[Union[str, Path]]) -> Tuple[List[str],
                                                                 qm9_data.QM9Molecules]:
    """Molecules from xyz or ASE-readable files (every frame of every file).

    Files ASE cannot read are tried as QM9's own ``dsgdb9nsd_*.xyz`` layout.

    Returns:
        ``(names ["file:frame"], molecules)`` with NaN properties.

    Raises:
        QM9InputError: a missing or unreadable file, an empty structure, non-finite positions,
            or an element other than H, C, N, O, F (the message names file and element).
    """
    from ase.data import chemical_symbols

    names, numbers, positions, counts = [], [], [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise QM9InputError(f"{path}: no such file")
        for name, z, pos in _read_one_file(path):
            if len(z) == 0:
                raise QM9InputError(f"{name}: a structure without atoms")
            unknown = sorted({int(v) for v in z} - set(qm9_data.ATOMIC_NUMBERS))
            if unknown:
                symbols = [chemical_symbols[v] if 0 <= v < len(chemical_symbols) else str(v)
                           for v in unknown]
                raise QM9InputError(
                    f"{path}: element(s) {', '.join(symbols)} in {name}; a QM9 model knows only "
                    f"{', '.join(qm9_data.ELEMENTS)}")
            if not np.all(np.isfinite(pos)):
                raise QM9InputError(f"{name}: non-finite positions")
            names.append(name)
            numbers.append(z)
            positions.append(pos)
            counts.append(len(z))
    if not names:
        raise QM9InputError("no structures in the given files")
    molecules = qm9_data.QM9Molecules(
        np.concatenate(numbers), np.concatenate(positions), np.asarray(counts),
        np.arange(1, len(names) + 1), np.full((len(names), len(qm9_data.PROPERTY_NAMES)), np.nan))
    return names, molecules


def predict(run_dir: Union[str, Path], input_path: Union[str, Path, Sequence[Union[str, Path]]],
            output_path: Union[str, Path, None] = None) -> Path:
    """Predicts a run's target for molecules in xyz or ASE-readable files (best checkpoint).

    Args:
        run_dir: a trained run directory, an artifact of one (``segnn export``), or a loaded
            :class:`segnn_jax.artifact.TrainedModel`.
        input_path: a structure file (every frame is a molecule), or a list of files.
        output_path: where to write: ``.json`` for JSON, anything else CSV; default
            ``<first input stem>_<target>.csv`` next to the first input.

    Returns:
        The output path. Each row: ``name`` (file:frame), ``n_atoms``, ``formula``, the target in
        its unit (total energy for U0/U/H/G even when the run learnt atomisation energies) and
        ``unit``.

    Raises:
        QM9InputError: unreadable file or an element the model does not know.
    """
    from ase import Atoms

    from segnn_jax.artifact import load_trained

    paths = [input_path] if isinstance(input_path, (str, Path)) else list(input_path)
    trained = load_trained(run_dir, task="qm9")
    cfg, stats = trained.config, Standardisation(**trained.side_files[_STATS_FILE])
    names, molecules = read_structures(paths)
    # Targets are unknown: zero placeholders (the graphs carry the field the batches need).
    graphs = [g._replace(globals={"targets": np.zeros((1, 1), np.float32)})
              for g in qm9_data.molecules_to_graphs(molecules, (), cutoff=float(cfg["data"]["cutoff"]))]
    eval_size = cfg["batch"]["eval_batch_size"] or cfg["batch"]["batch_size"]
    loader = GraphLoader(graphs, eval_size, budget=batch_budget(cfg["batch"], graphs, eval_size),
                         buckets=cfg["batch"]["buckets"])
    # Without shuffling the loader keeps the input order; the real graphs of the batches,
    # concatenated, are the molecules in order.
    standardised = np.concatenate([
        trained.apply(batch)[np.asarray(graph_mask(batch))]
        for batch in loader.epoch_batches(0)]).astype(np.float64)
    values = standardised * stats.mad + stats.mean
    if stats.atom_reference:
        target = qm9_data.TARGETS[stats.target]
        values = values + target.factor * qm9_data.atom_reference_energy(molecules, target.column)
    offsets = molecules.offsets
    rows = [{"name": name, "n_atoms": int(molecules.n_atoms[m]),
             "formula": Atoms(numbers=molecules.atomic_numbers[offsets[m]:offsets[m + 1]])
             .get_chemical_formula(),
             stats.target: float(values[m]), "unit": stats.unit}
            for m, name in enumerate(names)]
    first = Path(paths[0])
    output_path = Path(output_path) if output_path is not None else \
        first.with_name(f"{first.stem}_{stats.target}.csv")
    return write_predictions(rows, output_path, target=stats.target, unit=stats.unit,
                             run_dir=str(trained.info.get("artifact")
                                         or trained.info.get("run_dir")))


def write_predictions(rows: Sequence[Mapping[str, Any]], path: Union[str, Path], *, target: str,
                      unit: str, run_dir: str) -> Path:
    """Writes prediction rows: JSON (``{"target", "unit", "run_dir", "predictions"}``) when the
    path ends in ``.json``, else CSV with a header (the rows' keys). Returns the path."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        text = json.dumps({"target": target, "unit": unit, "run_dir": run_dir,
                           "predictions": list(rows)}, indent=2)
        training.atomic_write_text(path, text)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path
