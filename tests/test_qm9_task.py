"""The QM9 task (segnn_jax.tasks.qm9): config errors, training-set standardisation, MAE units,
invariance of the prediction from raw positions, and train -> evaluate -> predict end to end."""

import csv
import json
from pathlib import Path

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segnn_jax.configs import load_config
from segnn_jax.datasets import qm9 as qm9_data
from segnn_jax.graph import batch_graphs, pad_graph
from segnn_jax.tasks import get_task, qm9
from segnn_jax.training import ConfigError

FIXTURES = Path(__file__).parents[1] / ".." / "shared" / "data" / "qm9"
CSV_FIXTURE = FIXTURES / "qm9pack_part1_first1000.csv"
ORIGINAL_FIXTURE = FIXTURES / "original_format" / "dsgdb9nsd_000004.xyz"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    if not CSV_FIXTURE.is_file():
        pytest.skip(f"QM9 CSV fixture absent: {CSV_FIXTURE}")
    config = load_config("test_qm9")
    config.data.source = str(CSV_FIXTURE.resolve())
    config.data.data_dir = str(tmp_path_factory.mktemp("qm9_cache"))
    return config


@pytest.fixture(scope="module")
def splits(config):
    return qm9.load_splits(config)


def _padded(graphs):
    graph = batch_graphs(graphs)
    n_node, n_edge = int(graph.n_node.sum()), int(graph.n_edge.sum())
    return pad_graph(graph, n_node + 3, n_edge + 8, len(graph.n_node) + 1)


def test_registered_and_default_config_is_the_reference_recipe():
    assert get_task("qm9") is qm9
    cfg = qm9.validate_config(load_config("qm9"))
    assert cfg["data"]["split"] == "cormorant" and cfg["data"]["n_train"] is None
    assert cfg["model"]["num_layers"] == 7 and cfg["model"]["norm"] == "instance"
    assert cfg["model"]["pool"] == "avg" and cfg["model"]["task"] == "graph"
    from segnn_jax.tasks import models

    assert str(models.hidden_irreps(cfg["model"])) == "36x0e+36x1o+36x2e"
    opt = cfg["train"]["optimizer"]
    assert (opt["learning_rate"], opt["weight_decay"], opt["schedule"]) == (5e-4, 1e-8,
                                                                            "multistep")
    assert tuple(opt["decay_fractions"]) == (0.8, 0.9)
    assert cfg["batch"]["batch_size"] == 128 and cfg["train"]["num_epochs"] == 1000
    extensive = qm9.validate_config(load_config("qm9_extensive"))
    assert extensive["data"]["atom_reference"] and extensive["model"]["pool"] == "sum"


@pytest.mark.parametrize("section, key, value, message", [
    ("data", "target", "alpha2", "config.data.target"),
    ("data", "atom_reference", True, "config.data.atom_reference"),  # alpha has no reference
    ("data", "cutoff", -1.0, "config.data.cutoff"),
    ("data", "split", "scaffold", "config.data.split"),
    ("data", "n_train", 0, "config.data.n_train"),
    ("batch", "buckets", (0.5, 0.25), "config.batch.buckets"),
    ("model", "task", "node", "config.model.task"),
])
def test_bad_options_fail_at_start_naming_the_option(tmp_path, section, key, value, message):
    config = load_config("test_qm9")
    config[section][key] = value
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        qm9.validate_config(config)
    # run_qm9 refuses before touching any data or run directory.
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        qm9.run_qm9(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cormorant_split_needs_the_full_set(config):
    config = load_config("test_qm9")
    config.data.source = str(CSV_FIXTURE.resolve())
    config.data.split = "cormorant"
    with pytest.raises(ConfigError, match=r"config\.data\.split.*130831"):
        qm9.load_splits(config)


def test_standardisation_uses_training_statistics(config, splits):
    cfg = qm9.validate_config(config)
    stats = qm9.standardise(cfg, splits["train"])
    train_values = qm9_data.target_values(splits["train"], "alpha")[:, 0]
    assert stats.mean == pytest.approx(train_values.mean(), rel=1e-12)
    assert stats.mad == pytest.approx(np.abs(train_values - train_values.mean()).mean(), rel=1e-12)
    everything = np.concatenate([qm9_data.target_values(splits[s], "alpha")[:, 0]
                                 for s in qm9.SPLITS])
    assert abs(everything.mean() - stats.mean) > 1e-6  # not the statistics of all molecules
    loaders = qm9.make_loaders(config, splits, stats)
    z = np.concatenate([
        np.asarray(b.globals["targets"])[np.asarray(b.globals["graph_mask"]), 0]
        for b in loaders["train"].epoch_batches(0)])
    assert z.dtype == np.float32 and len(z) == len(splits["train"])
    assert np.mean(z) == pytest.approx(0.0, abs=1e-5)
    assert np.mean(np.abs(z)) == pytest.approx(1.0, rel=1e-5)


def _molecules_with_u0(u0_hartree):
    """Hand-made methane-like molecules with the given U0 (Hartree) and NaN other properties."""
    numbers = np.array([6, 1, 1, 1, 1] * len(u0_hartree))
    tetra = np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
                      [0.63, -0.63, -0.63]])
    properties = np.full((len(u0_hartree), len(qm9_data.PROPERTY_NAMES)), np.nan)
    properties[:, qm9_data.PROPERTY_NAMES.index("U0")] = u0_hartree
    return qm9_data.QM9Molecules(numbers, np.tile(tetra, (len(u0_hartree), 1)),
                                 np.full(len(u0_hartree), 5), np.arange(1, len(u0_hartree) + 1),
                                 properties)


