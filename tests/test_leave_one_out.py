"""experiments/oc20/leave_one_out.py: fold assignment, resumable runs and the choice by validation."""

import json
import subprocess
from pathlib import Path

import pytest

from experiment_scripts import load_experiment

METALS = ["A", "B", "C"]


def _load_script():
    return load_experiment("oc20/leave_one_out.py")


def _fake_fold(run_dir: Path, test: str, valid: str, test_mae: float, valid_mae: float,
               baseline: float) -> None:
    run_dir.mkdir(parents=True)
    results = {
        "groups": {"test": [test], "valid": [valid],
                   "train": [m for m in METALS if m not in (test, valid)]},
        "test": {"mae_ev": test_mae, "ewt": 0.2}, "valid": {"mae_ev": valid_mae, "ewt": 0.3},
        "baselines": {"composition_ridge": {"test": {"mae_ev": baseline},
                                            "valid": {"mae_ev": baseline}},
                      "adsorbate_mean": {"test": {"mae_ev": 2 * baseline},
                                         "valid": {"mae_ev": 2 * baseline}}},
        "n_train": 10, "n_valid": 5, "n_test": 5, "best_epoch": 1, "epochs": 2,
        "wall_time_s": 1.0, "command": "segnn train ...", "git_revision": "abc",
    }
    (run_dir / "results.json").write_text(json.dumps(results))


def test_folds_test_every_metal_once_and_validate_on_the_next():
    module = _load_script()
    assert module.folds(METALS) == [("A", "B"), ("B", "C"), ("C", "A")]
    for bad in (["A", "B"], ["A", "B", "A"]):
        with pytest.raises(ValueError, match="at least 3 distinct groups"):
            module.folds(bad)


def test_collect_chooses_by_mean_validation_not_by_test(tmp_path, capsys):
    module = _load_script()
    runs = tmp_path / "runs"
    # "good_test" is better on test but worse on validation: the validation choice must win.
    for k, (test, valid) in enumerate(module.folds(METALS)):
        _fake_fold(runs / "good_test" / f"test_{test}", test, valid, 0.05, 0.30, 0.10)
        _fake_fold(runs / "good_valid" / f"test_{test}", test, valid, 0.08 + 0.01 * k, 0.10, 0.10)
    _fake_fold(runs / "partial" / "test_A", "A", "B", 0.01, 0.01, 0.10)
    out = tmp_path / "lomo.json"
    code = module.main(["--data", str(tmp_path), "--runs", str(runs), "--metals", *METALS,
                        "--recipe", "good_test=", "--recipe", "good_valid=--config.x=1",
                        "--recipe", "partial=", "--collect-only", "--out", str(out),
                        "--note", "a long note"])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["chosen_by_validation"] == "good_valid"  # "partial" lacks folds B and C
    assert results["note"] == "a long note" and results["command"].endswith("--note ...")
    assert "'good_valid=--config.x=1'" not in results["command"]  # needs no quoting
    assert results["mean_test_mae_ev"] == pytest.approx(0.09)
    assert results["best_baseline"] == "composition_ridge"
    assert results["best_baseline_over_segnn"] == pytest.approx(0.10 / 0.09)
    recipe = results["recipes"]["good_valid"]
    assert recipe["overrides"] == ["--config.x=1"]
    assert recipe["folds_beating_every_baseline"] == 2
    assert results["recipes"]["partial"]["missing_folds"] == ["B", "C"]
    assert "chosen by validation: good_valid" in capsys.readouterr().out


def test_recompute_baselines_replaces_the_recorded_ones(tmp_path, monkeypatch):
    """--recompute-baselines: each fold's baselines come from oc20.run_baselines (fitted again on
    the fold's training split, with the data set read once), not from its results.json."""
    from segnn_jax.tasks import oc20

    module = _load_script()
    runs = tmp_path / "runs"
    for test, valid in module.folds(METALS):
        _fake_fold(runs / "r" / f"test_{test}", test, valid, 0.08, 0.1, 0.10)
        path = runs / "r" / f"test_{test}" / "results.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), data_path="emt")))
    loaded, refitted = [], []
    monkeypatch.setattr(oc20, "load_systems", lambda path: (loaded.append(path) or ["s"], "EMT"))

    def fake_run_baselines(run_dir, *, systems):
        refitted.append((Path(run_dir).name, systems))
        return {"adsorbate_surface_ridge": {"test": {"mae_ev": 0.04}, "valid": {"mae_ev": 0.05}}}

    monkeypatch.setattr(oc20, "run_baselines", fake_run_baselines)
    out = tmp_path / "lomo.json"
    module.main(["--data", "emt", "--runs", str(runs), "--metals", *METALS, "--recipe", "r=",
                 "--collect-only", "--recompute-baselines", "--out", str(out)])
    results = json.loads(out.read_text())
    assert sorted(refitted) == [(f"test_{m}", ["s"]) for m in METALS] and loaded == ["emt"]
    assert results["best_baseline"] == "adsorbate_surface_ridge"
    assert results["best_baseline_over_segnn"] == pytest.approx(0.04 / 0.08)


def test_runs_only_the_missing_folds_with_the_fold_groups(tmp_path, monkeypatch):
    module = _load_script()
    runs = tmp_path / "runs"
    _fake_fold(runs / "r" / "test_A", "A", "B", 0.1, 0.1, 0.1)
    commands = []

    def fake_run(command, stdout, stderr, check):
        commands.append(command)
        test = next(a for a in command if a.startswith("--config.data.test_groups="))[-1]
        valid = next(a for a in command if a.startswith("--config.data.valid_groups="))[-1]
        _fake_fold(Path(command[command.index("--run-dir") + 1]), test, valid, 0.1, 0.1, 0.1)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    module.run_missing("cfg", tmp_path, runs, {"r": ["--config.train.seed=3"]}, METALS)
    assert len(commands) == 2  # fold A was finished already
    assert "--config.data.test_groups=B" in commands[0]
    assert "--config.data.valid_groups=C" in commands[0]
    assert "--config.train.seed=3" in commands[0] and "--config.data.split=ood_cat" in commands[0]
    assert (runs / "r" / "test_C" / "results.json").is_file()


def test_leave_one_adsorbate_out_folds_over_the_adsorbates(tmp_path, monkeypatch):
    module = _load_script()
    commands = []

    def fake_run(command, stdout, stderr, check):
        commands.append(command)
        test = next(a for a in command if a.startswith("--config.data.test_groups="))
        valid = next(a for a in command if a.startswith("--config.data.valid_groups="))
        _fake_fold(Path(command[command.index("--run-dir") + 1]), test.split("=")[1],
                   valid.split("=")[1], 0.1, 0.1, 0.2)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    out = tmp_path / "loao.json"
    assert module.main(["--split", "ood_ads", "--data", str(tmp_path), "--runs",
                        str(tmp_path / "runs"), "--out", str(out)]) == 0
    adsorbates = list(module.ADSORBATES)
    assert len(commands) == len(adsorbates) == 11
    assert all("--config.data.split=ood_ads" in c for c in commands)
    assert [c for c in commands[0] if "_groups=" in c] == [
        f"--config.data.test_groups={adsorbates[0]}", f"--config.data.valid_groups={adsorbates[1]}"]
    results = json.loads(out.read_text())
    assert results["task"] == "oc20_is2re_emt_leave_one_adsorbate_out"
    assert results["split"] == "ood_ads" and len(results["folds"]) == 11
    assert results["best_baseline_over_segnn"] == pytest.approx(2.0)
