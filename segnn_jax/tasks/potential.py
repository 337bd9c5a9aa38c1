"""Interatomic potential (S2EF-style): structures -> SEGNN -> total energy and forces.

Data: any file or folder :func:`segnn_jax.datasets.oc20.read_oc20` reads whose structures carry a
total energy and forces (calculator results), e.g. the EMT relaxation frames made by
``python -m segnn_jax.datasets.emt_frames`` (EMT, NOT DFT). Frames are split by their ``sid``
(the relaxation they come from; a frame without one is its own group), so no relaxation has
frames in two splits: the test split holds held-out structures.

Model: :mod:`segnn_jax.potential` (per-atom energies summed per structure; conservative forces
``-dE/dx`` or a direct ``1x1o`` head). Fixed constants fitted on the training split, stored in
the run directory as ``potential_spec.json``: per-element reference energies (least squares on
the composition), the energy scale (RMS of the training force components) and the average
number of neighbours (sum of envelope values per atom).

Loss per structure with n atoms (summed over the batch, averaged by the engine)::

    energy_weight * ((E_pred - E) / n)^2 + force_weight * |F_pred - F|^2 / (3 n)

Metrics: ``energy_mae`` (eV per structure), ``energy_per_atom_mae`` (eV/atom), ``force_mae``
and ``force_rmse`` (eV/A, per component). Baseline: the per-element reference energies alone
(a ridge/least-squares fit on the composition) with zero forces.

Config sections: ``data`` (:data:`DATA_DEFAULTS`), ``batch`` (:data:`BATCH_DEFAULTS`),
``potential`` (:data:`POTENTIAL_DEFAULTS`), ``loss`` (:data:`LOSS_DEFAULTS`), ``model``
(:mod:`segnn_jax.tasks.models`, node-level, no norm) and ``train`` (:mod:`segnn_jax.training`).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from segnn_jax import potential as pot
from segnn_jax import training
from segnn_jax.batching import GraphLoader
from segnn_jax.graph import graph_mask, node_graph_index, node_mask, pad_graph
from segnn_jax.tasks import TaskInputError, models
from segnn_jax.tasks.common import (batch_budget, check_budget_options, positive_int,
                                    task_sections)
from segnn_jax.training.config import ConfigError

__all__ = [
    "BATCH_DEFAULTS",
    "DATA_DEFAULTS",
    "DESCRIPTION",
    "LOSS_DEFAULTS",
    "MODEL_DEFAULTS",
    "POTENTIAL_DEFAULTS",
    "Frame",
    "LoadedPotential",
    "PotentialDataError",
    "PotentialInputError",
    "baseline_metrics",
    "evaluate",
    "example_graph",
    "fit_spec",
    "frame_graph",
    "load_frames",
    "load_potential",
    "load_run",
    "make_loss_fn",
    "predict",
    "restore_params",
    "split_frames",
    "train",
    "validate_config",
]

DESCRIPTION = ("Interatomic potential (S2EF-style): total energy and forces (conservative or "
               "direct) of periodic structures, e.g. EMT relaxation frames")

DATA_DEFAULTS: dict[str, Any] = {
    "path": None,
    # EMT's own interactions reach ~4.8 A; two message-passing layers of 4 A see 8 A.
    "cutoff": 4.0,
    "split_seed": 0,
    "valid_fraction": 0.1,
    "test_fraction": 0.1,
    "n_train": None,
    "n_valid": None,
    "n_test": None,
    # Drop frames whose largest atomic force exceeds this (eV/A), e.g. the first frames of
    # relaxations that start with an adsorbate far from equilibrium; None keeps every frame.
    "max_force": None,
}

BATCH_DEFAULTS: dict[str, Any] = {
    "batch_size": 8,
    "eval_batch_size": None,
    "max_nodes": None,
    "max_edges": None,
    "buckets": (0.5, 0.75, 1.0),
}

POTENTIAL_DEFAULTS: dict[str, Any] = {
    "head": "conservative",
    "embedding_dim": 16,
    "num_radial": 8,
    "envelope_exponent": 5,
}

LOSS_DEFAULTS: dict[str, Any] = {"energy_weight": 1.0, "force_weight": 1.0}

MODEL_DEFAULTS: dict[str, Any] = dict(
    models.default_model_config(), name="segnn", hidden_irreps="32x0e+16x1o", lmax_hidden=1,
    lmax_attr=1, num_layers=2, norm="none", task="node")

SPLITS = ("train", "valid", "test")
_SPEC_FILE = "potential_spec.json"
_SPLIT_LIMIT = {"train": "n_train", "valid": "n_valid", "test": "n_test"}


class PotentialDataError(ValueError):
    """The data cannot make the requested training set (message says why)."""


class PotentialInputError(TaskInputError):
    """A structure file given to :func:`predict` is unreadable or holds an unknown element."""


class Frame(NamedTuple):
    """One labelled structure (float64, Angstrom, eV, eV/A)."""

    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float
    forces: np.ndarray
    group: str
    name: str


# --------------------------------------------------------------------------------------------------
# Config


def _number(section: Mapping[str, Any], key: str, name: str, *, low: float,
            inclusive: bool) -> None:
    value = section[key]
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and (value >= low if inclusive else value > low))
    if not ok:
        raise ConfigError(f"{name}.{key}: expected a number {'>=' if inclusive else '>'} {low}, "
                          f"got {value!r}")


def validate_config(config: Any) -> dict[str, Any]:
    """Checks a whole potential config; returns it as plain dicts with the defaults filled in.

    Raises:
        ConfigError: an unknown option or an invalid value, named by its dotted path.
    """
    config, sections = task_sections(config, "potential", {
        "data": DATA_DEFAULTS,
        "batch": BATCH_DEFAULTS,
        "potential": POTENTIAL_DEFAULTS,
        "loss": LOSS_DEFAULTS,
    })
    data, batch, potential, loss = (
        sections["data"], sections["batch"],
        sections["potential"], sections["loss"])
    if data["path"] is not None and not isinstance(data["path"], str):
        raise ConfigError(f"config.data.path: expected a path, got {data['path']!r}")
    _number(data, "cutoff", "config.data", low=0, inclusive=False)
    for key in ("valid_fraction", "test_fraction"):
        _number(data, key, "config.data", low=0, inclusive=False)
        if data[key] >= 1:
            raise ConfigError(f"config.data.{key}: expected a number in (0, 1), got {data[key]!r}")
    if data["valid_fraction"] + data["test_fraction"] >= 1:
        raise ConfigError("config.data.test_fraction: valid_fraction + test_fraction must be < 1")
    positive_int(data, "split_seed", "config.data", minimum=0)
    for key in ("n_train", "n_valid", "n_test"):
        positive_int(data, key, "config.data", optional=True)
    if data["max_force"] is not None:
        _number(data, "max_force", "config.data", low=0, inclusive=False)
    positive_int(batch, "batch_size", "config.batch")
    positive_int(batch, "eval_batch_size", "config.batch", optional=True)
    check_budget_options(batch)
    if potential["head"] not in pot.HEADS:
        raise ConfigError(f"config.potential.head: expected one of {pot.HEADS}, got "
                          f"{potential['head']!r}")
    positive_int(potential, "embedding_dim", "config.potential")
    positive_int(potential, "num_radial", "config.potential")
    positive_int(potential, "envelope_exponent", "config.potential", minimum=2)
    for key in ("energy_weight", "force_weight"):
        _number(loss, key, "config.loss", low=0, inclusive=True)
    if loss["energy_weight"] + loss["force_weight"] <= 0:
        raise ConfigError("config.loss: energy_weight and force_weight are both 0")
    model = models.validate_model_config(dict(MODEL_DEFAULTS, **(config.get("model") or {})))
    if model["task"] != "node" or model["norm"] != "none":
        raise ConfigError(f"config.model: a potential sums per-atom energies of independent "
                          f"atoms: expected task='node' and norm='none', got "
                          f"task={model['task']!r}, norm={model['norm']!r}")
    return {"task": "potential", "data": data, "batch": batch, "potential": potential,
            "loss": loss, "model": model,
            "train": training.validate_train_config(config.get("train"))}


# --------------------------------------------------------------------------------------------------
# Data


def load_frames(path: str | Path) -> tuple[list[Frame], str]:
    """Labelled frames (energy and forces required) from anything ``read_oc20`` reads.

    Returns:
        ``(frames, level_of_theory)`` (the records' ``level_of_theory``, e.g. "EMT").

    Raises:
        PotentialDataError: no frames, or a frame without energy or forces.
    """
    from segnn_jax.datasets.oc20 import read_oc20

    records = read_oc20(path)
    if not records:
        raise PotentialDataError(f"{path}: no structures")
    frames = []
    for record in records:
        if record.energy is None or record.forces is None:
            raise PotentialDataError(f"{record.source}: no {'energy' if record.energy is None else 'forces'}"
                                     f"; a potential trains on frames with both")
        group = str(record.sid) if record.sid is not None else record.source
        frames.append(Frame(record.positions, record.atomic_numbers, record.cell, record.pbc,
                            float(record.energy), record.forces, group, record.source))
    levels = {str(r.extras.get("level_of_theory", "unspecified")) for r in records}
    level = levels.pop() if len(levels) == 1 else "mixed: " + ", ".join(sorted(levels))
    return frames, level


def split_frames(cfg: dict[str, Any], frames: Sequence[Frame]) -> dict[str, list[Frame]]:
    """Seeded split of whole groups (relaxations): test gets ``test_fraction`` of the groups,
    validation ``valid_fraction``, training the rest; then ``max_force`` drops frames with a
    larger atomic force, and the ``n_*`` caps on frames apply.

    Raises:
        PotentialDataError: too few groups for three non-empty splits.
    """
    data = cfg["data"]
    groups = sorted({f.group for f in frames})
    n_test = max(1, round(len(groups) * data["test_fraction"]))
    n_valid = max(1, round(len(groups) * data["valid_fraction"]))
    if n_test + n_valid >= len(groups):
        raise PotentialDataError(f"{len(groups)} relaxations (groups) are too few for a test "
                                 f"({n_test}), validation ({n_valid}) and training split")
    order = [groups[k] for k in np.random.RandomState(data["split_seed"]).permutation(len(groups))]
    assigned = {g: "test" for g in order[:n_test]}
    assigned.update({g: "valid" for g in order[n_test:n_test + n_valid]})
    out: dict[str, list[Frame]] = {split: [] for split in SPLITS}
    max_force = data["max_force"]
    for frame in frames:
        if max_force is not None and np.linalg.norm(frame.forces, axis=1).max() > max_force:
            continue
        out[assigned.get(frame.group, "train")].append(frame)
    for split in SPLITS:
        limit = data[_SPLIT_LIMIT[split]]
        if limit is not None:
            out[split] = out[split][:limit]
    return out


def frame_graph(frame: Frame, cutoff: float) -> jraph.GraphsTuple:
    """The periodic radius graph of a frame with its labels (float32): nodes ``forces``,
    globals ``energy``."""
    return pot.structure_graph(frame.positions, frame.atomic_numbers, frame.cell, frame.pbc,
                               cutoff, nodes={"forces": np.asarray(frame.forces, np.float32)},
                               globals={"energy": np.asarray([frame.energy], np.float32)})


def _neighbour_weight_sums(graph: jraph.GraphsTuple, cutoff: float, exponent: int) -> np.ndarray:
    vectors = (graph.nodes["positions"][graph.senders] - graph.nodes["positions"][graph.receivers]
               + graph.edges["shifts"])
    distance = np.linalg.norm(vectors.astype(np.float64), axis=1)
    envelope = np.asarray(pot.polynomial_envelope(jnp.asarray(distance), cutoff, exponent))
    return np.bincount(graph.receivers, weights=envelope, minlength=int(graph.n_node[0]))


def fit_spec(cfg: dict[str, Any], train: Sequence[Frame],
             train_graphs: Sequence[jraph.GraphsTuple]) -> pot.PotentialSpec:
    """The potential's fixed constants from the training frames (see the module docstring)."""
    compositions = [Counter(int(z) for z in f.atomic_numbers) for f in train]
    element_energies, _ = pot.fit_element_energies(compositions, [f.energy for f in train])
    forces = np.concatenate([f.forces.reshape(-1) for f in train])
    rms = float(np.sqrt(np.mean(forces**2)))
    potential = cfg["potential"]
    sums = np.concatenate([_neighbour_weight_sums(g, cfg["data"]["cutoff"],
                                                  potential["envelope_exponent"])
                           for g in train_graphs])
    return pot.PotentialSpec(
        model=cfg["model"], cutoff=float(cfg["data"]["cutoff"]), head=potential["head"],
        embedding_dim=potential["embedding_dim"], num_radial=potential["num_radial"],
        envelope_exponent=potential["envelope_exponent"],
        avg_num_neighbors=max(float(np.mean(sums)), 1.0),
        energy_scale=rms if rms > 0 else 1.0, element_energies=element_energies)


def baseline_metrics(spec: pot.PotentialSpec, frames: Sequence[Frame]) -> dict[str, float]:
    """Per-element reference energies and zero forces, on the given frames."""
    predicted = np.asarray([sum(spec.element_energies.get(int(z), 0.0) for z in f.atomic_numbers)
                            for f in frames])
    energy = np.asarray([f.energy for f in frames])
    n_atoms = np.asarray([len(f.atomic_numbers) for f in frames])
    forces = np.concatenate([f.forces.reshape(-1) for f in frames])
    return {"energy_mae": float(np.mean(np.abs(predicted - energy))),
            "energy_per_atom_mae": float(np.mean(np.abs(predicted - energy) / n_atoms)),
            "force_mae": float(np.mean(np.abs(forces))),
            "force_rmse": float(np.sqrt(np.mean(forces**2))), "count": len(frames)}


# --------------------------------------------------------------------------------------------------
# Loss


def make_loss_fn(model: hk.TransformedWithState, spec: pot.PotentialSpec,
                 energy_weight: float, force_weight: float):
    """The engine's objective (module docstring) with its metric sums."""
    energy_weight, force_weight = float(energy_weight), float(force_weight)

    def loss_fn(params, model_state, graph, rng, is_training):
        del rng, is_training
        out = pot.predict(model, params, model_state, graph, head=spec.head)
        n_nodes = graph.nodes["positions"].shape[0]
        n_graphs = graph.n_node.shape[0]
        real_graph = graph_mask(graph)
        real_node = node_mask(graph, n_nodes)
        n_atoms = jnp.maximum(graph.n_node, 1).astype(out["energy"].dtype)
        energy_error = jnp.where(real_graph, out["energy"] - graph.globals["energy"], 0.0)
        force_error = jnp.where(real_node[:, None], out["forces"] - graph.nodes["forces"], 0.0)
        force_sq = jax.ops.segment_sum(jnp.sum(force_error**2, axis=1),
                                       node_graph_index(graph, n_nodes), num_segments=n_graphs)
        per_graph = (energy_weight * (energy_error / n_atoms) ** 2
                     + force_weight * force_sq / (3.0 * n_atoms))
        loss_sum = jnp.sum(jnp.where(real_graph, per_graph, 0.0))
        components = 3.0 * jnp.sum(real_node).astype(loss_sum.dtype)
        sums = {
            "count": jnp.sum(real_graph).astype(loss_sum.dtype),
            "energy_mae_sum": jnp.sum(jnp.abs(energy_error)),
            "energy_per_atom_mae_sum": jnp.sum(jnp.abs(energy_error) / n_atoms),
            "force_mae_sum": jnp.sum(jnp.abs(force_error)),
            "force_mae_count": components,
            "force_mse_sum": jnp.sum(force_error**2),
            "force_mse_count": components,
        }
        return loss_sum, (sums, model_state)

    return loss_fn


def _metrics(raw: Mapping[str, float] | None) -> dict[str, float] | None:
    if raw is None:
        return None
    return {"energy_mae": raw["energy_mae"], "energy_per_atom_mae": raw["energy_per_atom_mae"],
            "force_mae": raw["force_mae"], "force_rmse": float(np.sqrt(raw["force_mse"])),
            "count": int(raw["count"])}


# --------------------------------------------------------------------------------------------------
# Training


def _data_path(cfg: dict[str, Any]) -> str:
    if cfg["data"]["path"] is None:
        raise ConfigError("config.data.path: not set; give frames with energies and forces, e.g. "
                          "`python -m segnn_jax.datasets.emt_frames data/emt_frames "
                          "--n-relaxations 400`")
    return cfg["data"]["path"]


def _loaders(cfg: dict[str, Any], graphs: Mapping[str, Sequence[jraph.GraphsTuple]]
             ) -> dict[str, GraphLoader]:
    batch_size = cfg["batch"]["batch_size"]
    eval_size = cfg["batch"]["eval_batch_size"] or batch_size
    every = [g for split_graphs in graphs.values() for g in split_graphs]
    budgets = {size: batch_budget(cfg["batch"], every, size) for size in {batch_size, eval_size}}
    return {split: GraphLoader(split_graphs, batch_size if split == "train" else eval_size,
                               budget=budgets[batch_size if split == "train" else eval_size],
                               shuffle=split == "train", seed=int(cfg["train"]["seed"]),
                               buckets=cfg["batch"]["buckets"])
            for split, split_graphs in graphs.items()}


def train(config: Any, run_dir: str | Path, *,
          command: str | None = None) -> dict[str, Any]:
    """Trains a potential on energies and forces; writes the run directory and ``results.json``.

    Returns:
        The results: ``valid`` / ``test`` metrics at the best validation (module docstring),
        ``baseline`` (element energies, zero forces) per split, counts, ``level_of_theory``,
        ``command``, ``git_revision``.
    """
    cfg = validate_config(config)
    run_dir = Path(run_dir).resolve()
    start = time.perf_counter()
    frames, level = load_frames(_data_path(cfg))
    splits = split_frames(cfg, frames)
    cutoff = float(cfg["data"]["cutoff"])
    graphs = {split: [frame_graph(f, cutoff) for f in split_frames_]
              for split, split_frames_ in splits.items()}
    spec = fit_spec(cfg, splits["train"], graphs["train"])
    run_dir.mkdir(parents=True, exist_ok=True)
    training.atomic_write_text(run_dir / _SPEC_FILE, spec.dumps())
    print(f"potential ({level}) from {cfg['data']['path']}: "
          + ", ".join(f"{len(v)} {k}" for k, v in splits.items())
          + f" frames; energy scale {spec.energy_scale:.3f} eV, "
          f"{spec.avg_num_neighbors:.1f} neighbours (envelope-weighted)", flush=True)
    loaders = _loaders(cfg, graphs)
    model = pot.make_potential(spec)
    loss_fn = make_loss_fn(model, spec, cfg["loss"]["energy_weight"], cfg["loss"]["force_weight"])
    result = training.fit(model.init, loss_fn, loaders["train"], config=cfg["train"],
                          run_dir=run_dir, val_data=loaders["valid"], test_data=loaders["test"],
                          full_config=cfg,
                          data_stats={"train": loaders["train"].describe(),
                                      "potential_spec": spec.to_json()})
    best = result.best
    results = {
        "task": "potential",
        "level_of_theory": level,
        "data_path": cfg["data"]["path"],
        "head": spec.head,
        "valid": _metrics(best["val"]) if best else None,
        "test": _metrics(best["test"]) if best else None,
        "baseline": {split: baseline_metrics(spec, splits[split]) for split in ("valid", "test")},
        "baseline_description": "per-element reference energies (least squares on the "
                                "composition of the training frames) and zero forces",
        "best_epoch": best["epoch"] + 1 if best else None,
        "epochs": cfg["train"]["num_epochs"],
        **{f"n_{split}": len(splits[split]) for split in SPLITS},
        "n_train_relaxations": len({f.group for f in splits["train"]}),
        "cutoff": cutoff,
        "hidden_irreps": str(models.hidden_irreps(cfg["model"])),
        "num_layers": cfg["model"]["num_layers"],
        "loss_weights": dict(cfg["loss"]),
        "units": {"energy": "eV", "forces": "eV/A"},
        "wall_time_s": round(time.perf_counter() - start, 1),
        "command": command if command is not None else " ".join(sys.argv),
        "git_revision": training.git_revision(),
        "num_parameters": training.count_parameters(result.state.params),
    }
    training.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    if best:
        t, b = results["test"], results["baseline"]["test"]
        print(f"\npotential ({level}) test at the best validation (epoch {results['best_epoch']}): "
              f"energy MAE {t['energy_mae']:.4f} eV ({1000 * t['energy_per_atom_mae']:.1f} "
              f"meV/atom), force MAE {t['force_mae']:.4f} eV/A; baseline {b['energy_mae']:.4f} eV, "
              f"{b['force_mae']:.4f} eV/A ({t['count']} structures)", flush=True)
    return results


# --------------------------------------------------------------------------------------------------
# Restoring, evaluation, prediction


class LoadedPotential(NamedTuple):
    """A trained potential ready for inference (see :func:`load_run`)."""

    spec: pot.PotentialSpec
    model: hk.TransformedWithState
    params: Any
    model_state: Any
    config: dict[str, Any]


def example_graph(cutoff: float = 4.0) -> jraph.GraphsTuple:
    """The smallest padded batch the potential accepts (two atoms, one edge each way): parameter
    shapes do not depend on the graph, so it is the template to restore or initialise them."""
    graph = pot.structure_graph(np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), [1, 1],
                                np.eye(3) * 10.0, False, max(float(cutoff), 1.5))
    return pad_graph(graph, 3, 2, 2)