@pytest.mark.parametrize("atom_reference", [False, True])
def test_reported_mae_is_in_mev(atom_reference):
    """U0 of -40.0 and -40.001 Ha: mean -40.0005 Ha, MAD 0.0005 Ha = 13.6057 meV. A model that
    predicts z = 0 (the training mean) errs by one MAD on each: loss 1, MAE 13.6057 meV."""
    cfg = qm9.validate_config({"task": "qm9",
                               "data": {"target": "U0", "atom_reference": atom_reference}})
    molecules = _molecules_with_u0([-40.0, -40.001])
    stats = qm9.standardise(cfg, molecules)
    assert stats.unit == "meV"
    assert stats.mad == pytest.approx(0.0005 * 27211.386246, rel=1e-9)
    offset = 0.0 if not atom_reference else (-37.846772 - 4 * 0.500273) * 27211.386246
    assert stats.mean == pytest.approx(-40.0005 * 27211.386246 - offset, rel=1e-12)
    batch = _padded(qm9._graphs(cfg, molecules, stats))
    model = hk.transform_with_state(lambda g, is_training=False: jnp.zeros(g.n_node.shape))
    loss_sum, (sums, _) = qm9.make_loss_fn(model, stats.mad)({}, {}, batch, None, False)
    assert float(sums["count"]) == 2.0  # the padding graph does not count
    assert float(loss_sum) / 2 == pytest.approx(1.0, rel=1e-6)
    assert float(sums["mae_sum"]) / 2 == pytest.approx(13.605693123, rel=1e-6)


def _random_orthogonal(seed):
    rotation = np.asarray(e3nn.rand_matrix(jax.random.PRNGKey(seed), ()), np.float64)
    return rotation @ np.diag([1.0, 1.0, -1.0])  # a rotation composed with a reflection


def test_prediction_is_invariant_from_raw_positions(config, splits):
    """E(3) and permutation invariance end to end: the radius graph is rebuilt from the moved
    atoms, and the prediction of each molecule must not change."""
    cfg = qm9.validate_config(config)
    molecules = splits["valid"]
    stats = qm9.standardise(cfg, splits["train"])
    rotation, translation = _random_orthogonal(3), np.array([1.5, -20.0, 7.25])
    rng = np.random.default_rng(0)
    offsets = molecules.offsets
    permuted = np.concatenate([offsets[m] + rng.permutation(int(molecules.n_atoms[m]))
                               for m in range(len(molecules))])
    moved = qm9_data.QM9Molecules(
        molecules.atomic_numbers[permuted], molecules.positions[permuted] @ rotation.T + translation,
        molecules.n_atoms, molecules.index, molecules.properties)
    model = qm9.make_model(cfg)
    n = len(molecules)
    # Both copies in one batch (instance norm is per graph): one trace, one compilation.
    batch = _padded(qm9._graphs(cfg, molecules, stats) + qm9._graphs(cfg, moved, stats))
    assert int(batch.n_edge[:n].sum()) == int(batch.n_edge[n:2 * n].sum())

    @jax.jit
    def predictions(graph):
        params, state = model.init(jax.random.PRNGKey(1), graph)
        return model.apply(params, state, None, graph, False)[0]

    predicted = np.asarray(predictions(batch))
    before, after = predicted[:n], predicted[n:2 * n]
    assert np.all(np.isfinite(before)) and np.std(before) > 0
    scale = np.max(np.abs(before))
    assert np.max(np.abs(after - before)) / scale < 1e-4


