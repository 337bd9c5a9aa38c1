"""experiments/nbody/error_profile.py: per-system errors, bootstrap intervals and paired comparisons
of trained N-body runs."""

import json
import shutil

import numpy as np
import pytest

from experiment_scripts import load_experiment


@pytest.fixture(scope="module")
def script():
    return load_experiment("nbody/error_profile.py")


def test_profile_of_one_outlier_by_hand(script):
    errors = np.array([1.0] * 99 + [101.0])  # mean 2; the outlier holds half of the total
    resampled = np.array([1.0, 2.0, 3.0, 4.0])
    p = script.profile(errors, resampled, reference=2.0)
    assert p["mse"] == pytest.approx(2.0)
    assert p["median_system_mse"] == 1.0
    assert p["worst_1pct_share"] == pytest.approx(101 / 200)
    assert p["worst_5pct_share"] == pytest.approx((101 + 4) / 200)
    assert p["mse_without_worst_1pct"] == pytest.approx(1.0)
    assert p["n_systems"] == 100
    assert p["fraction_at_or_below_reference"] == 0.5
    assert p["ci95"] == pytest.approx(list(np.percentile(resampled, [2.5, 97.5])))
    perfect = script.profile(np.zeros(10), np.zeros(4))
    assert perfect["mse"] == 0 and perfect["worst_1pct_share"] == perfect["worst_5pct_share"] == 0


def test_bootstrap_draws_are_shared_by_rows_seeded_and_of_the_right_spread(script):
    rng = np.random.default_rng(1)
    values = rng.normal(5.0, 2.0, size=400)
    rows = np.stack([values, values + 0.25, np.full(400, 3.0)])
    means = script.bootstrap_means(rows, 1200, seed=7)  # more than one chunk of draws
    assert means.shape == (1200, 3)
    # The same systems are drawn for every row: a shifted row moves every resample by the shift.
    np.testing.assert_allclose(means[:, 1] - means[:, 0], 0.25, atol=1e-12)
    np.testing.assert_allclose(means[:, 2], 3.0)
    np.testing.assert_array_equal(means, script.bootstrap_means(rows, 1200, seed=7))
    assert not np.array_equal(means, script.bootstrap_means(rows, 1200, seed=8))
    # The spread of resampled means is the standard error of the mean, std / sqrt(S).
    assert np.std(means[:, 0]) == pytest.approx(np.std(values) / np.sqrt(400), rel=0.1)


def test_runs_reproduce_their_recorded_mse_and_are_compared_pairwise(script, tiny_nbody_runs,
                                                                     tmp_path, capsys):
    out = tmp_path / "profile.json"
    first, second = map(str, tiny_nbody_runs)
    assert script.main([first, second, "--reference", "0.05", "--resamples", "300",
                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for run_dir in tiny_nbody_runs:
        recorded = json.loads((run_dir / "results.json").read_text())
        p = result["runs"][str(run_dir)]
        assert p["mse"] == pytest.approx(recorded["test_mse"], rel=1e-5)
        assert p["ci95"][0] <= p["mse"] <= p["ci95"][1]
        assert 0 < p["worst_1pct_share"] <= p["worst_5pct_share"] <= 1
        assert 0 <= p["fraction_at_or_below_reference"] <= 1
        for name, mse in recorded["baselines"]["test"].items():
            assert result["baselines"][name]["mse"] == pytest.approx(mse, rel=1e-6)
    paired = result["paired_with_first"][second]
    assert paired["versus"] == first
    assert paired["mse_difference"] == pytest.approx(
        result["runs"][second]["mse"] - result["runs"][first]["mse"])
    assert paired["ci95"][0] <= paired["mse_difference"] <= paired["ci95"][1]
    assert 0 <= paired["fraction_better"] <= 1
    assert result["resamples"] == 300 and "error_profile.py" in result["command"]
    printed = capsys.readouterr().out
    assert "constant_velocity: MSE" in printed and f"{second} - {first}" in printed


def test_bad_requests_are_refused(script, tiny_nbody_runs, tmp_path, capsys):
    first = str(tiny_nbody_runs[0])
    with pytest.raises(ValueError, match="split must be one of"):
        script.error_profile([first], split="train")
    with pytest.raises(ValueError, match="at least 100"):
        script.error_profile([first], resamples=10)
    assert script.main([first, first]) == 1
    assert "more than once" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(tiny_nbody_runs[1], other)
    config = json.loads((other / "config.json").read_text())
    config["data"]["input_frame"] -= 1
    (other / "config.json").write_text(json.dumps(config))
    assert script.main([first, str(other)]) == 1
    assert "data.input_frame differ" in capsys.readouterr().err
    assert script.main([str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
