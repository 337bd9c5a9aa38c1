r"""Leave-one-group-out evaluation of OOD-cat (metals) or OOD-ads (adsorbates) on the EMT stand-in
(EMT, not DFT).

One held-out metal is a single draw from a space of seven: with one validation metal it cannot tell
recipes apart (benchmarks/results/oc20_emt.json, ``ensembles``: Au and Pt rank three embeddings in
opposite orders); two held-out adsorbates of eleven are hardly better. Here every group is the
test group once. With ``--split ood_cat`` (the default) fold ``k`` tests on metal ``k`` of
``segnn_jax.datasets.emt.METALS``, validates on the next one (cyclically) and trains on the other
five; ``--split ood_ads`` does the same over ``segnn_jax.datasets.emt.ADSORBATES`` (``--groups``
names other groups). Each recipe (a set of config overrides) is trained on every fold, the recipe
is chosen by its MEAN VALIDATION MAE over the folds, and the chosen recipe's mean test MAE is
reported next to the baselines' (fitted per fold on the same training groups)::

    python experiments/oc20/leave_one_out.py --data data/emt20k --runs runs/oc20_lomo \
        --recipe lookup= \
        --recipe lookup_descriptors="--config.embedding.element_features=true" \
        --out benchmarks/results/oc20_emt_lomo.json
    python experiments/oc20/leave_one_out.py --split ood_ads --data data/emt20k \
        --runs runs/oc20_loao --out benchmarks/results/oc20_emt_loao.json

Runs go to ``RUNS/<recipe>/test_<group>`` through ``segnn train`` (one process per fold); a fold
whose run directory already holds ``results.json`` is not run again and an interrupted one resumes
from its checkpoint, so the command can be repeated until every fold is done. ``--collect-only``
writes the JSON from the finished folds without training. ``--recompute-baselines`` fits every
baseline of the current code again on each fold's training split
(:func:`segnn_jax.tasks.oc20.run_baselines`) instead of reading those the fold's run recorded.
"""

import argparse
import functools
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from segnn_jax.datasets.emt import ADSORBATES, METALS

#: The groups of each split's folds, and what the results file calls the study.
GROUPS = {"ood_cat": list(METALS), "ood_ads": list(ADSORBATES)}
TASKS = {"ood_cat": "oc20_is2re_emt_leave_one_metal_out",
         "ood_ads": "oc20_is2re_emt_leave_one_adsorbate_out"}


def folds(groups: Sequence[str]) -> List[Tuple[str, str]]:
    """``(test group, validation group)`` per fold: each group is tested once, validated on the
    next one."""
    if len(groups) < 3 or len(set(groups)) < len(groups):
        raise ValueError(f"need at least 3 distinct groups, got {list(groups)}")
    return [(group, groups[(k + 1) % len(groups)]) for k, group in enumerate(groups)]


def train_command(config: str, data: Path, test: str, valid: str, overrides: Sequence[str],
                  run_dir: Path, split: str = "ood_cat") -> List[str]:
    return [sys.executable, "-m", "segnn_jax.cli", "train", config,
            f"--config.data.path={data}", f"--config.data.split={split}",
            f"--config.data.test_groups={test}", f"--config.data.valid_groups={valid}",
            *overrides, "--run-dir", str(run_dir)]