def _write_xyz(path, molecules):
    import ase.io
    from ase import Atoms

    frames = []
    for m in range(len(molecules)):
        numbers, positions = molecules.molecule(m)
        frames.append(Atoms(numbers=numbers, positions=positions))
    ase.io.write(str(path), frames, format="extxyz")


def test_train_evaluate_predict_end_to_end(config, splits, tmp_path):
    """The improved recipe on U0 (atom references, sum pool): train a few steps, evaluate the best
    checkpoint on the whole test split, then predict the same molecules from an xyz file; the MAE
    of the predicted TOTAL energies equals the evaluated one."""
    config = config.copy_and_resolve_references()
    config.data.target = "U0"
    config.data.atom_reference = True
    config.model.pool = "sum"
    run_dir = tmp_path / "run"
    results = qm9.run_qm9(config, run_dir, command="pytest")
    for key in ("target", "unit", "val_mae", "test_mae", "n_train", "epochs", "wall_time_s",
                "train_graphs_per_s", "command", "git_revision"):
        assert results[key] is not None, key
    assert results["unit"] == "meV" and results["n_train"] == 32
    assert results["val_count"] == 8 and results["test_count"] == 8  # whole (capped) sets
    assert json.loads((run_dir / "results.json").read_text())["test_mae"] == results["test_mae"]

    evaluated = qm9.evaluate(run_dir, "test")
    assert evaluated["count"] == 8
    assert evaluated["mae"] == pytest.approx(results["test_mae"], rel=1e-5)

    xyz = tmp_path / "test_molecules.xyz"
    _write_xyz(xyz, splits["test"])
    # Several files in one call; QM9's own layout (tabs, properties line) goes through ASE's
    # fallback reader.
    inputs = [xyz] + ([ORIGINAL_FIXTURE] if ORIGINAL_FIXTURE.is_file() else [])
    out = qm9.predict(run_dir, inputs, tmp_path / "predicted.csv")
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows[:8]] == [f"test_molecules.xyz:{k}" for k in range(8)]
    assert all(r["unit"] == "meV" for r in rows)
    predicted = np.array([float(r["U0"]) for r in rows[:8]])
    truth = qm9_data.target_values(splits["test"], "U0")[:, 0]  # total energies, meV
    assert np.mean(np.abs(predicted - truth)) == pytest.approx(evaluated["mae"], rel=1e-4)
    if len(inputs) == 2:
        assert len(rows) == 9 and rows[8]["name"] == "dsgdb9nsd_000004.xyz:0"
        assert (rows[8]["n_atoms"], rows[8]["formula"]) == ("4", "C2H2")


def test_prediction_files(tmp_path):
    rows = [{"name": "a.xyz:0", "n_atoms": 5, "formula": "CH4", "U0": -1101.5, "unit": "meV"}]
    path = qm9.write_predictions(rows, tmp_path / "p.json", target="U0", unit="meV",
                                 run_dir="runs/x")
    assert json.loads(path.read_text()) == {"target": "U0", "unit": "meV", "run_dir": "runs/x",
                                            "predictions": rows}
    path = qm9.write_predictions(rows, tmp_path / "p.csv", target="U0", unit="meV",
                                 run_dir="runs/x")
    with open(path) as f:
        assert list(csv.DictReader(f)) == [{k: str(v) for k, v in rows[0].items()}]


def test_predict_rejects_unknown_elements_and_unreadable_files(tmp_path):
    import ase.io
    from ase import Atoms

    path = tmp_path / "chloromethane.xyz"
    ase.io.write(str(path), Atoms("CH3Cl", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0],
                                                       [0, 0, 1], [-1.8, 0, 0]]))
    with pytest.raises(qm9.QM9InputError, match=r"chloromethane\.xyz.*Cl"):
        qm9.read_structures([path])
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("not a molecule\n")
    with pytest.raises(qm9.QM9InputError, match=r"garbage\.xyz"):
        qm9.read_structures([garbage])
    with pytest.raises(qm9.QM9InputError, match="no such file"):
        qm9.read_structures([tmp_path / "missing.xyz"])
