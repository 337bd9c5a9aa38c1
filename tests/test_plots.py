"""Figure data (segnn_jax.plots): messages per atom and connectivity against brute force, the
glyph's rotation, learning curves and parity data of a run; plotting only as smoke tests."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from segnn_jax import plots
from segnn_jax.configs import load_config
from segnn_jax.datasets import qm9 as qm9_data
from segnn_jax.graph import radius_graph_edges
from segnn_jax.tasks import inference, nbody
from segnn_jax.training import CheckpointManager, make_optimizer
from segnn_jax.training.step import init_train_state


def _molecules(seed=0):
    """Random 'molecules' of 1 to 9 atoms, some of two fragments far apart."""
    rng = np.random.default_rng(seed)
    numbers, positions, counts = [], [], []
    for k in range(40):
        n = int(rng.integers(1, 10))
        pos = rng.uniform(0, 2.5, size=(n, 3))
        if k % 3 == 0 and n > 2:
            pos[: n // 2] += 4.0  # a second fragment
        numbers.append(rng.choice([1, 6, 7, 8, 9], size=n))
        positions.append(pos)
        counts.append(n)
    m = len(counts)
    return qm9_data.QM9Molecules(np.concatenate(numbers), np.concatenate(positions), counts,
                                 np.arange(1, m + 1), np.zeros((m, len(qm9_data.PROPERTY_NAMES))))


def _connected(positions, cutoff):
    """Breadth-first search over the radius graph."""
    senders, receivers = radius_graph_edges(positions, cutoff)
    seen, frontier = {0}, [0]
    while frontier:
        node = frontier.pop()
        for s in senders[receivers == node]:
            if int(s) not in seen:
                seen.add(int(s))
                frontier.append(int(s))
    return len(seen) == len(positions)


def test_message_statistics_match_brute_force():
    molecules = _molecules()
    cutoffs = [0.5, 1.0, 1.7, 2.5, 12.0]
    stats = plots.message_statistics(molecules, cutoffs, chunk=3)
    assert stats["n_molecules"] == len(molecules) and stats["n_atoms"] == molecules.n_atoms.sum()
    for k, cutoff in enumerate(cutoffs):
        degrees, disconnected, isolated = [], [], []
        for m in range(len(molecules)):
            _, pos = molecules.molecule(m)
            _, receivers = radius_graph_edges(pos, cutoff)
            degree = np.bincount(receivers, minlength=len(pos))
            degrees.extend(degree)
            disconnected.append(not _connected(pos, cutoff))
            isolated.append(bool(np.any(degree == 0)))
        assert stats["mean_messages_per_atom"][k] == pytest.approx(np.mean(degrees))
        assert stats["std_messages_per_atom"][k] == pytest.approx(np.std(degrees))
        assert stats["mean_messages_per_molecule"][k] == pytest.approx(
            np.sum(degrees) / len(molecules))
        assert stats["fraction_disconnected"][k] == pytest.approx(np.mean(disconnected))
        assert stats["fraction_with_isolated_atom"][k] == pytest.approx(np.mean(isolated))
    largest = max(plots.minimum_connecting_cutoff(
        np.linalg.norm(pos[:, None] - pos[None], axis=-1)[None])[0]
        for pos in (molecules.molecule(m)[1] for m in range(len(molecules))))
    assert stats["all_connected_above"] == pytest.approx(largest)
    # Not a trivial data set: some cutoffs leave some molecules disconnected, others none.
    assert 0 < stats["fraction_disconnected"][2] < 1 and stats["fraction_disconnected"][-1] == 0


def test_minimum_connecting_cutoff_is_the_connectivity_threshold():
    rng = np.random.default_rng(1)
    positions = rng.uniform(0, 3, size=(6, 7, 3))
    diff = positions[:, :, None] - positions[:, None, :]
    distances = np.linalg.norm(diff, axis=-1)
    threshold = plots.minimum_connecting_cutoff(distances)
    for m in range(len(positions)):
        assert _connected(positions[m], threshold[m] + 1e-9)
        assert not _connected(positions[m], threshold[m] * (1 - 1e-9))
    with pytest.raises(ValueError, match="positive radii"):
        plots.message_statistics(_molecules(), [1.0, -1.0])


def test_glyph_rotates_with_the_molecule():
    numbers = np.array([8, 1, 1, 6])
    positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0],
                          [0.3, -0.4, 1.2]])
    rotation = plots.random_rotation(4)
    data = plots.glyph_data(numbers, positions, rotation, hidden_irreps="2x0e+1x1o+1x2e",
                            num_layers=0, resolution=12)
    assert data["directions"].shape == (12, 24, 3) and data["values"].shape == (12, 24)
    assert data["coefficients"].shape == (8,)
    np.testing.assert_allclose(data["rotated_positions"].mean(0), positions.mean(0), atol=1e-12)
    assert data["equivariance_error"] < 1e-4
    # The rotation changes the function on the grid: the glyph moved (it is not a sphere).
    scale = np.abs(data["values"]).max()
    assert scale > 0 and np.abs(data["rotated_values"] - data["values"]).max() > 0.1 * scale
    with pytest.raises(ValueError, match="proper 3x3 rotation"):
        plots.glyph_data(numbers, positions, -np.eye(3))


def test_learning_curves_and_parity_summary():
    events = [{"event": "compile", "seconds": 3.0},
              {"event": "train", "step": 10, "loss": 0.5},
              {"event": "eval", "split": "val", "step": 10, "loss": 0.4},
              {"event": "train", "step": 20, "loss": 0.3},
              {"event": "eval", "split": "val", "step": 20, "loss": 0.35},
              {"event": "summary", "best": {"step": 20, "epoch": 1, "metric": 0.35}}]
    curves = plots.learning_curves(events, "loss")
    assert curves["curves"]["train"] == {"step": [10, 20], "loss": [0.5, 0.3]}
    assert curves["curves"]["val"] == {"step": [10, 20], "loss": [0.4, 0.35]}
    assert curves["best"] == {"step": 20, "epoch": 1}
    target = np.array([1.0, 2.0, 3.0, 4.0])
    assert plots.parity_summary(target, target) == {"count": 4, "mse": 0.0, "mae": 0.0, "r2": 1.0}
    summary = plots.parity_summary(target + [0.5, -0.5, 0.5, -0.5], target)
    assert summary["mse"] == 0.25 and summary["mae"] == 0.5 and summary["r2"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="non-empty and alike"):
        plots.parity_summary(target, target[:2])


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """An N-body run directory (random parameters, synthetic metrics) over 8 test systems."""
    monkeypatch.setenv("SEGNN_DATA_DIR", str(tmp_path / "data"))
    cfg = nbody.validate_config(load_config("test_nbody"))
    cfg["model"]["num_layers"] = 1
    cfg["data"]["data_dir"] = str(tmp_path / "data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(cfg))
    optimizer, _ = make_optimizer(cfg["train"]["optimizer"], total_steps=1, steps_per_epoch=1)
    example = inference.example_graph("nbody", cfg)
    shapes = jax.eval_shape(lambda: init_train_state(nbody.make_model(cfg).init, optimizer,
                                                     jax.random.PRNGKey(0), example))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype)
                         if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype),
                         shapes)
    CheckpointManager(run_dir / "checkpoints").save(state, step=4, best_metric=0.2)
    events = [{"event": "train", "step": 2, "loss": 0.3},
              {"event": "eval", "split": "val", "step": 4, "loss": 0.2},
              {"event": "summary", "best": {"step": 4, "epoch": 0}}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


def test_run_figure_data_predicts_the_split(tiny_run, tmp_path):
    data = plots.run_figure_data(tiny_run, "test")
    assert data["task"] == "nbody" and data["checkpoint_step"] == 4
    assert data["predicted"].shape == data["target"].shape == data["inputs"].shape == (8 * 5, 3)
    test = nbody.load_splits(nbody.validate_config(json.loads(
        (tiny_run / "config.json").read_text())), ("test",), progress=False)["test"]
    np.testing.assert_array_equal(data["target"], test.targets.reshape(-1, 3))
    np.testing.assert_array_equal(data["inputs"], test.positions.reshape(-1, 3))
    assert data["parity"]["count"] == 8 * 5 * 3
    assert data["learning_curves"]["best"]["step"] == 4
    pytest.importorskip("matplotlib")
    assert plots.plot_run(data, tmp_path / "run.png").stat().st_size > 0


def test_plots_write_files_and_missing_matplotlib_is_explained(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    stats = plots.message_statistics(_molecules(), [1.0, 2.0, 3.0])
    assert plots.plot_message_statistics(stats, tmp_path / "m.png").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plots.MissingMatplotlibError, match="pip install"):
        plots.plot_message_statistics(stats, tmp_path / "n.png")


def test_qm9_run_parity_data_is_in_the_target_unit(tmp_path):
    csv_fixture = (Path(__file__).parents[1] / ".." / "shared" / "data" / "qm9"
                   / "qm9pack_part1_first1000.csv")
    if not csv_fixture.is_file():
        pytest.skip(f"QM9 CSV fixture absent: {csv_fixture}")
    from segnn_jax.tasks import qm9

    cfg = qm9.validate_config(load_config("test_qm9"))
    cfg["data"].update(source=str(csv_fixture.resolve()), data_dir=str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(cfg))
    stats = {"target": "alpha", "unit": "a0^3", "mean": 70.0, "mad": 5.0, "atom_reference": False}
    (run_dir / "qm9_standardisation.json").write_text(json.dumps(stats))
    optimizer, _ = make_optimizer(cfg["train"]["optimizer"], total_steps=1, steps_per_epoch=1)
    example = inference.example_graph("qm9", cfg)
    shapes = jax.eval_shape(lambda: init_train_state(qm9.make_model(cfg).init, optimizer,
                                                     jax.random.PRNGKey(0), example))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype)
                         if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype),
                         shapes)
    CheckpointManager(run_dir / "checkpoints").save(state, step=2, best_metric=1.0)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"event": "eval", "split": "val",
                                                       "step": 2, "mae": 3.0}) + "\n")
    data = plots.run_figure_data(run_dir, "test")
    assert data["task"] == "qm9" and data["unit"] == "a0^3" and data["quantity"] == "alpha"
    assert data["predicted"].shape == data["target"].shape == (8,) and "inputs" not in data
    test = qm9.load_splits(cfg, ("test",))["test"]
    # Targets went through float32 standardisation and back: equal to float32 precision.
    np.testing.assert_allclose(data["target"], test.property("alpha"), rtol=1e-6)
    assert data["learning_curves"]["curves"]["val"] == {"step": [2], "mae": [3.0]}