def load_run(run_dir: str | Path) -> LoadedPotential:
    """The best-by-validation parameters of a potential run directory, with its spec.

    Raises:
        FileNotFoundError: not a potential run directory.
        CheckpointError: no usable checkpoint.
    """
    run_dir = Path(run_dir)
    config_path, spec_path = run_dir / "config.json", run_dir / _SPEC_FILE
    for path in (config_path, spec_path):
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a potential run directory: {path.name} "
                                    f"is missing")
    cfg = validate_config(json.loads(config_path.read_text()))
    spec = pot.PotentialSpec.from_json(json.loads(spec_path.read_text()))
    model = pot.make_potential(spec)
    params, model_state, _ = training.restore_best_params(model.init, cfg["train"], run_dir,
                                                          example_graph(spec.cutoff))
    return LoadedPotential(spec, model, params, model_state, cfg)


def restore_params(cfg: dict[str, Any], run_dir: str | Path, example: jraph.GraphsTuple):
    """``(params, model_state, step)`` of the best checkpoint of a run (what
    :meth:`segnn_jax.artifact.TrainedModel.from_run`, i.e. ``segnn export``, restores through).

    Raises:
        FileNotFoundError: the run has no ``potential_spec.json``.
    """
    spec_path = Path(run_dir) / _SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a potential run directory: {_SPEC_FILE} is "
                                f"missing")
    spec = pot.PotentialSpec.from_json(json.loads(spec_path.read_text()))
    return training.restore_best_params(pot.make_potential(spec).init, cfg["train"], run_dir,
                                        example)


