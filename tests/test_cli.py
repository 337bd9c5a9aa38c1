"""The ``segnn`` command (segnn_jax.cli): overrides, early config errors, train/evaluate/predict."""

import json

import ml_collections
import numpy as np
import pytest

from segnn_jax import cli
from segnn_jax.configs import list_configs, load_config
from segnn_jax.datasets import nbody as nbody_data
from segnn_jax.tasks import TASKS, get_task, nbody
from segnn_jax.training import ConfigError


def _config():
    return ml_collections.ConfigDict({
        "a": {"n": 3, "x": 0.5, "flag": True, "name": "segnn", "opt": None, "seq": (0.8, 0.9)},
    })


def test_overrides_are_parsed_with_the_type_of_the_default():
    overrides = cli.parse_overrides(["--config.a.n=7", "--config.a.x", "2", "--config.a.flag=false",
                                     "--config.a.name=seconv_linear", "--config.a.opt=0.999",
                                     "--config.a.seq=0.5,0.75"])
    config = cli.apply_overrides(_config(), overrides)
    assert config.a.to_dict() == {"n": 7, "x": 2.0, "flag": False, "name": "seconv_linear",
                                  "opt": 0.999, "seq": (0.5, 0.75)}
    assert isinstance(config.a.x, float)
    assert cli.apply_overrides(_config(), [("a.seq", "()")]).a.seq == ()


@pytest.mark.parametrize("args, message", [
    (["--config.a.nn=1"], r"config\.a\.nn: unknown option; did you mean config\.a\.n\?"),
    (["--config.b.n=1"], r"config\.b: unknown option"),
    (["--config.a.n=1.5"], r"config\.a\.n: expected an integer"),
    (["--config.a.flag=maybe"], r"config\.a\.flag: expected true or false"),
    (["--config.a=1"], r"config\.a: is a section"),
    (["--config.a.n.k=1"], r"config\.a\.n: is a value"),
    (["--config.a.n"], r"config\.a\.n: no value given"),
    (["--epochs=3"], r"unexpected argument '--epochs=3'"),
])
def test_bad_overrides_name_the_option(args, message):
    with pytest.raises(ConfigError, match=message):
        cli.apply_overrides(_config(), cli.parse_overrides(args))


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the command reaches data generation or training (i.e. compilation)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("reached data loading or training before the config was rejected")

    monkeypatch.setattr(nbody.nbody_data, "load_nbody", forbidden)
    monkeypatch.setattr(nbody.training, "fit", forbidden)


@pytest.mark.parametrize("override, message", [
    ("--config.train.num_epoch=3",
     "config.train.num_epoch: unknown option; did you mean config.train.num_epochs?"),
    ("--config.batch.batch_size=-5", "config.batch.batch_size: expected a positive integer"),
    ("--config.model.name=egnn", "config.model.name: expected one of"),
    ("--config.train.optimizer.learning_rate=-1", "config.train.optimizer.learning_rate"),
])
def test_bad_config_fails_at_start_naming_the_option(tmp_path, capsys, no_work, override, message):
    run_dir = tmp_path / "run"
    code = cli.main(["train", "test_nbody", override, "--run-dir", str(run_dir)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_unknown_config_and_missing_run_directory(tmp_path, capsys):
    assert cli.main(["train", "no_such_config"]) == 2
    assert "unknown config 'no_such_config'" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path)]) == 1
    assert "is not a run directory" in capsys.readouterr().err


def test_list_shows_every_task_and_config(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list(TASKS) + list_configs():
        assert name in out
    assert {"nbody_charged", "nbody_gravity", "test_nbody"} <= set(list_configs())
    for name in list_configs():
        get_task(load_config(name).task).validate_config(load_config(name))


def test_paper_protocol_is_one_override():
    config = cli.apply_overrides(load_config("nbody_charged"),
                                 cli.parse_overrides(["--config.train.num_epochs=1000"]))
    cfg = nbody.validate_config(config)
    assert cfg["train"]["num_epochs"] == 1000
    assert (cfg["data"]["n_train"], cfg["data"]["n_valid"], cfg["data"]["n_test"]) == \
        (3000, 2000, 2000)
    assert cfg["batch"]["batch_size"] == 100 and cfg["train"]["eval_every"] == 5
    assert cfg["train"]["optimizer"]["learning_rate"] == 5e-4
    assert cfg["train"]["optimizer"]["weight_decay"] == 1e-12
    assert cfg["model"]["num_layers"] == 4 and cfg["model"]["hidden_features"] == 64


def test_train_evaluate_predict_end_to_end(tmp_path, capsys):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    code = cli.main(["train", "test_nbody", f"--config.data.data_dir={data_dir}",
                     "--config.train.num_epochs=1", "--run-dir", str(run_dir)])
    assert code == 0
    out = capsys.readouterr().out
    assert "trivial baseline, constant velocity" in out
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test_mse", "val_mse", "best_epoch", "epochs", "n_train", "wall_time_s", "command",
                "git_revision", "baselines"):
        assert key in results, key
    assert results["n_train"] == 16 and results["epochs"] == 1 and results["best_epoch"] == 1
    assert results["n_train_samples"] == 16 and results["train_input_frames"] is None
    assert np.isfinite(results["test_mse"])
    for name in ("config.json", "metrics.jsonl", "learning_curves.png", "run_info.json"):
        assert (run_dir / name).is_file(), name

    assert cli.main(["evaluate", str(run_dir), "--split", "test"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(evaluated["mse"], results["test_mse"], rtol=1e-5)
    assert evaluated["count"] == 3 * 5 * 8

    test = nbody_data.load_nbody("charged", "test", 3, data_dir, progress=False)
    systems = tmp_path / "systems.npz"
    np.savez(systems, positions=test.positions, velocities=test.velocities, charges=test.charges)
    assert cli.main(["predict", str(run_dir), str(systems), "-o", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as f:
        predicted = f["positions"]
    assert predicted.shape == (3, 5, 3) and np.all(np.isfinite(predicted))

    np.savez(systems, positions=test.positions, velocities=test.velocities)
    assert cli.main(["predict", str(run_dir), str(systems)]) == 1
    assert "missing array 'charges'" in capsys.readouterr().err
