"""The OC20 IS2RE task: periodic adsorbate+slab systems -> SEGNN -> relaxed adsorption energy (eV).

Pipeline (SEGNN.md sections 2.7 and 3, the author's OC20 fork):

* input: the INITIAL structure of each system (IS2RE); radius graph at ``data.cutoff`` under the
  periodic boundary conditions of the cell (:func:`segnn_jax.periodic.periodic_radius_graph`, ASE's
  neighbour list), with the Cartesian image offsets stored as ``edges["shifts"]`` so that
  :func:`segnn_jax.attributes.edge_vectors` gives ``x_j - x_i + shift``;
* edge attribute ``a_ij = Y(r_ij)`` up to ``lmax_attr`` (2), "component" normalisation; node
  attribute ``a_i = mean_j a_ij`` with the l = 0 component set to 1 (an isolated atom gets
  ``(1, 0, ...)``); extra message feature ``|r_ij|^2`` (``1x0e``);
* node input: a learned embedding of the atomic number to ``embedding.dim`` scalars (256 in the
  reference), ``hk.Embed`` applied before the SEGNN (``[N, dim x 0e]``). An element absent from
  training keeps its random initial embedding, so a held-out metal (``ood_cat`` on single-metal
  slabs) is unknown to the network. ``embedding.element_features=True`` (default False) adds a
  learned linear map of fixed element descriptors (:func:`element_descriptors`: period, group,
  covalent radius) and starts the lookup at zero, so that an unseen element is placed by its
  descriptors (an unseen element's lookup row then stays zero). ``embedding.lookup=False`` drops
  the per-element lookup altogether: every element, seen or not, is described by its descriptors
  alone, so the network cannot give training elements properties their descriptors do not carry;
* a graph-level SEGNN (6 layers, no norm, mean pool) with output ``1x0e`` per system.

The target ``y_relaxed`` (eV) is standardised with the TRAINING mean and standard deviation; the
loss is the L1 error of the standardised value. Optionally (``data.energy_reference=
"composition"``; default ``"none"``, the author's recipe) a per-element reference energy is
subtracted first, ``y - sum_z n_z e_z``, with ``e_z`` fitted by ridge regression of the training
energies on the element counts (the "atomref" of SchNet-style models, a function of the structure
only); the network then learns the residual and predictions add the reference back.
``"adsorbate"`` counts only the adsorbate atoms (tag 2), fitted without an intercept: the target is
already referenced to the clean slab and the gas-phase molecules, so it is the adsorbate's atoms
whose per-element energies carry over to an adsorbate never seen in training (OOD-ads), and no
metal gets a per-element term that a held-out metal would lack (OOD-cat).
``"adsorbate_surface"`` is, per adsorbate, a linear function of the surface atoms' element
descriptors (:func:`adsorbate_surface_features`): a held-out metal is placed by its period, group
and radius, which is how the ``adsorbate_surface_ridge`` baseline extrapolates to unseen metals;
an adsorbate never seen in training gets no reference.

Readout (``readout.atoms``): ``"all"`` (the author's) pools the graph-level SEGNN over every atom;
``"adsorbate"`` makes the SEGNN give one energy per atom and sums it over the adsorbate atoms
(tag 2), so that an adsorbate's energy is built from its atoms in their surface environment.

Evaluation returns sums over the whole split: ``mae`` (eV) and ``ewt``, OC20's "energy within
threshold", the fraction of systems with ``|error| < 0.02 eV``.

Splits (``data.split``): ``"id"`` a seeded random split; ``"ood_ads"`` whole adsorbates held out of
training (validation and test adsorbates are disjoint from each other and from training);
``"ood_cat"`` whole catalysts held out. The labels come from the records' ``adsorbate`` and
``metal`` fields (the EMT generator writes them: a metal, or an alloy such as ``Cu2Pt`` in a set
generated with ``--catalysts binary``, where a held-out catalyst is an unseen composition of seen
metals, as in OC20); files without them fall back to the formula of the tag-2 (adsorbate) atoms and
of the slab atoms. The held-out groups are drawn with ``split_seed``
unless ``data.test_groups`` / ``data.valid_groups`` name them (one fold of a leave-one-metal-out
study: ``experiments/oc20/leave_one_out.py``).

Next to SEGNN every run reports a composition + adsorbate baseline: ridge regression (closed form)
on the element counts of the structure and a one-hot of the adsorbate, fitted on the training split
(:class:`CompositionBaseline`), and the training-mean predictor.

The real-DFT check (``data.dataset="xu_kitchin"``) runs a seeded k-fold cross-validation of SEGNN on
the Xu & Kitchin (2014) PBE adsorption energies, predicting the energy from the RELAXED structure
(the set has no initial structures), next to a per-adsorbate-mean and the composition baseline
(:func:`cross_validate`).

Results always carry ``level_of_theory``: ``"EMT"`` for the EMT stand-in (never DFT), the value the
files store otherwise, ``"DFT (PBE)"`` for Xu & Kitchin.

Config sections: ``data`` (:data:`DATA_DEFAULTS`), ``batch`` (:data:`BATCH_DEFAULTS`), ``embedding``
(:data:`EMBEDDING_DEFAULTS`), ``baseline`` (:data:`BASELINE_DEFAULTS`), ``readout``
(:data:`READOUT_DEFAULTS`), ``model``
(:mod:`segnn_jax.tasks.models`) and ``train`` (:mod:`segnn_jax.training`).

Shape letters: M systems, N nodes (atoms), E edges, G graphs of a batch.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
import time
from collections import Counter
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
from segnn_jax.compile_options import jit
from segnn_jax.graph import edge_mask, graph_mask, make_graph, node_graph_index, node_mask
from segnn_jax.periodic import periodic_radius_graph
from segnn_jax.segnn import transform_with_jitted_init
from segnn_jax.tasks import TaskInputError, models
from segnn_jax.tasks.common import batch_budget, check_budget_options, positive_int, task_sections
from segnn_jax.training.config import ConfigError

__all__ = [
    "BASELINE_DEFAULTS",
    "BATCH_DEFAULTS",
    "DATA_DEFAULTS",
    "DESCRIPTION",
    "EMBEDDING_DEFAULTS",
    "READOUT_DEFAULTS",
    "EWT_THRESHOLD_EV",
    "MODEL_DEFAULTS",
    "SPLITS",
    "AdsorbateCompositionBaseline",
    "AdsorbateSurfaceBaseline",
    "CompositionBaseline",
    "OC20DataError",
    "OC20InputError",
    "Standardisation",
    "System",
    "XuKitchinNotFoundError",
    "adsorbate_label",
    "adsorbate_mean_baseline",
    "adsorbate_surface_features",
    "baseline_metrics",
    "baseline_predictions",
    "catalyst_label",
    "cross_validate",
    "element_descriptors",
    "energy_error_sums",
    "energy_metrics",
    "errors_by_group",
    "evaluate",
    "evaluate_ensemble",
    "featurize",
    "group_split",
    "kfold_indices",
    "load_systems",
    "load_xu_kitchin",
    "make_loaders",
    "make_loss_fn",
    "make_model",
    "predict",
    "random_split",
    "read_structures",
    "restore_params",
    "ridge_fit",
    "run_baselines",
    "run_is2re",
    "split_predictions",
    "split_systems",
    "standardise",
    "standardised_target",
    "surface_descriptors",
    "system_graph",
    "train",
    "validate_config",
]

DESCRIPTION = ("OC20 IS2RE: relaxed adsorption energy (eV) from the initial periodic structure "
               "(real OC20 files or the EMT stand-in); Xu & Kitchin DFT cross-validation")

#: |error| below this counts as "energy within threshold" (OC20's EwT), eV.
EWT_THRESHOLD_EV = 0.02
#: Atomic numbers the embedding knows (0 is never a real atom; padding nodes carry it).
MAX_Z = 118

DATA_DEFAULTS: Dict[str, Any] = {
    "dataset": "is2re",
    "path": None,
    # No cutoff is stated for the author's fork (SEGNN.md section 3 "radius graph with PBC"); 5 A
    # reaches the second neighbour shell of every fcc metal here (nearest neighbours 2.5-2.9 A)
    # and the adsorbate-surface bonds, at a third fewer edges than OCP's usual 6 A.
    "cutoff": 5.0,
    "split": "id",
    "split_seed": 0,
    "valid_fraction": 0.1,
    "test_fraction": 0.1,
    # OOD splits only: the groups (adsorbate or metal labels) of the test / validation split, in
    # place of the seeded choice, e.g. ("Pt",) for one fold of a leave-one-metal-out study.
    "test_groups": None,
    "valid_groups": None,
    "n_train": None,
    "n_valid": None,
    "n_test": None,
    "cv_folds": 5,
    "cv_seed": 0,
    # "none" (the author's recipe), "composition", "adsorbate" or "adsorbate_surface": subtract a
    # reference energy fitted on the training split (see the module docstring).
    "energy_reference": "none",
}

BATCH_DEFAULTS: Dict[str, Any] = {
    "batch_size": 8,
    "eval_batch_size": None,
    "max_nodes": None,
    "max_edges": None,
    "buckets": (0.5, 0.75, 1.0),
}

EMBEDDING_DEFAULTS: Dict[str, Any] = {"dim": 256, "element_features": False, "lookup": True}

#: ``atoms``: ``"all"`` (the author's recipe: the graph-level SEGNN pools over every atom) or
#: ``"adsorbate"``: the SEGNN gives one energy per atom and the system's energy is the sum over the
#: adsorbate atoms (tag 2), each of which sees the surface within the cutoff.
READOUT_DEFAULTS: Dict[str, Any] = {"atoms": "all"}
_READOUT_CHOICES = ("all", "adsorbate")

BASELINE_DEFAULTS: Dict[str, Any] = {"ridge_alpha": 1e-3}

#: The author's OC20 model (SEGNN.md sections 2.6, 2.7 and 3): 256 hidden features weight-balanced
#: with sh=False, i.e. ``weight_balanced_irreps(256, SH(2), lmax=1, sh=False)`` = 188x0e+61x1o
#: (given explicitly: the model section's weight balancing is the sh=True variant), lmax_attr 2,
#: 6 layers, no norm, mean pool.
MODEL_DEFAULTS: Dict[str, Any] = dict(
    models.default_model_config(), name="segnn", hidden_features=256,
    hidden_irreps="188x0e+61x1o", lmax_hidden=1, lmax_attr=2, num_layers=6, norm="none",
    pool="avg", task="graph")

SPLITS = ("train", "valid", "test")
_DATASETS = ("is2re", "xu_kitchin")
_SPLIT_CHOICES = ("id", "ood_ads", "ood_cat")
_REFERENCE_CHOICES = ("none", "composition", "adsorbate", "adsorbate_surface")
_SPLIT_LIMIT = {"train": "n_train", "valid": "n_valid", "test": "n_test"}
_STATS_FILE = "oc20_standardisation.json"
_XK_FILES = ("xu_kitchin_2014_structures.json", "xu_kitchin_2014_energies.json")


class OC20DataError(ValueError):
    """The data cannot make the requested split, target or cross-validation (message says why)."""


class OC20InputError(TaskInputError):
    """A structure file given to :func:`predict` is unreadable or holds an unknown element."""


class XuKitchinNotFoundError(FileNotFoundError):
    """The Xu & Kitchin files are not in the given folder."""


class System(NamedTuple):
    """One periodic system as the task sees it (float64, Angstrom, eV).

    Attributes:
        positions: ``[n, 3]`` the model's input structure (initial for IS2RE, relaxed for Xu &
            Kitchin).
        cell: ``[3, 3]`` cell vectors as rows.
        pbc: ``[3]`` bool.
        atomic_numbers: ``[n]`` int.
        tags: ``[n]`` int, 0 sub-surface, 1 surface, 2 adsorbate.
        energy: target adsorption energy (eV), NaN when unknown.
        adsorbate: adsorbate label (for OOD splits and the baselines).
        catalyst: catalyst (metal) label.
        name: identifier for messages and prediction files.
    """

    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    atomic_numbers: np.ndarray
    tags: np.ndarray
    energy: float
    adsorbate: str
    catalyst: str
    name: str


class Standardisation(NamedTuple):
    """``z = (y - reference - mean) / std`` of the target over the training systems (eV, float64).

    ``reference = sum_z n_z element_energies[z]`` over the atoms of the system (only its adsorbate
    atoms, tag 2, when ``reference_atoms == "adsorbate"``), with ``element_energies`` aligned with
    ``elements``; empty (no reference) by default. Elements not in ``elements`` contribute 0.
    With ``reference_atoms == "adsorbate_surface"`` the reference is instead
    ``adsorbate_weights[adsorbate] . [1, surface descriptors]`` (:func:`adsorbate_surface_features`;
    0 for an adsorbate without weights).
    """

    mean: float
    std: float
    elements: Tuple[int, ...]
    level_of_theory: str
    element_energies: tuple[float, ...] = ()
    reference_atoms: str = "all"
    adsorbate_weights: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def reference(self, system: System) -> float:
        """The reference energy (eV) of ``system``; 0 without a reference."""
        if self.adsorbate_weights:
            weights = dict(self.adsorbate_weights).get(system.adsorbate)
            return 0.0 if weights is None else float(
                np.dot(weights, np.concatenate([[1.0], surface_descriptors(system)])))
        if not self.element_energies:
            return 0.0
        energy = dict(zip(self.elements, self.element_energies))
        return float(sum(energy.get(int(z), 0.0)
                         for z in _reference_numbers(system, self.reference_atoms)))

    def to_json(self) -> Dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "elements": list(self.elements),
                "level_of_theory": self.level_of_theory,
                "element_energies": list(self.element_energies),
                "reference_atoms": self.reference_atoms,
                "adsorbate_weights": {a: list(w) for a, w in self.adsorbate_weights}}


def check_adsorbate_atoms(cfg: Mapping[str, Any], systems: Sequence[System],
                          error: Optional[type] = None) -> None:
    """Raises ``error`` (default :class:`OC20DataError`) naming the first system without an
    adsorbate atom (tag 2) when the config counts them (``data.energy_reference="adsorbate"`` or
    ``readout.atoms="adsorbate"``): its energy would silently be the constant 0."""
    if cfg["data"]["energy_reference"] != "adsorbate" and cfg["readout"]["atoms"] != "adsorbate":
        return
    for system in systems:
        if not np.any(np.asarray(system.tags) == 2):
            raise (error or OC20DataError)(
                f"{system.name}: no adsorbate atom (tag 2), which data.energy_reference="
                f"'adsorbate' / readout.atoms='adsorbate' need; tag the adsorbate or use the "
                f"default 'none' / 'all'")


def _reference_numbers(system: System, atoms: str) -> np.ndarray:
    """The atomic numbers a per-element reference counts: all atoms, or the adsorbate's (tag 2)."""
    numbers = np.asarray(system.atomic_numbers)
    return numbers[np.asarray(system.tags) == 2] if atoms == "adsorbate" else numbers