def run_missing(config: str, data: Path, runs: Path, recipes: Dict[str, List[str]],
                groups: Sequence[str], split: str = "ood_cat") -> None:
    """Trains every (recipe, fold) whose run directory has no ``results.json`` yet."""
    for name, overrides in recipes.items():
        for test, valid in folds(groups):
            run_dir = runs / name / f"test_{test}"
            if (run_dir / "results.json").is_file():
                continue
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            command = train_command(config, data, test, valid, overrides, run_dir, split)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: test {test}, validation {valid}",
                  flush=True)
            with open(run_dir.with_suffix(".log"), "a") as log:
                subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def fold_summary(run_dir: Path, recompute_baselines: bool = False) -> dict:
    """Test and validation figures of one fold, with its baselines (as recorded, or fitted again
    with the current code)."""
    results = json.loads((run_dir / "results.json").read_text())
    baselines = results["baselines"]
    if recompute_baselines:
        from segnn_jax.tasks import oc20

        baselines = oc20.run_baselines(run_dir, systems=_systems(results["data_path"]))
    return {
        "held_out": results["groups"],
        "test": {"mae_ev": results["test"]["mae_ev"], "ewt": results["test"]["ewt"]},
        "valid": {"mae_ev": results["valid"]["mae_ev"], "ewt": results["valid"]["ewt"]},
        "baselines_test": {k: v["test"]["mae_ev"] for k, v in baselines.items()},
        "baselines_valid": {k: v["valid"]["mae_ev"] for k, v in baselines.items()},
        "n_train": results["n_train"], "n_valid": results["n_valid"], "n_test": results["n_test"],
        "best_epoch": results["best_epoch"], "epochs": results["epochs"],
        "wall_time_s": results["wall_time_s"], "command": results["command"],
        "git_revision": results["git_revision"], "run_dir": str(run_dir),
    }


@functools.lru_cache(maxsize=None)  # every fold reads the same data set
def _systems(path: str):
    from segnn_jax.tasks import oc20

    return oc20.load_systems(path)[0]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def recipe_summary(runs: Path, name: str, overrides: Sequence[str],
                   groups: Sequence[str], recompute_baselines: bool = False) -> dict:
    """Per-fold figures and their means over the finished folds of one recipe."""
    per_fold = {test: fold_summary(runs / name / f"test_{test}", recompute_baselines)
                for test, _ in folds(groups)
                if (runs / name / f"test_{test}" / "results.json").is_file()}
    out = {"overrides": list(overrides), "folds": per_fold,
           "missing_folds": [g for g in groups if g not in per_fold]}
    if not per_fold:
        return out
    baseline_names = next(iter(per_fold.values()))["baselines_test"].keys()
    out.update({
        "mean_test_mae_ev": _mean([f["test"]["mae_ev"] for f in per_fold.values()]),
        "mean_test_ewt": _mean([f["test"]["ewt"] for f in per_fold.values()]),
        "mean_valid_mae_ev": _mean([f["valid"]["mae_ev"] for f in per_fold.values()]),
        "mean_baselines_test_mae_ev": {
            b: _mean([f["baselines_test"][b] for f in per_fold.values()]) for b in baseline_names},
        # The strictest comparison: in every fold, the baseline that is best on that fold's test.
        "mean_per_fold_best_baseline_test_mae_ev": _mean(
            [min(f["baselines_test"].values()) for f in per_fold.values()]),
        "folds_beating_every_baseline": sum(
            f["test"]["mae_ev"] < min(f["baselines_test"].values()) for f in per_fold.values()),
    })
    return out


def summarise(runs: Path, recipes: Dict[str, List[str]], groups: Sequence[str],
              recompute_baselines: bool = False) -> dict:
    """Every recipe's summary and the recipe chosen by mean validation MAE over complete recipes."""
    summaries = {name: recipe_summary(runs, name, o, groups, recompute_baselines)
                 for name, o in recipes.items()}
    complete = {n: s for n, s in summaries.items() if not s["missing_folds"]}
    chosen = min(complete, key=lambda n: complete[n]["mean_valid_mae_ev"]) if complete else None
    out = {"recipes": summaries, "chosen_by_validation": chosen}
    if chosen is not None:
        s = complete[chosen]
        best_baseline = min(s["mean_baselines_test_mae_ev"],
                            key=s["mean_baselines_test_mae_ev"].get)
        out.update({
            "mean_test_mae_ev": s["mean_test_mae_ev"],
            "mean_test_ewt": s["mean_test_ewt"],
            "best_baseline": best_baseline,
            "best_baseline_mean_test_mae_ev": s["mean_baselines_test_mae_ev"][best_baseline],
            "best_baseline_over_segnn": (s["mean_baselines_test_mae_ev"][best_baseline]
                                         / s["mean_test_mae_ev"]),
            "per_fold_best_baseline_over_segnn": (s["mean_per_fold_best_baseline_test_mae_ev"]
                                                  / s["mean_test_mae_ev"]),
        })
    return out


