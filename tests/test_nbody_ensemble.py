"""experiments/nbody/ensemble.py: member and ensemble MSE of trained N-body runs."""

import json
import shutil

import numpy as np
import pytest

from segnn_jax.tasks import nbody

from experiment_scripts import load_experiment


def _load_script():
    return load_experiment("nbody/ensemble.py")


@pytest.fixture
def two_runs(tiny_nbody_runs):
    return tiny_nbody_runs


def test_members_reproduce_their_runs_and_the_ensemble_averages_positions(two_runs, tmp_path):
    module = _load_script()
    out = tmp_path / "ensemble.json"
    assert module.main([str(r) for r in two_runs] + ["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for i, run_dir in enumerate(two_runs):
        recorded = json.loads((run_dir / "results.json").read_text())
        np.testing.assert_allclose(result["splits"]["test"]["members_mse"][i],
                                   recorded["test_mse"], rtol=1e-5)
        np.testing.assert_allclose(result["splits"]["valid"]["members_mse"][i],
                                   recorded["val_mse"], rtol=1e-5)
    test = nbody.load_splits(json.loads((two_runs[0] / "config.json").read_text()),
                             ("test",), progress=False)["test"]
    mean = np.mean([nbody.predict_positions(r, test) for r in two_runs], axis=0)
    expected = np.mean((mean.astype(np.float64) - test.targets) ** 2)
    np.testing.assert_allclose(result["splits"]["test"]["ensemble_mse"], expected, rtol=1e-6)
    members = result["splits"]["test"]["members_mse"]
    assert members[0] != members[1]
    # The MSE of a mean is at most the mean of the MSEs (convexity).
    assert result["splits"]["test"]["ensemble_mse"] <= np.mean(members)
    assert result["splits"]["test"]["count"] == test.targets.size
    assert "ensemble.py" in result["command"]


def test_runs_on_other_test_data_or_a_single_run_are_refused(two_runs, tmp_path, capsys):
    module = _load_script()
    other = tmp_path / "other"
    shutil.copytree(two_runs[1], other)
    config = json.loads((other / "config.json").read_text())
    config["data"]["n_test"] += 1
    (other / "config.json").write_text(json.dumps(config))
    assert module.main([str(two_runs[0]), str(other)]) == 1
    assert "data.n_test differ" in capsys.readouterr().err
    assert module.main([str(two_runs[0])]) == 1
    assert "at least 2 runs" in capsys.readouterr().err
    assert module.main([str(two_runs[0]), str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
