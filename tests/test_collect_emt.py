"""experiments/oc20/collect_emt.py: the OC20-EMT results file from finished run directories."""

import json
from pathlib import Path

import pytest

from experiment_scripts import load_experiment

pytest.importorskip("matplotlib")


def _load_script():
    return load_experiment("oc20/collect_emt.py")


def _fake_run(run_dir: Path, split: str, segnn_mae: float, baselines: dict) -> None:
    run_dir.mkdir(parents=True)
    metric = {"mae_ev": segnn_mae, "ewt": 0.5, "count": 10}
    results = {
        "split": split, "test": metric, "valid": metric, "n_train": 80, "n_valid": 10,
        "n_test": 10, "groups": None, "best_epoch": 2, "epochs": 2, "num_parameters": 100,
        "standardisation": {}, "wall_time_s": 1.0, "command": "segnn train ...",
        "git_revision": "abc",
        "baselines": {name: {"test": {"mae_ev": mae, "ewt": 0.1},
                             "valid": {"mae_ev": mae, "ewt": 0.1}}
                      for name, mae in baselines.items()},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "config.json").write_text(json.dumps({"data": {"energy_reference": "adsorbate"},
                                                     "embedding": {}}))
    events = [{"event": "train", "step": 5 * (e + 1), "epoch": e, "mae": 0.3} for e in range(2)]
    events += [{"event": "eval", "split": s, "epoch": e, "mae": 0.2} for e in range(2)
               for s in ("val", "test")]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")


def test_collects_the_splits_and_names_the_strongest_baseline(tmp_path, capsys):
    baselines = {"composition_ridge": 0.2, "adsorbate_composition_ridge": 0.08,
                 "adsorbate_mean": 0.1, "train_mean": 0.4}
    for split in ("id", "ood_ads"):
        _fake_run(tmp_path / "runs" / f"{split}_x", split, 0.04, baselines)
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "oc20_emt.json"
    code = _load_script().main(["--runs", str(tmp_path / "runs"), "--suffix", "_x",
                                "--data", str(data), "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["missing"] == ["ood_cat"] and set(results["splits"]) == {"id", "ood_ads"}
    summary = results["splits"]["ood_ads"]
    assert summary["best_baseline"] == "adsorbate_composition_ridge"
    assert summary["best_baseline_over_segnn"] == pytest.approx(2.0)
    assert summary["energy_reference"] == "adsorbate"
    assert (tmp_path / "oc20_emt.png").is_file()
    assert "(2.00x SEGNN)" in capsys.readouterr().out


def test_no_finished_run_is_an_error(tmp_path):
    (tmp_path / "runs").mkdir()
    assert _load_script().main(["--runs", str(tmp_path / "runs"), "--data", str(tmp_path),
                                "--out", str(tmp_path / "x.json")]) == 1


def test_ensemble_summary_reports_both_splits_next_to_the_baselines(tmp_path):
    baselines = {"composition_ridge": 0.2, "adsorbate_composition_ridge": 0.08,
                 "adsorbate_mean": 0.1, "train_mean": 0.4}
    runs = [tmp_path / f"seed{k}" for k in range(2)]
    for run in runs:
        _fake_run(run, "ood_cat", 0.05, baselines)
    calls = []

    def evaluate(run_dirs, split):
        calls.append((list(run_dirs), split))
        mae = {"valid": 0.03, "test": 0.04}[split]
        return {"mae_ev": mae, "ewt": 0.5, "count": 10, "member_mae_ev": [0.05, 0.06],
                "member_ewt": [0.4, 0.3]}

    summary = _load_script().ensemble_summary("x2", runs, evaluate=evaluate)
    assert calls == [(runs, "valid"), (runs, "test")]
    assert summary["mae_ev"] == 0.04 and summary["valid"]["mae_ev"] == 0.03
    assert summary["test"]["member_mae_ev"] == [0.05, 0.06]
    assert summary["best_baseline"] == "adsorbate_composition_ridge"
    assert summary["best_baseline_over_segnn"] == pytest.approx(2.0)
    assert summary["ridge_over_segnn"] == pytest.approx(5.0)


def test_malformed_ensemble_argument_is_refused(tmp_path):
    _fake_run(tmp_path / "runs" / "id", "id", 0.04, {"composition_ridge": 0.2,
                                                      "adsorbate_mean": 0.1})
    with pytest.raises(SystemExit):
        _load_script().main(["--runs", str(tmp_path / "runs"), "--data", str(tmp_path),
                             "--out", str(tmp_path / "x.json"), "--ensembles", "no_members"])


def test_group_lines_name_the_best_baseline_of_each_group():
    def figures(bias, mae, after):
        return {"count": 5, "bias_ev": bias, "mae_ev": mae, "mae_after_bias_ev": after}

    split = {"segnn": {"H": figures(-0.07, 0.07, 0.02), "O": figures(0.01, 0.04, 0.04)},
             "composition_ridge": {"H": figures(-0.3, 0.3, 0.05), "O": figures(0.0, 0.03, 0.03)},
             "adsorbate_mean": {"H": figures(0.1, 0.1, 0.06), "O": figures(0.2, 0.2, 0.1)}}
    lines = _load_script()._group_lines("ood_ads", {"group_by": "adsorbate", "valid": split,
                                                    "test": split})
    assert len(lines) == 4 and lines[0].startswith("ood_ads valid H: SEGNN bias -0.070")
    assert "| adsorbate_mean bias +0.100 MAE 0.100" in lines[0]
    assert "| composition_ridge bias +0.000 MAE 0.030" in lines[1]
    assert _load_script()._group_lines("x", None) == []