def _without_note(argv: Sequence[str]) -> List[str]:
    """The command line with the (long, already stored) ``--note`` text left out."""
    out = list(argv)
    for k, arg in enumerate(out):
        if arg == "--note" and k + 1 < len(out):
            out[k + 1] = "..."
        elif arg.startswith("--note="):
            out[k] = "--note=..."
    return out


def _parse_recipe(spec: str) -> Tuple[str, List[str]]:
    name, sep, overrides = spec.partition("=")
    if not sep or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=OVERRIDES, got {spec!r}")
    return name, shlex.split(overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the EMT data set folder")
    parser.add_argument("--runs", type=Path, required=True, help="folder for the fold runs")
    parser.add_argument("--config", default="oc20_emt_cpu_adsorbate")
    parser.add_argument("--recipe", type=_parse_recipe, action="append", default=None,
                        metavar="NAME=OVERRIDES",
                        help="a recipe: config overrides in one shell-quoted string (repeatable; "
                             "default: one recipe 'default' without overrides)")
    parser.add_argument("--split", choices=sorted(GROUPS), default="ood_cat",
                        help="hold out metals (ood_cat) or adsorbates (ood_ads)")
    parser.add_argument("--groups", "--metals", nargs="+", default=None,
                        help="the groups, in fold order (default: the EMT set's metals or "
                             "adsorbates)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: benchmarks/results/oc20_emt_lomo.json, "
                             "or oc20_emt_loao.json for ood_ads)")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--recompute-baselines", action="store_true",
                        help="fit every baseline again on each fold's training split instead of "
                             "reading the recorded ones (which must come out the same)")
    parser.add_argument("--note", default="")
    invocation = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(invocation)
    recipes = dict(args.recipe or [("default", [])])
    groups = args.groups or GROUPS[args.split]
    out = args.out or Path("benchmarks/results") / (
        "oc20_emt_lomo.json" if args.split == "ood_cat" else "oc20_emt_loao.json")
    if not args.collect_only:
        run_missing(args.config, args.data, args.runs, recipes, groups, args.split)
    summary = summarise(args.runs, recipes, groups, args.recompute_baselines)
    results = {
        "task": TASKS[args.split],
        "level_of_theory": "EMT (ASE effective medium theory; NOT DFT)",
        "config": args.config,
        "split": args.split,
        "data": str(args.data),
        "folds": [{"test": t, "valid": v} for t, v in folds(groups)],
        **summary,
        "command": " ".join(["python", "experiments/oc20/leave_one_out.py",
                             *map(shlex.quote, _without_note(invocation))]),
        "note": args.note,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    for name, s in summary["recipes"].items():
        if "mean_test_mae_ev" not in s:
            print(f"{name}: no finished fold")
            continue
        folds_text = ", ".join(f"{g} {f['test']['mae_ev']:.3f}" for g, f in s["folds"].items())
        print(f"{name}: mean test MAE {s['mean_test_mae_ev']:.4f} eV, validation "
              f"{s['mean_valid_mae_ev']:.4f} | per-fold best baseline "
              f"{s['mean_per_fold_best_baseline_test_mae_ev']:.4f} | {folds_text}"
              + (f" | missing {s['missing_folds']}" if s["missing_folds"] else ""))
    if summary["chosen_by_validation"]:
        print(f"chosen by validation: {summary['chosen_by_validation']}, test MAE "
              f"{summary['mean_test_mae_ev']:.4f} eV vs {summary['best_baseline']} "
              f"{summary['best_baseline_mean_test_mae_ev']:.4f} "
              f"({summary['best_baseline_over_segnn']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
