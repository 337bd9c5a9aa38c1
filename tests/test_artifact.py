"""Portable trained models (segnn_jax.artifact): export a run, reload it, identical predictions;
incompatible, tampered, truncated and foreign files refused with a message naming the file."""

import io
import json
import zipfile

import jax
import numpy as np
import pytest

import segnn_jax
from segnn_jax import artifact, cli
from segnn_jax.configs import load_config
from segnn_jax.tasks import inference, nbody, qm9
from segnn_jax.training import CheckpointManager, make_optimizer
from segnn_jax.training.step import init_train_state


def _random_like(tree, seed):
    """Arrays of the shapes and dtypes of ``tree`` (e.g. from jax.eval_shape): normal floats,
    zero integers. Cheaper than initialising the model, which compiles or runs eagerly."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype)
                        if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype),
                        tree)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny N-body run directory with one checkpoint of random parameters (no training: the
    export path only needs config.json and a best checkpoint)."""
    path = tmp_path_factory.mktemp("run")
    cfg = nbody.validate_config(load_config("test_nbody"))
    cfg["model"]["num_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    optimizer, _ = make_optimizer(cfg["train"]["optimizer"], total_steps=1, steps_per_epoch=1)
    example = inference.example_graph("nbody", cfg)
    state = _random_like(jax.eval_shape(lambda: init_train_state(
        nbody.make_model(cfg).init, optimizer, jax.random.PRNGKey(3), example)), seed=0)
    CheckpointManager(path / "checkpoints").save(state, step=7, best_metric=0.5)
    return path


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact") / "model.segnn"
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(exported):
    """The exported model, loaded once (its jitted forward compiles once per shape)."""
    return segnn_jax.load_artifact(exported)


def _members(path):
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _rewrite(path, out, **replacements):
    members = _members(path)
    members.update(replacements)
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out


def test_loaded_model_predicts_bit_identically_to_the_run(run_dir, loaded):
    cfg = nbody.validate_config(json.loads((run_dir / "config.json").read_text()))
    example = inference.example_graph("nbody", cfg)
    params, model_state, step = nbody.restore_params(cfg, run_dir, example)  # the task's path
    # Parameters as arguments, as the run's evaluation step takes them (closed over, XLA may fold
    # them into constants and round differently).
    expected = np.asarray(jax.jit(lambda p, s, g: nbody.make_model(cfg).apply(
        p, s, None, g, False)[0])(params, model_state, example))

    model = loaded
    assert model.task == "nbody" and model.info["checkpoint_step"] == step == 7
    assert model.info["artifact_library_version"] == segnn_jax.__version__
    assert jax.tree.structure(model.params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(model.apply(example), expected)

    graphs = segnn_jax.unbatch_graphs(segnn_jax.unpad_graph(example))
    (positions,) = model.predict_graphs(graphs)
    assert positions.shape == (5, 3)
    np.testing.assert_array_equal(positions, expected[:5].astype(np.float64))


def test_side_files_round_trip_and_give_physical_units(tmp_path):
    cfg = qm9.validate_config(load_config("test_qm9"))
    example = inference.example_graph("qm9", cfg)
    params, state = _random_like(jax.eval_shape(qm9.make_model(cfg).init, jax.random.PRNGKey(0),
                                                example), seed=1)
    stats = {"target": "alpha", "unit": "a0^3", "mean": 75.0, "mad": 6.5, "atom_reference": False}
    model = artifact.TrainedModel("qm9", cfg, params, state,
                                  side_files={"qm9_standardisation.json": stats})
    loaded = artifact.load_artifact(model.save(tmp_path / "qm9.segnn"))
    assert loaded.side_files == {"qm9_standardisation.json": stats}
    assert loaded.config == model.config
    raw = loaded.apply(example)
    (value,) = loaded.predict_graphs([segnn_jax.unpad_graph(example)])
    assert value == pytest.approx(float(raw[0]) * 6.5 + 75.0, rel=1e-12)


@pytest.mark.parametrize("header_change, error, message", [
    ({"library_version": "1.0.0"}, artifact.IncompatibleArtifactError,
     "written by segnn_jax 1.0.0, incompatible"),
    ({"format_version": artifact.ARTIFACT_FORMAT_VERSION + 1}, artifact.IncompatibleArtifactError,
     "newer than this library reads"),
    ({"format": "something.else"}, artifact.ArtifactError, "not a segnn artifact"),
])
def test_incompatible_versions_are_refused(exported, tmp_path, header_change, error, message):
    header = json.loads(_members(exported)["segnn_artifact.json"])
    header.update(header_change)
    bad = _rewrite(exported, tmp_path / "bad.segnn", **{"segnn_artifact.json": json.dumps(header)})
    with pytest.raises(error, match=message) as info:
        artifact.load_artifact(bad)
    assert str(bad) in str(info.value)


def test_version_compatibility_rule():
    assert artifact._compatible("0.1.0", "0.1.7") and artifact._compatible("1.2.0", "1.9.1")
    assert not artifact._compatible("0.1.0", "0.2.0") and not artifact._compatible("1.0", "2.0")
    assert not artifact._compatible("unknown", "0.1.0")


def test_tampered_members_fail_their_checksum(exported, tmp_path):
    members = _members(exported)
    arrays = bytearray(members["arrays.npz"])
    arrays[-200] ^= 0x01  # one bit of one parameter
    bad = _rewrite(exported, tmp_path / "bits.segnn", **{"arrays.npz": bytes(arrays)})
    with pytest.raises(artifact.ArtifactError, match="arrays.npz does not match its SHA-256"):
        artifact.load_artifact(bad)

    description = json.loads(members["model.json"])
    description["config"]["model"]["num_layers"] = 3
    bad = _rewrite(exported, tmp_path / "config.segnn", **{"model.json": json.dumps(description)})
    with pytest.raises(artifact.ArtifactError, match="model.json does not match its SHA-256"):
        artifact.load_artifact(bad)


def test_truncated_and_foreign_files_are_refused(exported, tmp_path, capsys):
    data = exported.read_bytes()
    truncated = tmp_path / "truncated.segnn"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(artifact.ArtifactError, match="truncated or corrupt") as info:
        artifact.load_artifact(truncated)
    assert str(truncated) in str(info.value)

    text = tmp_path / "notes.segnn"
    text.write_text("not a model")
    with pytest.raises(artifact.ArtifactError, match="not a segnn artifact"):
        artifact.load_artifact(text)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("other.txt", "x")
    (tmp_path / "other.zip").write_bytes(buffer.getvalue())
    with pytest.raises(artifact.ArtifactError, match="missing segnn_artifact.json"):
        artifact.load_artifact(tmp_path / "other.zip")
    with pytest.raises(FileNotFoundError, match="no such artifact"):
        artifact.load_artifact(tmp_path / "absent.segnn")

    assert cli.main(["export", str(tmp_path / "no_run"), str(tmp_path / "x.segnn")]) == 1
    assert "is not a run directory" in capsys.readouterr().err


def test_jax_export_runs_the_same_forward_without_the_library(loaded):
    pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")
    model = loaded
    example = inference.example_graph("nbody", model.config)
    forward = jax.export.deserialize(bytearray(model.export_inference(example)))
    np.testing.assert_allclose(np.asarray(forward.call(*jax.tree.leaves(example))),
                               model.apply(example), rtol=1e-6, atol=1e-6)
    with pytest.raises((TypeError, ValueError)):  # other shapes are refused, not silently padded
        forward.call(*jax.tree.leaves(segnn_jax.unpad_graph(example)))


def test_predict_from_the_artifact_equals_predict_from_the_run(run_dir, exported, tmp_path,
                                                              capsys):
    rng = np.random.default_rng(5)
    systems = tmp_path / "systems.npz"
    np.savez(systems, positions=rng.normal(size=(3, 5, 3)), velocities=rng.normal(size=(3, 5, 3)),
             charges=rng.choice([-1.0, 1.0], size=(3, 5)))
    assert cli.main(["predict", str(run_dir), str(systems), "-o", str(tmp_path / "a.npz")]) == 0
    assert cli.main(["predict", str(exported), str(systems), "-o", str(tmp_path / "b.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["positions"].shape == (3, 5, 3)
        np.testing.assert_array_equal(a["positions"], b["positions"])
    with pytest.raises(artifact.ArtifactError, match="a model of the nbody task, not of qm9"):
        qm9.predict(exported, tmp_path / "molecule.xyz")


def _random_run(path, cfg, init_fn, example, *, seed, side_files=None):
    """A run directory of ``cfg`` with one checkpoint of random parameters and its side files."""
    (path / "config.json").write_text(json.dumps(cfg))
    for name, text in (side_files or {}).items():
        (path / name).write_text(text)
    train = cfg["train"]
    optimizer, _ = make_optimizer(train["optimizer"], total_steps=max(int(train["num_epochs"]), 1),
                                  steps_per_epoch=1)
    state = _random_like(jax.eval_shape(lambda: init_train_state(
        init_fn, optimizer, jax.random.PRNGKey(0), example,
        ema=train["ema_decay"] is not None)), seed=seed)
    CheckpointManager(path / "checkpoints").save(state, step=3, best_metric=0.5)
    return path


@pytest.fixture(scope="module")
def potential_run(tmp_path_factory):
    """A tiny potential run (random parameters) and its artifact written by ``segnn export``."""
    from segnn_jax import potential as pot
    from segnn_jax.tasks import potential

    cfg = potential.validate_config(load_config("test_potential"))
    spec = pot.PotentialSpec(model=cfg["model"], cutoff=cfg["data"]["cutoff"],
                             embedding_dim=cfg["potential"]["embedding_dim"],
                             num_radial=cfg["potential"]["num_radial"], avg_num_neighbors=6.0,
                             energy_scale=0.7, element_energies={29: -0.25})
    run = _random_run(tmp_path_factory.mktemp("potential_run"), cfg,
                      pot.make_potential(spec).init, potential.example_graph(spec.cutoff),
                      seed=2, side_files={"potential_spec.json": spec.dumps()})
    out = tmp_path_factory.mktemp("potential_artifact") / "potential.segnn"
    assert cli.main(["export", str(run), str(out)]) == 0
    return run, out


def _copper(seed):
    from ase.build import bulk

    atoms = bulk("Cu", cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_potential_artifact_in_the_ase_calculator_equals_the_run(potential_run, exported):
    from segnn_jax.ase_calculator import SEGNNCalculator
    from segnn_jax.tasks import potential

    run, path = potential_run
    model = segnn_jax.load_artifact(path)
    assert model.task == "potential" and model.info["checkpoint_step"] == 3
    assert set(model.side_files) == {"potential_spec.json"}
    atoms = _copper(seed=1)
    results = []
    for source in (run, path):
        atoms.calc = SEGNNCalculator.load(source)
        results.append((atoms.get_potential_energy(), atoms.get_forces()))
    (e_run, f_run), (e_artifact, f_artifact) = results
    assert np.isfinite(e_run) and np.abs(f_run).max() > 0
    assert e_artifact == e_run
    np.testing.assert_array_equal(f_artifact, f_run)

    with pytest.raises(artifact.ArtifactError, match="a model of the nbody task, not of potential"):
        SEGNNCalculator.load(exported)
    with pytest.raises(TypeError, match="no generic forward"):
        model.apply(potential.example_graph())


@pytest.mark.slow  # two more compilations of the potential's forces
def test_potential_predict_from_the_artifact_equals_predict_from_the_run(potential_run, tmp_path):
    from ase.io import read, write

    run, path = potential_run
    write(tmp_path / "in.extxyz", [_copper(seed=2), _copper(seed=3)])
    for source, name in ((run, "a.extxyz"), (path, "b.extxyz")):
        assert cli.main(["predict", str(source), str(tmp_path / "in.extxyz"),
                         "-o", str(tmp_path / name)]) == 0
    a, b = (read(str(tmp_path / name), index=":") for name in ("a.extxyz", "b.extxyz"))
    assert len(a) == len(b) == 2
    assert a[0].get_potential_energy() != a[1].get_potential_energy()
    for x, y in zip(a, b):
        assert x.get_potential_energy() == y.get_potential_energy()
        np.testing.assert_array_equal(x.get_forces(), y.get_forces())


def test_oc20_predict_from_the_artifact_equals_predict_from_the_run(tmp_path):
    import ase.io
    from ase.build import add_adsorbate, fcc111

    from segnn_jax.tasks import oc20

    cfg = oc20.validate_config(load_config("test_oc20"))
    stats = {"mean": -1.0, "std": 0.5, "elements": [8, 29], "level_of_theory": "EMT",
             "element_energies": [-0.4, -0.1]}  # with a reference: predict must add it back
    (tmp_path / "run").mkdir()
    run = _random_run(tmp_path / "run", cfg, oc20.make_model(cfg).init,
                      inference.example_graph("oc20", cfg), seed=3,
                      side_files={"oc20_standardisation.json": json.dumps(stats)})
    exported = tmp_path / "oc20.segnn"
    assert cli.main(["export", str(run), str(exported)]) == 0
    structures = []
    for site in ("fcc", "ontop"):
        atoms = fcc111("Cu", size=(2, 2, 2), vacuum=6.0)
        add_adsorbate(atoms, "O", 1.5, site)
        del atoms.info["adsorbate_info"]  # not extxyz-writable
        atoms.pbc = True
        structures.append(atoms)
    ase.io.write(tmp_path / "new.extxyz", structures)
    for source, name in ((run, "a.csv"), (exported, "b.csv")):
        assert cli.main(["predict", str(source), str(tmp_path / "new.extxyz"),
                         "-o", str(tmp_path / name)]) == 0
    a, b = ((tmp_path / name).read_text() for name in ("a.csv", "b.csv"))
    rows = a.splitlines()
    assert len(rows) == 3 and rows[1] != rows[2] and "EMT" in rows[1]
    assert a == b