# --------------------------------------------------------------------------------------------------
# Config


def _fraction(section: Mapping[str, Any], key: str, name: str) -> None:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{name}.{key}: expected a number in (0, 1), got {value!r}")


def _group_names(data: Mapping[str, Any], key: str) -> Optional[Tuple[str, ...]]:
    """``data[key]`` as a tuple of group labels (a single label is accepted), or None."""
    value = data[key]
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else value
    if (not isinstance(names, (list, tuple)) or not names
            or not all(isinstance(n, str) and n for n in names) or len(set(names)) < len(names)):
        raise ConfigError(f"config.data.{key}: expected group labels (e.g. ('Pt',)), got {value!r}")
    if data["split"] == "id":
        raise ConfigError(f"config.data.{key}: names held-out groups, which only the 'ood_ads' "
                          f"and 'ood_cat' splits have; data.split is 'id'")
    return tuple(names)


def validate_config(config: Any) -> Dict[str, Any]:
    """Checks a whole OC20 config and returns it as a plain nested dict with defaults filled in.

    Runs on the host before any data is read or anything is compiled.

    Raises:
        ConfigError: an unknown option or an invalid value; the message starts with its dotted
            name (e.g. ``config.data.split``).
    """
    config, sections = task_sections(config, "oc20", {
        "data": DATA_DEFAULTS,
        "batch": BATCH_DEFAULTS,
        "embedding": EMBEDDING_DEFAULTS,
        "baseline": BASELINE_DEFAULTS,
        "readout": READOUT_DEFAULTS,
    })
    data, batch, embedding, baseline, readout = (
        sections["data"], sections["batch"],
        sections["embedding"], sections["baseline"], sections["readout"])
    if readout["atoms"] not in _READOUT_CHOICES:
        raise ConfigError(f"config.readout.atoms: expected one of {_READOUT_CHOICES}, "
                          f"got {readout['atoms']!r}")
    if data["dataset"] not in _DATASETS:
        raise ConfigError(f"config.data.dataset: expected one of {_DATASETS}, "
                          f"got {data['dataset']!r}")
    if data["path"] is not None and not isinstance(data["path"], str):
        raise ConfigError(f"config.data.path: expected a path, got {data['path']!r}")
    cutoff = data["cutoff"]
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not cutoff > 0:
        raise ConfigError(f"config.data.cutoff: expected a positive number (Angstrom), "
                          f"got {cutoff!r}")
    if data["split"] not in _SPLIT_CHOICES:
        raise ConfigError(f"config.data.split: expected one of {_SPLIT_CHOICES}, "
                          f"got {data['split']!r}")
    if data["energy_reference"] not in _REFERENCE_CHOICES:
        raise ConfigError(f"config.data.energy_reference: expected one of {_REFERENCE_CHOICES}, "
                          f"got {data['energy_reference']!r}")
    for key in ("split_seed", "cv_seed"):
        positive_int(data, key, "config.data", optional=False, minimum=0)
    positive_int(data, "cv_folds", "config.data", optional=False, minimum=2)
    for key in ("valid_fraction", "test_fraction"):
        _fraction(data, key, "config.data")
    if data["valid_fraction"] + data["test_fraction"] >= 1:
        raise ConfigError("config.data.test_fraction: valid_fraction + test_fraction must be < 1, "
                          f"got {data['valid_fraction']} + {data['test_fraction']}")
    for key in ("test_groups", "valid_groups"):
        data[key] = _group_names(data, key)
    for key in ("n_train", "n_valid", "n_test"):
        positive_int(data, key, "config.data", optional=True)
    positive_int(batch, "batch_size", "config.batch", optional=False)
    positive_int(batch, "eval_batch_size", "config.batch", optional=True)
    check_budget_options(batch)
    positive_int(embedding, "dim", "config.embedding", optional=False)
    for key in ("element_features", "lookup"):
        if not isinstance(embedding[key], bool):
            raise ConfigError(f"config.embedding.{key}: expected true or false, got "
                              f"{embedding[key]!r}")
    if not embedding["lookup"] and not embedding["element_features"]:
        raise ConfigError("config.embedding.lookup: false needs config.embedding.element_features "
                          "= true (an element must be described somehow)")
    alpha = baseline["ridge_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ConfigError(f"config.baseline.ridge_alpha: expected a number >= 0, got {alpha!r}")
    model = models.validate_model_config(dict(MODEL_DEFAULTS, **(config.get("model") or {})))
    if model["task"] != "graph":
        raise ConfigError(f"config.model.task: OC20 predicts one energy per system, expected "
                          f"'graph', got {model['task']!r}")
    return {"task": "oc20", "data": data, "batch": batch, "embedding": embedding,
            "baseline": baseline, "readout": readout, "model": model,
            "train": training.validate_train_config(config.get("train"))}


# --------------------------------------------------------------------------------------------------
# Featurizer, model, loss


def featurize(graph: jraph.GraphsTuple, embedded: jnp.ndarray, *,
              lmax_attr: int) -> SteerableGraphsTuple:
    """The steerable inputs of a (padded) batch of periodic systems (pure, jit-able, padding-safe).

    Args:
        graph: nodes "positions" ``[N, 3]`` (Angstrom), edges "shifts" ``[E, 3]`` (Cartesian image
            offsets of the senders).
        embedded: ``[N, D]`` node scalars (the embedding of the atomic numbers).
        lmax_attr: highest order of the spherical-harmonic attributes.

    Returns:
        Node features ``[N, D x 0e]``, node and edge attributes ``[N or E, sh(lmax_attr)]``
        ("component" normalisation), extra message features ``[E, 1x0e]`` = ``|r_ij|^2``.
    """
    positions = graph.nodes["positions"]
    vectors = edge_vectors(graph)  # [E, 3] x_j - x_i + shift
    edge_attr = edge_attributes(vectors, lmax_attr, normalization="component")
    node_attr = node_attributes(edge_attr, graph.receivers, positions.shape[0],
                                edge_mask=edge_mask(graph))
    features = e3nn.IrrepsArray(f"{embedded.shape[-1]}x0e", embedded.astype(positions.dtype))
    extra = e3nn.IrrepsArray("1x0e", jnp.sum(vectors**2, axis=-1, keepdims=True))
    return SteerableGraphsTuple(graph, features, node_attr, edge_attr, extra)


def _period_and_group(z: int) -> tuple[int, int]:
    """Period and IUPAC group (1-18; lanthanides and actinides count as group 3) of element z."""
    period_ends = (2, 10, 18, 36, 54, 86, 118)
    period = next(k + 1 for k, end in enumerate(period_ends) if z <= end)
    position = z - (0, 2, 10, 18, 36, 54, 86)[period - 1]  # 1-based position in the period
    if period == 1:
        return period, 1 if position == 1 else 18
    if period <= 3:
        return period, position if position <= 2 else position + 10
    if period <= 5:
        return period, position
    # Periods 6 and 7: s block, 15 f-block elements (group 3), then groups 4-18.
    return period, position if position <= 2 else (3 if position <= 17 else position - 14)


def element_descriptors() -> np.ndarray:
    """``[MAX_Z + 1, 3]`` float32 fixed element descriptors: period, group and covalent radius
    (ASE's table, Angstrom), each standardised over elements 1-86; row 0 (padding) is zero."""
    from ase.data import covalent_radii

    table = np.zeros((MAX_Z + 1, 3), np.float64)
    for z in range(1, MAX_Z + 1):
        table[z] = (*_period_and_group(z), covalent_radii[z])
    reference = table[1:87]
    table[1:] = (table[1:] - reference.mean(axis=0)) / reference.std(axis=0)
    return table.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _descriptor_table() -> np.ndarray:
    return element_descriptors().astype(np.float64)


def surface_descriptors(system: System) -> np.ndarray:
    """``[3]`` the mean :func:`element_descriptors` of the system's surface atoms (tag 1), or of
    all its slab atoms (tag != 2) when none is tagged 1: what the adsorbate binds to. A system
    without slab atoms gets zeros, the mean element's descriptors."""
    tags = np.asarray(system.tags)
    numbers = np.asarray(system.atomic_numbers)
    surface = numbers[tags == 1] if np.any(tags == 1) else numbers[tags != 2]
    table = _descriptor_table()
    return table[surface].mean(axis=0) if surface.size else np.zeros(table.shape[1])


def adsorbate_surface_features(systems: Sequence[System], adsorbates: Sequence[str]) -> np.ndarray:
    """``[M, A * 4]``: in the block of the system's adsorbate, ``[1, surface descriptors]``
    (:func:`surface_descriptors`); all zero for an adsorbate not in ``adsorbates``.

    A ridge fit on these is one linear model of the surface's period, group and radius per
    adsorbate: the simplest model that can place a metal never seen in training.
    """
    index = {a: k for k, a in enumerate(adsorbates)}
    width = 1 + _descriptor_table().shape[1]
    out = np.zeros((len(systems), len(adsorbates) * width))
    for m, system in enumerate(systems):
        k = index.get(system.adsorbate)
        if k is not None:
            out[m, k * width:(k + 1) * width] = np.concatenate(
                [[1.0], surface_descriptors(system)])
    return out


def make_model(config: Any) -> hk.TransformedWithState:
    """``forward(graph, is_training=False) -> [G]`` standardised energies, transformed by Haiku.

    Its ``init`` is compiled (:func:`segnn_jax.transform_with_jitted_init`).

    The graph's nodes carry "atomic_numbers" ``[N]`` int32, embedded by ``hk.Embed`` (name
    ``z_embedding``) into ``config.embedding.dim`` scalars; with ``embedding.element_features``
    the lookup starts at zero and a linear map of :func:`element_descriptors` (name
    ``element_features``) is added; with ``embedding.lookup=False`` the linear map of the
    descriptors is the whole embedding.
    """
    cfg = validate_config(config)
    per_atom = cfg["readout"]["atoms"] == "adsorbate"
    model_cfg = dict(cfg["model"], task="node") if per_atom else cfg["model"]
    factory = models.create_model(model_cfg, output_irreps="1x0e")
    lmax_attr = cfg["model"]["lmax_attr"]
    dim = cfg["embedding"]["dim"]
    descriptors = element_descriptors() if cfg["embedding"]["element_features"] else None
    lookup = cfg["embedding"]["lookup"]

    def forward(graph: jraph.GraphsTuple, is_training: bool = False) -> jnp.ndarray:
        graph = jax.tree.map(jnp.asarray, graph)  # host batches too (e.g. Haiku's init)
        z = graph.nodes["atomic_numbers"]
        if descriptors is None:
            embedded = hk.Embed(MAX_Z + 1, dim, name="z_embedding")(z)
        else:
            embedded = hk.Linear(dim, name="element_features")(jnp.asarray(descriptors)[z])
            if lookup:
                # A zero start: an element never seen in training is described by its
                # descriptors alone instead of by a random vector.
                embedded += hk.Embed(MAX_Z + 1, dim, w_init=hk.initializers.Constant(0.0),
                                     name="z_embedding")(z)
        st_graph = featurize(graph, embedded, lmax_attr=lmax_attr)
        out = factory()(st_graph, is_training).array[:, 0]  # [G], or [N] per atom
        if not per_atom:
            return out
        adsorbate = (graph.nodes["tags"] == 2) & node_mask(graph)
        return jax.ops.segment_sum(jnp.where(adsorbate, out, 0.0), node_graph_index(graph),
                                   num_segments=graph.n_node.shape[0])

    return transform_with_jitted_init(forward)


def energy_error_sums(error_ev: jnp.ndarray, mask: jnp.ndarray,
                      threshold: float = EWT_THRESHOLD_EV) -> Dict[str, jnp.ndarray]:
    """Sums over the real systems of a batch: ``mae_sum``, ``ewt_sum`` (hits), ``count``.

    Args:
        error_ev: ``[G]`` prediction errors (eV); padding entries may hold anything.
        mask: ``[G]`` True for real systems.
        threshold: EwT threshold (eV).
    """
    absolute = jnp.where(mask, jnp.abs(error_ev), 0.0)
    hits = jnp.where(mask, absolute < threshold, False)
    return {"mae_sum": jnp.sum(absolute), "ewt_sum": jnp.sum(hits).astype(absolute.dtype),
            "count": jnp.sum(mask).astype(absolute.dtype)}


def energy_metrics(predicted: np.ndarray, target: np.ndarray,
                   threshold: float = EWT_THRESHOLD_EV) -> Dict[str, float]:
    """``{"mae_ev", "ewt", "count"}`` of host-side predictions (baselines), float64."""
    error = np.abs(np.asarray(predicted, np.float64) - np.asarray(target, np.float64))
    return {"mae_ev": float(np.mean(error)), "ewt": float(np.mean(error < threshold)),
            "count": len(error)}


def make_loss_fn(model: hk.TransformedWithState, std: float):
    """The engine's objective: L1 on standardised energies, summed over the real systems.

    Sums: ``loss_sum`` (|z_pred - z|), ``mae_sum`` (eV), ``ewt_sum`` (systems within
    :data:`EWT_THRESHOLD_EV`), ``count``; the engine divides them once per whole split.
    """
    std = float(std)

    def loss_fn(params, model_state, graph, rng, is_training):
        predicted, model_state = model.apply(params, model_state, rng, graph, is_training)  # [G]
        mask = graph_mask(graph)
        error = predicted - graph.globals["targets"][:, 0]
        loss_sum = jnp.sum(jnp.where(mask, jnp.abs(error), 0.0))
        return loss_sum, (energy_error_sums(std * error, mask), model_state)

    return loss_fn


# --------------------------------------------------------------------------------------------------
# Data: systems, graphs, splits


def _formula(numbers: np.ndarray) -> str:
    from ase import Atoms

    return Atoms(numbers=np.asarray(numbers)).get_chemical_formula() if len(numbers) else ""


def adsorbate_label(record: Any) -> str:
    """The adsorbate of an OC20 record: its ``adsorbate`` field, else the tag-2 atoms' formula."""
    label = record.extras.get("adsorbate") if record.extras else None
    if label is not None:
        return str(label)
    return _formula(record.atomic_numbers[record.tags == 2]) or "none"


def catalyst_label(record: Any) -> str:
    """The catalyst of an OC20 record: its ``metal`` field, else the slab atoms' formula."""
    label = record.extras.get("metal") if record.extras else None
    if label is not None:
        return str(label)
    return _formula(record.atomic_numbers[record.tags != 2]) or "none"


def _level_of_theory(records: Sequence[Any]) -> str:
    levels = {str(r.extras.get("level_of_theory", "unspecified")) for r in records}
    return levels.pop() if len(levels) == 1 else "mixed: " + ", ".join(sorted(levels))


def load_systems(path: Union[str, Path]) -> Tuple[List[System], str]:
    """IS2RE systems (initial structure, ``y_relaxed``) from anything ``read_oc20`` accepts.

    Returns:
        ``(systems, level_of_theory)``; the level is the records' ``level_of_theory`` field
        (``"EMT"`` for the stand-in), ``"unspecified"`` when the files do not say.

    Raises:
        OC20DataError: no records, or a record without ``y_relaxed``.
        OC20FormatError, FileNotFoundError: from the readers.
    """
    from segnn_jax.datasets.oc20 import read_oc20

    records = read_oc20(path)
    if not records:
        raise OC20DataError(f"{path}: no structures")
    systems = []
    for record in records:
        if record.y_relaxed is None:
            raise OC20DataError(f"{record.source}: no y_relaxed (the IS2RE target); IS2RE "
                                f"training needs relaxed energies")
        systems.append(System(record.positions, record.cell, record.pbc, record.atomic_numbers,
                              record.tags, float(record.y_relaxed), adsorbate_label(record),
                              catalyst_label(record), record.source))
    return systems, _level_of_theory(records)


def load_xu_kitchin(path: Union[str, Path]) -> List[System]:
    """The Xu & Kitchin (2014) PBE adsorption energies with their RELAXED structures.

    Entries flagged ``'Q'`` are skipped, and so are clean slabs (coverage ``"0.0"``, no energy);
    every other (metal, adsorbate, site, coverage) with a numeric energy and a structure is a
    sample. Adsorbate atoms (the non-metal symbol) get tag 2, the slab atoms tag 1.

    Args:
        path: the folder holding ``xu_kitchin_2014_structures.json`` and
            ``xu_kitchin_2014_energies.json``.

    Raises:
        XuKitchinNotFoundError: the files are missing.
        OC20DataError: an energy without a structure, or malformed entries.
    """
    from ase.data import atomic_numbers as z_of

    folder = Path(path)
    missing = [name for name in _XK_FILES if not (folder / name).is_file()]
    if missing:
        raise XuKitchinNotFoundError(f"{folder}: missing {', '.join(missing)} (the Xu & Kitchin "
                                     f"set, shared/data/adsorption_dft)")
    structures = json.loads((folder / _XK_FILES[0]).read_text())
    energies = json.loads((folder / _XK_FILES[1]).read_text())
    systems = []
    for metal in sorted(energies):
        for adsorbate in sorted(energies[metal]):
            for site in sorted(energies[metal][adsorbate]):
                for coverage, energy in sorted(energies[metal][adsorbate][site].items()):
                    if coverage == "0.0" or energy == "Q":
                        continue
                    name = f"{metal}/{adsorbate}/{site}/{coverage}"
                    try:
                        entry = structures[metal][adsorbate][site][coverage]
                        symbols = entry["symbols"]
                        positions = np.asarray(entry["pos"], np.float64)
                        cell = np.asarray(entry["cell"], np.float64)
                        energy = float(energy)
                    except (KeyError, TypeError, ValueError) as e:
                        raise OC20DataError(f"Xu & Kitchin {name}: no usable structure or energy "
                                            f"({e!r})") from e
                    numbers = np.asarray([z_of[s] for s in symbols], np.int64)
                    tags = np.where(np.asarray(symbols) == metal, 1, 2)
                    systems.append(System(positions, cell, np.ones(3, bool), numbers, tags,
                                          energy, adsorbate, metal, name))
    if not systems:
        raise OC20DataError(f"{folder}: no samples")
    return systems


def system_graph(system: System, cutoff: float, target: float = 0.0) -> jraph.GraphsTuple:
    """The periodic radius graph of one system.

    Returns:
        A single graph: nodes "positions" ``[n, 3]`` float32, "atomic_numbers" and "tags"
        ``[n]`` int32;
        edges "shifts" ``[E, 3]`` float32 (Cartesian image offset of the sender); globals
        "targets" ``[1, 1]`` float32 (``target``).
    """
    edges = periodic_radius_graph(system.positions, system.cell, system.pbc, cutoff)
    return make_graph(np.asarray(system.positions, np.float32), edges.senders, edges.receivers,
                      nodes={"atomic_numbers": np.asarray(system.atomic_numbers, np.int32),
                             "tags": np.asarray(system.tags, np.int32)},
                      edges={"shifts": edges.shifts_cartesian.astype(np.float32)},
                      globals={"targets": np.full((1, 1), target, np.float32)})


def random_split(n: int, valid_fraction: float, test_fraction: float,
                 seed: int) -> Dict[str, np.ndarray]:
    """In-distribution split: a seeded permutation cut into train / valid / test.

    Raises:
        OC20DataError: too few systems for three non-empty parts.
    """
    n_valid = max(1, round(n * valid_fraction))
    n_test = max(1, round(n * test_fraction))
    if n_valid + n_test >= n:
        raise OC20DataError(f"{n} systems are too few for a validation ({n_valid}), test "
                            f"({n_test}) and non-empty training split")
    perm = np.random.RandomState(seed).permutation(n)
    return {"test": perm[:n_test], "valid": perm[n_test:n_test + n_valid],
            "train": perm[n_test + n_valid:]}


def group_split(groups: Sequence[str], valid_fraction: float, test_fraction: float,
                seed: int, *, test_groups: Optional[Sequence[str]] = None,
                valid_groups: Optional[Sequence[str]] = None
                ) -> Tuple[Dict[str, np.ndarray], Dict[str, List[str]]]:
    """Out-of-distribution split: whole groups (adsorbates or catalysts) held out.

    Groups are taken in a seeded random order: the test split gets groups until it holds at least
    ``test_fraction`` of the systems (at least one group), the validation split the next ones until
    ``valid_fraction``, training the rest, so no group is in two splits. ``test_groups`` /
    ``valid_groups`` name a split's groups instead (e.g. one fold of a leave-one-metal-out study);
    a split without them is filled from the seeded order of the groups left.

    Returns:
        ``(indices, groups)``: ``indices[split]`` the systems (in a seeded random order),
        ``groups[split]`` the sorted group labels of each split.

    Raises:
        OC20DataError: fewer than three groups, a named group the data do not hold, a group named
            for both splits, or no group left for training.
    """
    labels = np.asarray([str(g) for g in groups], dtype=object)
    unique = sorted(set(labels))
    if len(unique) < 3:
        raise OC20DataError(f"a held-out-group split needs at least 3 distinct groups, the data "
                            f"has {len(unique)}: {unique}")
    named = {"test": list(test_groups or ()), "valid": list(valid_groups or ())}
    for split, names in named.items():
        unknown = sorted(set(names) - set(unique))
        if unknown:
            raise OC20DataError(f"data.{split}_groups: {unknown} not in the data; its groups are "
                                f"{unique}")
    both = sorted(set(named["test"]) & set(named["valid"]))
    if both:
        raise OC20DataError(f"data.test_groups and data.valid_groups both name {both}")
    rng = np.random.RandomState(seed)
    order = [unique[k] for k in rng.permutation(len(unique))]
    counts = Counter(labels.tolist())
    assigned: Dict[str, List[str]] = {"test": [], "valid": [], "train": []}
    free = [g for g in order if g not in named["test"] and g not in named["valid"]]
    for split, fraction in (("test", test_fraction), ("valid", valid_fraction)):
        if named[split]:
            assigned[split] = named[split]
            continue
        while free and (not assigned[split] or
                        sum(counts[g] for g in assigned[split]) < fraction * len(labels)):
            assigned[split].append(free.pop(0))
    assigned["train"] = free
    if not assigned["train"] or not assigned["valid"]:
        raise OC20DataError(f"no group left for {'training' if assigned['valid'] else 'validation'}"
                            f" after holding out {assigned['test']} / {assigned['valid']}; lower "
                            f"data.test_fraction / valid_fraction")
    perm = rng.permutation(len(labels))
    indices = {split: perm[np.isin(labels[perm], names)] for split, names in assigned.items()}
    return indices, {split: sorted(names) for split, names in assigned.items()}


def kfold_indices(n: int, k: int, seed: int) -> List[np.ndarray]:
    """``k`` disjoint test folds covering ``range(n)`` (seeded permutation, sizes differ by <= 1)."""
    if not 2 <= k <= n:
        raise OC20DataError(f"{k}-fold cross-validation needs 2 <= k <= {n} samples")
    return np.array_split(np.random.RandomState(seed).permutation(n), k)


def split_systems(cfg: Dict[str, Any], systems: Sequence[System]
                  ) -> Tuple[Dict[str, List[System]], Dict[str, Any]]:
    """The configured split (``data.split``, caps ``n_train`` / ``n_valid`` / ``n_test``).

    Returns:
        ``(splits, info)`` with ``info["held_out"]`` the groups of each split for OOD splits.
    """
    data = cfg["data"]
    info: Dict[str, Any] = {"split": data["split"], "split_seed": data["split_seed"]}
    if data["split"] == "id":
        indices = random_split(len(systems), data["valid_fraction"], data["test_fraction"],
                               data["split_seed"])
    else:
        labels = [s.adsorbate if data["split"] == "ood_ads" else s.catalyst for s in systems]
        indices, groups = group_split(labels, data["valid_fraction"], data["test_fraction"],
                                      data["split_seed"], test_groups=data["test_groups"],
                                      valid_groups=data["valid_groups"])
        info["groups"] = groups
    out = {}
    for split in SPLITS:
        limit = data[_SPLIT_LIMIT[split]]
        chosen = indices[split][:limit] if limit is not None else indices[split]
        out[split] = [systems[i] for i in chosen]
    return out, info


# --------------------------------------------------------------------------------------------------
# Baselines


def ridge_fit(features: np.ndarray, targets: np.ndarray, alpha: float, *,
              intercept: bool = True) -> Tuple[np.ndarray, float]:
    """Closed-form ridge regression with an unpenalised intercept (float64).

    Minimises ``|X w + b - y|^2 + alpha |w|^2`` through the least-squares problem of the centred
    data stacked on ``sqrt(alpha) I`` (exact also for ``alpha = 0`` and rank-deficient ``X``,
    where it returns the minimum-norm ``w``).

    Args:
        features: ``[M, F]``.
        targets: ``[M]``.
        alpha: ``>= 0``.
        intercept: fit ``b``; ``False`` keeps ``b = 0`` (a model that must give 0 for ``x = 0``).

    Returns:
        ``(w [F], b)``.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    x_mean, y_mean = (x.mean(axis=0), y.mean()) if intercept else (np.zeros(x.shape[1]), 0.0)
    xc = x - x_mean
    if alpha > 0:
        xc = np.concatenate([xc, np.sqrt(alpha) * np.eye(x.shape[1])])
        yc = np.concatenate([y - y_mean, np.zeros(x.shape[1])])
    else:
        yc = y - y_mean
    w = np.linalg.lstsq(xc, yc, rcond=None)[0]
    return w, float(y_mean - x_mean @ w)


class CompositionBaseline:
    """Ridge regression on element counts of the whole structure plus a one-hot of the adsorbate.

    The elements and adsorbates are those of the training systems; an adsorbate never seen in
    training (the OOD-ads case) gets an all-zero one-hot, an unseen element is ignored.
    """

    def __init__(self, alpha: float):
        self.alpha = float(alpha)
        self.elements: List[int] = []
        self.adsorbates: List[str] = []
        self.weights = np.zeros(0)
        self.bias = 0.0

    def features(self, systems: Sequence[System]) -> np.ndarray:
        """``[M, n_elements + n_adsorbates]`` float64."""
        element_index = {z: k for k, z in enumerate(self.elements)}
        ads_index = {a: k for k, a in enumerate(self.adsorbates)}
        out = np.zeros((len(systems), len(self.elements) + len(self.adsorbates)))
        for m, system in enumerate(systems):
            for z, count in Counter(int(v) for v in system.atomic_numbers).items():
                if z in element_index:
                    out[m, element_index[z]] = count
            if system.adsorbate in ads_index:
                out[m, len(self.elements) + ads_index[system.adsorbate]] = 1.0
        return out

    def fit(self, systems: Sequence[System]) -> "CompositionBaseline":
        self.elements = sorted({int(z) for s in systems for z in s.atomic_numbers})
        self.adsorbates = sorted({s.adsorbate for s in systems})
        self.weights, self.bias = ridge_fit(self.features(systems),
                                            np.asarray([s.energy for s in systems]), self.alpha)
        return self

    def predict(self, systems: Sequence[System]) -> np.ndarray:
        return self.features(systems) @ self.weights + self.bias


class AdsorbateCompositionBaseline(CompositionBaseline):
    """Ridge regression on the element counts of the adsorbate atoms (tag 2) alone, no intercept.

    No adsorbate identity, no metal and no constant: the additive per-element model (zero atoms
    adsorb with zero energy) that carries over to an unseen adsorbate made of known elements
    (e.g. H and O from CH2, H2O, CO in training).
    """

    def features(self, systems: Sequence[System]) -> np.ndarray:
        """``[M, n_elements]`` float64."""
        element_index = {z: k for k, z in enumerate(self.elements)}
        out = np.zeros((len(systems), len(self.elements)))
        for m, system in enumerate(systems):
            for z in _reference_numbers(system, "adsorbate"):
                if int(z) in element_index:
                    out[m, element_index[int(z)]] += 1
        return out

    def fit(self, systems: Sequence[System]) -> "AdsorbateCompositionBaseline":
        self.elements = sorted({int(z) for s in systems
                                for z in _reference_numbers(s, "adsorbate")})
        self.weights, self.bias = ridge_fit(self.features(systems),
                                            np.asarray([s.energy for s in systems]), self.alpha,
                                            intercept=False)
        return self


class AdsorbateSurfaceBaseline(CompositionBaseline):
    """Ridge regression on :func:`adsorbate_surface_features`: per adsorbate, a linear function of
    the surface atoms' element descriptors (with an unpenalised intercept, the prediction for an
    adsorbate not seen in training). Fitted as :class:`CompositionBaseline`, whose element counts
    it does not use."""

    def features(self, systems: Sequence[System]) -> np.ndarray:
        """``[M, n_adsorbates * 4]`` float64."""
        return adsorbate_surface_features(systems, self.adsorbates)


def adsorbate_mean_baseline(train: Sequence[System], test: Sequence[System]) -> np.ndarray:
    """Predicts each test system's energy as the training mean of its adsorbate (global mean for
    an adsorbate not in training). Returns ``[len(test)]``."""
    energies = np.asarray([s.energy for s in train])
    by_adsorbate: Dict[str, List[float]] = {}
    for system in train:
        by_adsorbate.setdefault(system.adsorbate, []).append(system.energy)
    means = {a: float(np.mean(v)) for a, v in by_adsorbate.items()}
    return np.asarray([means.get(s.adsorbate, float(energies.mean())) for s in test])


def baseline_predictions(cfg: Mapping[str, Any], train: Sequence[System],
                         evaluated: Mapping[str, Sequence[System]]
                         ) -> Dict[str, Dict[str, np.ndarray]]:
    """Every baseline, fitted on ``train``, predicting the systems of each evaluated split.

    Returns:
        ``{baseline: {split: [S] energies (eV)}}`` for "composition_ridge",
        "adsorbate_composition_ridge", "adsorbate_surface_ridge", "adsorbate_mean" and
        "train_mean".
    """
    composition = CompositionBaseline(cfg["baseline"]["ridge_alpha"]).fit(train)
    adsorbate_composition = AdsorbateCompositionBaseline(cfg["baseline"]["ridge_alpha"]).fit(train)
    adsorbate_surface = AdsorbateSurfaceBaseline(cfg["baseline"]["ridge_alpha"]).fit(train)
    mean = float(np.mean([s.energy for s in train]))
    predictors = {
        "composition_ridge": composition.predict,
        "adsorbate_composition_ridge": adsorbate_composition.predict,
        "adsorbate_surface_ridge": adsorbate_surface.predict,
        "adsorbate_mean": functools.partial(adsorbate_mean_baseline, train),
        "train_mean": lambda systems: np.full(len(systems), mean),
    }
    return {name: {split: predict(systems) for split, systems in evaluated.items()}
            for name, predict in predictors.items()}


def baseline_metrics(cfg: Mapping[str, Any], train: Sequence[System],
                     evaluated: Mapping[str, Sequence[System]]) -> Dict[str, Dict[str, Any]]:
    """``{baseline: {split: {"mae_ev", "ewt", "count"}}}`` of :func:`baseline_predictions`."""
    targets = {split: np.asarray([s.energy for s in systems])
               for split, systems in evaluated.items()}
    return {name: {split: energy_metrics(predicted, targets[split])
                   for split, predicted in by_split.items()}
            for name, by_split in baseline_predictions(cfg, train, evaluated).items()}


def errors_by_group(predicted: np.ndarray, target: np.ndarray, groups: Sequence[str]
                    ) -> Dict[str, Dict[str, float]]:
    """Splits a model's error on each group (an adsorbate, a catalyst) into offset and scatter.

    On a held-out adsorbate the error of every model has two parts: one energy offset shared by all
    its systems (the adsorbate's unknown reference, which nothing in training pins down) and the
    scatter around it (sites, catalysts, geometry), which is what a structure model can learn.

    Returns:
        ``{group: {"count", "bias_ev" (mean signed error), "mae_ev", "mae_after_bias_ev" (MAE once
        the group's own mean error is subtracted)}}``, groups in sorted order.
    """
    error = np.asarray(predicted, np.float64) - np.asarray(target, np.float64)
    groups = np.asarray(groups)
    if error.shape != groups.shape or error.ndim != 1:
        raise ValueError(f"need one group per prediction, got {error.shape} predictions and "
                         f"{groups.shape} groups")
    out = {}
    for group in sorted(set(groups.tolist())):
        e = error[groups == group]
        out[group] = {"count": int(e.size), "bias_ev": float(e.mean()),
                      "mae_ev": float(np.abs(e).mean()),
                      "mae_after_bias_ev": float(np.abs(e - e.mean()).mean())}
    return out


# --------------------------------------------------------------------------------------------------
# Loaders, training


def standardise(train: Sequence[System], level_of_theory: str, reference: str = "none",
                ridge_alpha: float = 1e-3) -> Standardisation:
    """Mean and standard deviation of the TRAINING energies, and the elements seen in training.

    Args:
        train: the training systems.
        level_of_theory: recorded with the statistics.
        reference: ``"none"``, or ``"composition"``: first subtract per-element energies fitted
            by ridge regression (``ridge_alpha``) of the training energies on the element counts;
            mean and std are then those of the residuals; ``"adsorbate"``: the same on the counts
            of the adsorbate atoms (tag 2) only; ``"adsorbate_surface"``: per adsorbate, a linear
            function of the surface descriptors (:func:`adsorbate_surface_features`).
        ridge_alpha: the ridge penalty of the reference fit.
    """
    if reference not in _REFERENCE_CHOICES:
        raise ValueError(f"reference must be one of {_REFERENCE_CHOICES}, got {reference!r}")
    energies = np.asarray([s.energy for s in train], np.float64)
    elements = tuple(sorted({int(z) for s in train for z in s.atomic_numbers}))
    if reference == "adsorbate_surface":
        model = AdsorbateSurfaceBaseline(ridge_alpha).fit(train)
        # The intercept is left to the mean below, as for "composition".
        residual = energies - model.features(train) @ model.weights
        block = model.weights.reshape(len(model.adsorbates), -1)
        return _residual_statistics(
            residual, len(train), elements, level_of_theory, reference_atoms=reference,
            adsorbate_weights=tuple((a, tuple(float(v) for v in w))
                                    for a, w in zip(model.adsorbates, block)))
    element_energies: tuple[float, ...] = ()
    atoms = "adsorbate" if reference == "adsorbate" else "all"
    if reference != "none":
        column = {z: k for k, z in enumerate(elements)}
        counts = np.zeros((len(train), len(elements)))
        for m, system in enumerate(train):
            for z in _reference_numbers(system, atoms):
                counts[m, column[int(z)]] += 1
        # The reference is purely per element: with "composition" the intercept is left to the
        # mean below; the adsorbate reference has none (zero adsorbate atoms adsorb with zero
        # energy), which is what lets it carry over to an unseen adsorbate.
        weights, _ = ridge_fit(counts, energies, ridge_alpha, intercept=atoms == "all")
        element_energies = tuple(float(w) for w in weights)
        energies = energies - counts @ weights
    return _residual_statistics(energies, len(train), elements, level_of_theory,
                                element_energies=element_energies, reference_atoms=atoms)


def _residual_statistics(residual: np.ndarray, count: int, elements: Tuple[int, ...],
                         level_of_theory: str, **reference: Any) -> Standardisation:
    std = float(np.std(residual))
    if not std > 0:
        raise OC20DataError(f"the {count} training energies are constant; cannot standardise")
    return Standardisation(float(np.mean(residual)), std, elements, level_of_theory, **reference)


def standardised_target(system: System, stats: Standardisation) -> float:
    """``(y - reference - mean) / std`` of one system (0 when its energy is unknown)."""
    if not np.isfinite(system.energy):
        return 0.0
    return (system.energy - stats.reference(system) - stats.mean) / stats.std


def _graphs(cfg: Dict[str, Any], systems: Sequence[System],
            stats: Standardisation) -> List[jraph.GraphsTuple]:
    cutoff = float(cfg["data"]["cutoff"])
    return [system_graph(s, cutoff, standardised_target(s, stats)) for s in systems]


def make_loaders(cfg: Dict[str, Any], splits: Mapping[str, Sequence[System]],
                 stats: Standardisation) -> Dict[str, GraphLoader]:
    """Graph loaders of the given splits; "train" shuffles with ``config.train.seed``."""
    batch_size = cfg["batch"]["batch_size"]
    eval_size = cfg["batch"]["eval_batch_size"] or batch_size
    graphs = {split: _graphs(cfg, systems, stats) for split, systems in splits.items()}
    every = [g for split_graphs in graphs.values() for g in split_graphs]
    budgets = {size: batch_budget(cfg["batch"], every, size) for size in {batch_size, eval_size}}
    return {split: GraphLoader(split_graphs, batch_size if split == "train" else eval_size,
                               budget=budgets[batch_size if split == "train" else eval_size],
                               shuffle=split == "train", seed=int(cfg["train"]["seed"]),
                               buckets=cfg["batch"]["buckets"])
            for split, split_graphs in graphs.items()}


def _fit(cfg: Dict[str, Any], splits: Mapping[str, Sequence[System]], stats: Standardisation,
         run_dir: Path) -> Tuple[Any, Dict[str, GraphLoader]]:
    loaders = make_loaders(cfg, splits, stats)
    run_dir.mkdir(parents=True, exist_ok=True)
    training.atomic_write_text(run_dir / _STATS_FILE, json.dumps(stats.to_json(), indent=2))
    model = make_model(cfg)
    result = training.fit(
        model.init, make_loss_fn(model, stats.std), loaders["train"], config=cfg["train"],
        run_dir=run_dir, val_data=loaders["valid"], test_data=loaders.get("test"),
        full_config=cfg, data_stats={"train": loaders["train"].describe(),
                                     "standardisation": stats.to_json()})
    return result, loaders


def _segnn_metrics(metrics: Optional[Mapping[str, float]]) -> Optional[Dict[str, float]]:
    if metrics is None:
        return None
    return {"mae_ev": metrics["mae"], "ewt": metrics["ewt"], "count": int(metrics["count"])}


def _data_path(cfg: Dict[str, Any]) -> str:
    path = cfg["data"]["path"]
    if path is None:
        hint = ("the folder of the Xu & Kitchin files (shared/data/adsorption_dft)"
                if cfg["data"]["dataset"] == "xu_kitchin" else
                "an OC20 LMDB / .aselmdb / extxyz file or folder, e.g. an EMT set made by "
                "`python -m segnn_jax.datasets.emt data/emt --n-samples 20000`")
        raise ConfigError(f"config.data.path: not set; give {hint}")
    return path


def run_is2re(config: Any, run_dir: Union[str, Path], *,
              command: Optional[str] = None) -> Dict[str, Any]:
    """Trains and evaluates SEGNN on IS2RE data, with the baselines; writes ``results.json``.

    Returns:
        The results: ``level_of_theory``, ``split`` (and the held-out groups), ``valid`` / ``test``
        ``{"mae_ev", "ewt", "count"}`` of SEGNN at the best validation, ``baselines`` (per split),
        sample counts, ``command``, ``git_revision`` and more.
    """
    cfg = validate_config(config)
    run_dir = Path(run_dir).resolve()  # orbax checkpoints need an absolute path
    start = time.perf_counter()
    systems, level = load_systems(_data_path(cfg))
    check_adsorbate_atoms(cfg, systems)
    splits, split_info = split_systems(cfg, systems)
    stats = standardise(splits["train"], level, cfg["data"]["energy_reference"],
                        cfg["baseline"]["ridge_alpha"])
    print(f"OC20 IS2RE ({level}) from {cfg['data']['path']}: {len(splits['train'])} training, "
          f"{len(splits['valid'])} validation, {len(splits['test'])} test systems "
          f"(split {cfg['data']['split']}); training mean {stats.mean:.4f} eV, "
          f"std {stats.std:.4f} eV", flush=True)
    result, _ = _fit(cfg, splits, stats, run_dir)
    best = result.best
    results = {
        "task": "oc20",
        "dataset": "is2re",
        "level_of_theory": level,
        "data_path": cfg["data"]["path"],
        **split_info,
        "valid": _segnn_metrics(best["val"]) if best else None,
        "test": _segnn_metrics(best["test"]) if best else None,
        "baselines": baseline_metrics(cfg, splits["train"],
                                      {k: splits[k] for k in ("valid", "test")}),
        "best_epoch": best["epoch"] + 1 if best else None,
        "epochs": cfg["train"]["num_epochs"],
        "n_train": len(splits["train"]),
        "n_valid": len(splits["valid"]),
        "n_test": len(splits["test"]),
        "cutoff": cfg["data"]["cutoff"],
        "hidden_irreps": str(models.hidden_irreps(cfg["model"])),
        "num_layers": cfg["model"]["num_layers"],
        "embedding_dim": cfg["embedding"]["dim"],
        "standardisation": stats.to_json(),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "command": command if command is not None else " ".join(sys.argv),
        "git_revision": training.git_revision(),
        "num_parameters": training.count_parameters(result.state.params),
    }
    training.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    if best:
        ridge = results["baselines"]["composition_ridge"]["test"]
        print(f"\nOC20 ({level}) test at the best validation (epoch {results['best_epoch']}): SEGNN "
              f"MAE {results['test']['mae_ev']:.4f} eV, EwT {results['test']['ewt']:.3f}; "
              f"composition ridge MAE {ridge['mae_ev']:.4f} eV, EwT {ridge['ewt']:.3f} "
              f"({results['n_test']} systems)", flush=True)
    return results


def cross_validate(config: Any, run_dir: Union[str, Path], *,
                   command: Optional[str] = None) -> Dict[str, Any]:
    """k-fold cross-validation on the Xu & Kitchin DFT set (``data.dataset="xu_kitchin"``).

    Folds: ``data.cv_folds`` seeded by ``data.cv_seed``. For each fold, SEGNN trains on the other
    folds minus an inner validation part (``data.valid_fraction``, which picks the best epoch) and
    is tested on the fold; the per-adsorbate-mean and composition baselines fit on all the other
    folds. Each fold's run directory is ``run_dir/fold_<k>``.

    Returns:
        The results written to ``run_dir/results.json``: ``segnn`` / ``adsorbate_mean`` /
        ``composition_ridge`` each ``{"fold_mae_ev": [...], "mean_mae_ev", "fold_ewt", ...}``,
        ``folds``, ``n_samples``, ``level_of_theory``, the model settings, ``command``,
        ``git_revision``.
    """
    cfg = validate_config(config)
    if cfg["data"]["dataset"] != "xu_kitchin":
        raise ConfigError(f"config.data.dataset: cross-validation runs on 'xu_kitchin', got "
                          f"{cfg['data']['dataset']!r}")
    run_dir = Path(run_dir).resolve()
    start = time.perf_counter()
    systems = load_xu_kitchin(_data_path(cfg))
    check_adsorbate_atoms(cfg, systems)
    folds = kfold_indices(len(systems), cfg["data"]["cv_folds"], cfg["data"]["cv_seed"])
    level = "DFT (PBE, VASP; Xu & Kitchin 2014)"
    print(f"Xu & Kitchin: {len(systems)} samples, {len(folds)} folds", flush=True)
    per_method: Dict[str, Dict[str, List[float]]] = {
        m: {"fold_mae_ev": [], "fold_ewt": []}
        for m in ("segnn", "adsorbate_mean", "composition_ridge")}
    fold_sizes = []
    for k, test_index in enumerate(folds):
        rest = np.setdiff1d(np.arange(len(systems)), test_index)
        inner = np.random.RandomState(cfg["data"]["cv_seed"] + 1 + k).permutation(rest)
        n_valid = max(1, round(len(inner) * cfg["data"]["valid_fraction"]))
        splits = {"train": [systems[i] for i in inner[n_valid:]],
                  "valid": [systems[i] for i in inner[:n_valid]],
                  "test": [systems[i] for i in test_index]}
        fold_sizes.append(len(test_index))
        stats = standardise(splits["train"], level, cfg["data"]["energy_reference"],
                            cfg["baseline"]["ridge_alpha"])
        result, _ = _fit(cfg, splits, stats, run_dir / f"fold_{k}")
        segnn = _segnn_metrics(result.best["test"])
        train_all = [systems[i] for i in rest]
        target = np.asarray([s.energy for s in splits["test"]])
        composition = CompositionBaseline(cfg["baseline"]["ridge_alpha"]).fit(train_all)
        fold_metrics = {
            "segnn": segnn,
            "adsorbate_mean": energy_metrics(adsorbate_mean_baseline(train_all, splits["test"]),
                                             target),
            "composition_ridge": energy_metrics(composition.predict(splits["test"]), target),
        }
        for method, metrics in fold_metrics.items():
            per_method[method]["fold_mae_ev"].append(metrics["mae_ev"])
            per_method[method]["fold_ewt"].append(metrics["ewt"])
        print(f"fold {k}: MAE SEGNN {segnn['mae_ev']:.4f}, adsorbate mean "
              f"{fold_metrics['adsorbate_mean']['mae_ev']:.4f}, composition ridge "
              f"{fold_metrics['composition_ridge']['mae_ev']:.4f} eV", flush=True)
    sizes = np.asarray(fold_sizes, np.float64)
    for values in per_method.values():
        values["mean_mae_ev"] = float(np.mean(values["fold_mae_ev"]))
        values["std_mae_ev"] = float(np.std(values["fold_mae_ev"]))
        # Every sample is tested once: the sample-weighted mean is the MAE over the whole set.
        values["pooled_mae_ev"] = float(np.sum(sizes * values["fold_mae_ev"]) / sizes.sum())
        values["pooled_ewt"] = float(np.sum(sizes * values["fold_ewt"]) / sizes.sum())
    results = {
        "task": "oc20",
        "dataset": "xu_kitchin",
        "level_of_theory": level,
        "input_structure": "relaxed (the set has no initial structures)",
        "data_path": cfg["data"]["path"],
        "n_samples": len(systems),
        "folds": len(folds),
        "fold_sizes": fold_sizes,
        "cv_seed": cfg["data"]["cv_seed"],
        **per_method,
        "model": {"hidden_irreps": str(models.hidden_irreps(cfg["model"])),
                  "num_layers": cfg["model"]["num_layers"],
                  "lmax_attr": cfg["model"]["lmax_attr"],
                  "embedding_dim": cfg["embedding"]["dim"], "cutoff": cfg["data"]["cutoff"],
                  "epochs": cfg["train"]["num_epochs"], "batch_size": cfg["batch"]["batch_size"],
                  "optimizer": cfg["train"]["optimizer"]},
        "ridge_alpha": cfg["baseline"]["ridge_alpha"],
        "wall_time_s": round(time.perf_counter() - start, 1),
        "command": command if command is not None else " ".join(sys.argv),
        "git_revision": training.git_revision(),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    training.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    print("\nXu & Kitchin (DFT) cross-validated MAE (eV): " + ", ".join(
        f"{m} {per_method[m]['mean_mae_ev']:.4f}" for m in per_method), flush=True)
    return results


def train(config: Any, run_dir: Union[str, Path], *,
          command: Optional[str] = None) -> Dict[str, Any]:
    """The ``segnn train`` entry point: :func:`run_is2re`, or :func:`cross_validate` when
    ``data.dataset="xu_kitchin"``."""
    cfg = validate_config(config)
    if cfg["data"]["dataset"] == "xu_kitchin":
        return cross_validate(cfg, run_dir, command=command)
    return run_is2re(cfg, run_dir, command=command)


# --------------------------------------------------------------------------------------------------
# Evaluation, prediction


def _read_run(run_dir: Path) -> Tuple[Dict[str, Any], Standardisation]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    cfg = validate_config(json.loads(path.read_text()))
    stats_path = Path(run_dir) / _STATS_FILE
    if not stats_path.is_file():
        raise FileNotFoundError(f"{run_dir}: {stats_path.name} (the training standardisation) "
                                f"is missing")
    return cfg, _standardisation(json.loads(stats_path.read_text()))


def _standardisation(raw: Mapping[str, Any]) -> Standardisation:
    """The :class:`Standardisation` of its JSON (``oc20_standardisation.json``)."""
    return Standardisation(float(raw["mean"]), float(raw["std"]),
                           tuple(int(z) for z in raw["elements"]), str(raw["level_of_theory"]),
                           tuple(float(e) for e in raw.get("element_energies", ())),
                           str(raw.get("reference_atoms", "all")),
                           tuple((str(a), tuple(float(v) for v in w))
                                 for a, w in raw.get("adsorbate_weights", {}).items()))


def restore_params(cfg: Dict[str, Any], run_dir: Union[str, Path], example: jraph.GraphsTuple):
    """``(params, model_state, step)`` of the best-by-validation checkpoint of a run (EMA
    parameters when the run evaluated with them)."""
    return training.restore_best_params(make_model(cfg).init, cfg["train"], run_dir, example)


def run_baselines(run_dir: Union[str, Path], *, systems: Optional[Sequence[System]] = None
                  ) -> Dict[str, Dict[str, Any]]:
    """Every current baseline (:func:`baseline_metrics`) fitted again on a finished run's training
    split, on its validation and test splits: runs trained before a baseline existed can then be
    compared with it.

    Args:
        run_dir: a run directory with ``config.json`` and ``results.json``.
        systems: the run's data set (default: read from the path its config names).

    Raises:
        ValueError: a baseline the run recorded comes out different, so the data set (or the
            split) is not the one the run was trained on.
    """
    cfg, _ = _read_run(Path(run_dir))
    recorded = json.loads((Path(run_dir) / "results.json").read_text())["baselines"]
    if systems is None:
        systems = load_systems(_data_path(cfg))[0]
    splits, _ = split_systems(cfg, systems)
    fresh = baseline_metrics(cfg, splits["train"], {k: splits[k] for k in ("valid", "test")})
    for name, by_split in recorded.items():
        if name not in fresh:
            raise ValueError(f"{run_dir}: the run recorded a baseline {name!r} that the current "
                             f"code does not have ({', '.join(fresh)})")
        for split, metrics in by_split.items():
            now = fresh[name][split]["mae_ev"]
            if not np.isclose(now, metrics["mae_ev"], rtol=1e-9):
                raise ValueError(
                    f"{run_dir}: baseline {name} on {split} is {now:.6f} eV now, "
                    f"{metrics['mae_ev']:.6f} eV when the run was trained: not the same data set "
                    f"or split ({cfg['data']['path']})")
    return fresh


def evaluate(run_dir: Union[str, Path], split: str = "test") -> Dict[str, Any]:
    """Evaluates the best checkpoint of an IS2RE run on a whole split (``segnn evaluate``).

    Returns:
        ``{"split", "mae_ev", "ewt", "count", "level_of_theory", "checkpoint_step"}``.
    """
    predictions = split_predictions(run_dir, split)
    out = {"split": split, **energy_metrics(predictions["predicted_ev"], predictions["target_ev"]),
           "level_of_theory": predictions["level_of_theory"],
           "checkpoint_step": predictions["checkpoint_step"]}
    print(f"OC20 ({out['level_of_theory']}) {split}: MAE {out['mae_ev']:.4f} eV, EwT "
          f"{out['ewt']:.3f} over {out['count']} systems", flush=True)
    return out


def _energies_ev(apply, loader: GraphLoader, systems: Sequence[System],
                 stats: Standardisation) -> np.ndarray:
    """``[S]`` adsorption energies (eV, float64) of ``systems`` from a model's standardised outputs.

    ``loader`` must hold exactly ``systems`` without shuffling: the real graphs of its batches,
    concatenated, are then the systems in order.
    """
    standardised = np.concatenate([np.asarray(apply(batch))[np.asarray(graph_mask(batch))]
                                   for batch in loader.epoch_batches(0)]).astype(np.float64)
    return standardised * stats.std + stats.mean + np.asarray(
        [stats.reference(system) for system in systems])


def split_predictions(run_dir: Union[str, Path], split: str = "test", *,
                      systems: Optional[Sequence[System]] = None) -> Dict[str, Any]:
    """The best checkpoint's adsorption energies (eV) for every system of a split, in split order.

    Args:
        run_dir: an IS2RE run directory.
        split: "train", "valid" or "test" of the run's own split.
        systems: the run's data set already loaded (:func:`load_systems` of its
            ``config.data.path``), to skip reading it again.

    Returns:
        ``{"names", "predicted_ev", "target_ev", "checkpoint_step", "level_of_theory"}``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cfg, stats = _read_run(Path(run_dir))
    if cfg["data"]["dataset"] != "is2re":
        raise ConfigError("config.data.dataset: evaluate re-splits IS2RE data; the test metrics of "
                          "each cross-validation fold are in the run's results.json (predict works "
                          "with a fold's run directory)")
    if systems is None:
        systems, _ = load_systems(_data_path(cfg))
    chosen = split_systems(cfg, systems)[0][split]
    loader = make_loaders(cfg, {split: chosen}, stats)[split]
    model = make_model(cfg)
    params, model_state, step = restore_params(cfg, run_dir, next(iter(loader.epoch_batches(0))))
    apply = jit(lambda graph: model.apply(params, model_state, None, graph, False)[0])
    predicted = _energies_ev(apply, loader, chosen, stats)
    return {"names": [system.name for system in chosen], "predicted_ev": predicted,
            "target_ev": np.asarray([system.energy for system in chosen], np.float64),
            "checkpoint_step": step, "level_of_theory": stats.level_of_theory}


def evaluate_ensemble(run_dirs: Sequence[Union[str, Path]], split: str = "test", *,
                      systems: Optional[Mapping[str, Sequence[System]]] = None) -> Dict[str, Any]:
    """MAE and EwT of the mean prediction of several IS2RE runs on the same split.

    The runs (e.g. one recipe trained with different ``train.seed``) must share the data set and
    the split: the same systems in the same order, else a ValueError names the first run that
    differs (checked before any model runs). ``systems`` maps a run's ``config.data.path`` to its
    data set already loaded (:func:`load_systems`); paths not in it are read here.

    Returns:
        ``{"split", "members", "mae_ev", "ewt", "count", "member_mae_ev", "member_ewt",
        "level_of_theory", "names", "predicted_ev", "member_predicted_ev", "target_ev"}``;
        ``member_*`` in the order of ``run_dirs``, ``predicted_ev`` the ensemble mean.
    """
    if not run_dirs:
        raise ValueError("evaluate_ensemble needs at least one run directory")
    loaded: Dict[str, Sequence[System]] = dict(systems or {})
    paths, names = [], []
    for run_dir in run_dirs:
        cfg, _ = _read_run(Path(run_dir))
        paths.append(_data_path(cfg))
        if paths[-1] not in loaded:
            loaded[paths[-1]] = load_systems(paths[-1])[0]
        names.append([system.name for system in split_systems(cfg, loaded[paths[-1]])[0][split]])
        if names[-1] != names[0]:
            raise ValueError(f"{run_dir}: its {split} split holds other systems than that of "
                             f"{run_dirs[0]}; an ensemble needs the same data and split")
    members = [split_predictions(run_dir, split, systems=loaded[path])
               for run_dir, path in zip(run_dirs, paths)]
    target = members[0]["target_ev"]
    mean = np.mean([member["predicted_ev"] for member in members], axis=0)
    each = [energy_metrics(member["predicted_ev"], target) for member in members]
    return {"split": split, "members": [str(r) for r in run_dirs], **energy_metrics(mean, target),
            "member_mae_ev": [m["mae_ev"] for m in each], "member_ewt": [m["ewt"] for m in each],
            "level_of_theory": members[0]["level_of_theory"], "names": names[0],
            "predicted_ev": mean, "member_predicted_ev": [m["predicted_ev"] for m in members],
            "target_ev": target}


def read_structures(paths: Sequence[Union[str, Path]]) -> List[System]:
    """Systems (energy NaN) from ASE-readable files, every frame of every file.

    Raises:
        OC20InputError: a missing or unreadable file, an empty structure or non-finite positions.
    """
    import ase.io

    systems = []
    for path in map(Path, paths):
        if not path.is_file():
            raise OC20InputError(f"{path}: no such file")
        try:
            frames = ase.io.read(str(path), index=":")
        except Exception as e:  # noqa: BLE001 -- ASE raises many types for unreadable files
            raise OC20InputError(f"{path}: not a structure file ASE can read ({e})") from e
        for k, atoms in enumerate(frames):
            name = f"{path.name}:{k}"
            if len(atoms) == 0:
                raise OC20InputError(f"{name}: a structure without atoms")
            if not np.all(np.isfinite(atoms.positions)):
                raise OC20InputError(f"{name}: non-finite positions")
            tags = atoms.get_tags()
            numbers = atoms.get_atomic_numbers()
            systems.append(System(atoms.get_positions(), atoms.get_cell().array, atoms.get_pbc(),
                                  numbers, tags, float("nan"), _formula(numbers[tags == 2]),
                                  _formula(numbers[tags != 2]), name))
    if not systems:
        raise OC20InputError("no structures in the given files")
    return systems


def predict(run_dir: Union[str, Path], input_path: Union[str, Path, Sequence[Union[str, Path]]],
            output_path: Union[str, Path, None] = None) -> Path:
    """Predicts adsorption energies of structures in ASE-readable files (best checkpoint).

    Args:
        run_dir: a trained IS2RE run directory (or one fold of a cross-validation), an
            artifact of one (``segnn export``), or a loaded
            :class:`segnn_jax.artifact.TrainedModel`.
        input_path: a structure file (every frame is a system; cell and pbc as stored), or a list.
        output_path: the CSV to write; default ``<first input stem>_adsorption_energy.csv`` next
            to the first input.

    Returns:
        The output path. Columns: ``name`` (file:frame), ``n_atoms``, ``formula``,
        ``adsorption_energy_ev``, ``level_of_theory`` (of the training data: EMT for the
        stand-in).

    Raises:
        OC20InputError: unreadable file, or an element the model never saw in training (its
            embedding is untrained).
    """
    from ase.data import chemical_symbols

    from segnn_jax.artifact import load_trained

    paths = [input_path] if isinstance(input_path, (str, Path)) else list(input_path)
    trained = load_trained(run_dir, task="oc20")
    cfg, stats = trained.config, _standardisation(trained.side_files[_STATS_FILE])
    systems = read_structures(paths)
    check_adsorbate_atoms(cfg, systems, OC20InputError)
    for system in systems:
        unknown = sorted({int(z) for z in system.atomic_numbers} - set(stats.elements))
        if unknown:
            raise OC20InputError(
                f"{system.name}: element(s) {', '.join(chemical_symbols[z] for z in unknown)} "
                f"never seen in training (the model knows "
                f"{', '.join(chemical_symbols[z] for z in stats.elements)})")
    graphs = [system_graph(s, float(cfg["data"]["cutoff"])) for s in systems]
    eval_size = cfg["batch"]["eval_batch_size"] or cfg["batch"]["batch_size"]
    loader = GraphLoader(graphs, eval_size, budget=batch_budget(cfg["batch"], graphs, eval_size),
                         buckets=cfg["batch"]["buckets"])
    energies = _energies_ev(trained.apply, loader, systems, stats)
    first = Path(paths[0])
    output_path = Path(output_path) if output_path is not None else \
        first.with_name(f"{first.stem}_adsorption_energy.csv")
    with open(output_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "n_atoms", "formula",
                                               "adsorption_energy_ev", "level_of_theory"])
        writer.writeheader()
        for system, energy in zip(systems, energies):
            writer.writerow({"name": system.name, "n_atoms": len(system.atomic_numbers),
                             "formula": _formula(system.atomic_numbers),
                             "adsorption_energy_ev": float(energy),
                             "level_of_theory": stats.level_of_theory})
    return output_path