def load_potential(source: Any) -> LoadedPotential:
    """A trained potential from a run directory (:func:`load_run`), an artifact file
    (``segnn export``) or a loaded :class:`segnn_jax.artifact.TrainedModel`.

    Raises:
        ArtifactError: an artifact of another task, or without the potential's spec.
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return load_run(source)
    from segnn_jax.artifact import ArtifactError, load_trained

    trained = load_trained(source, task="potential")
    raw = trained.side_files.get(_SPEC_FILE)
    if raw is None:
        raise ArtifactError(f"{trained.info.get('artifact', 'the given model')}: no {_SPEC_FILE} "
                            f"(the potential's fitted constants)")
    spec = pot.PotentialSpec.from_json(raw)
    return LoadedPotential(spec, pot.make_potential(spec), trained.params, trained.model_state,
                           trained.config)


def evaluate(run_dir: str | Path, split: str = "test") -> dict[str, Any]:
    """Evaluates the best checkpoint of a run on a whole split (``segnn evaluate``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    loaded = load_run(run_dir)
    cfg = loaded.config
    frames, level = load_frames(_data_path(cfg))
    chosen = split_frames(cfg, frames)[split]
    graphs = [frame_graph(f, float(cfg["data"]["cutoff"])) for f in chosen]
    loader = _loaders(cfg, {split: graphs})[split]
    loss_fn = make_loss_fn(loaded.model, loaded.spec, cfg["loss"]["energy_weight"],
                           cfg["loss"]["force_weight"])
    metrics = training.evaluate(training.make_eval_step(loss_fn), loaded.params,
                                loaded.model_state, loader)
    out = {"split": split, **_metrics(metrics), "level_of_theory": level,
           "baseline": baseline_metrics(loaded.spec, chosen)}
    print(f"potential ({level}) {split}: energy MAE {out['energy_mae']:.4f} eV, force MAE "
          f"{out['force_mae']:.4f} eV/A over {out['count']} structures", flush=True)
    return out


def predict(run_dir: str | Path, input_path: str | Path,
            output_path: str | Path | None = None) -> Path:
    """Energies and forces of every frame of an ASE-readable file, written as extxyz.

    Args:
        run_dir: a trained potential run directory, an artifact of one (``segnn export``), or
            a loaded :class:`segnn_jax.artifact.TrainedModel`.
        input_path: any file ``ase.io.read`` understands (every frame a structure, cell and pbc
            as stored).
        output_path: default ``<input stem>_segnn.extxyz`` next to the input.

    Raises:
        PotentialInputError: unreadable file or an element the model never saw in training.
    """
    import ase.io

    from segnn_jax.ase_calculator import SEGNNCalculator

    input_path = Path(input_path)
    if not input_path.is_file():
        raise PotentialInputError(f"{input_path}: no such file")
    try:
        frames = ase.io.read(str(input_path), index=":")
    except Exception as e:
        raise PotentialInputError(f"{input_path}: not a structure file ASE can read ({e})") from e
    loaded = load_potential(run_dir)
    calculator = SEGNNCalculator(loaded.spec, loaded.params, loaded.model_state,
                                 model=loaded.model)
    out = []
    for k, atoms in enumerate(frames):
        try:
            atoms.calc = calculator
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        except ValueError as e:
            raise PotentialInputError(f"{input_path}:{k}: {e}") from e
        from ase.calculators.singlepoint import SinglePointCalculator

        labelled = atoms.copy()
        labelled.calc = SinglePointCalculator(labelled, energy=energy, forces=forces)
        out.append(labelled)
    output_path = Path(output_path) if output_path is not None else \
        input_path.with_name(f"{input_path.stem}_segnn.extxyz")
    ase.io.write(str(output_path), out, format="extxyz")
    return output_path
