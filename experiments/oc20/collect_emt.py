r"""Collects the EMT IS2RE runs of the three splits into ``benchmarks/results/oc20_emt.json`` and
one learning-curve figure (EMT stand-in, NOT DFT).

Each split is trained first with ``segnn train oc20_emt ... --run-dir RUNS/<split>`` (see the
``oc20_emt`` config docstring for the commands); then::

    python experiments/oc20/collect_emt.py --runs RUNS --data /work/data/emt20k \
        --out benchmarks/results/oc20_emt.json [--variants ood_cat_element_features] \
        [--generation generation.json]

Per split the JSON holds SEGNN's test ``mae_ev`` / ``ewt`` at the best validation epoch, the
baselines' test MAE and EwT (ridge on composition + adsorbate one-hot, ridge on the adsorbate
atoms' element counts, per-adsorbate ridge on the surface's element descriptors, per-adsorbate
mean, training mean; the strongest named), the sample
counts, held-out groups, ``command``, ``git_revision`` and wall time of the run. Splits whose
run has no ``results.json`` yet are listed under ``missing``. ``--variants`` names further run
directories under RUNS (e.g. a split re-run with another option), reported under ``variants``
and drawn as extra panels. ``--ensembles NAME=RUN,RUN,...`` evaluates the mean prediction of
runs under RUNS that share a split (e.g. one recipe trained with three seeds) on its validation
and test systems (:func:`segnn_jax.tasks.oc20.evaluate_ensemble`), reported under ``ensembles``
with the members' own figures and the baselines of the split. ``--generation`` adds a JSON
record of how the data set was generated (rate, interruptions). ``--by-group`` adds, per run
and ensemble, each held-out group's bias, MAE and MAE after its bias for SEGNN and every
baseline (``by_group``): on held-out adsorbates it separates the adsorbate's energy offset, which
training cannot pin down, from the scatter over sites and catalysts. ``--recompute-baselines``
fits every baseline of the current code again on each run's training split (the data set its
config names) instead of reading the ones its ``results.json`` recorded, so that runs trained before
a baseline existed are compared with it too; the recorded baselines must come out the same, which
checks that the data set is the one the run was trained on.
"""

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

SPLITS = ("id", "ood_ads", "ood_cat")
LABELS = {"id": "in-distribution", "ood_ads": "held-out adsorbates (OOD-ads)",
          "ood_cat": "held-out catalysts (OOD-cat)"}


def _metrics(entry):
    return None if entry is None else {"mae_ev": entry["mae_ev"], "ewt": entry["ewt"]}


def split_summary(run_dir: Path, description: str = "", recompute_baselines: bool = False) -> dict:
    """The reported numbers of one run directory (its ``results.json``), with the baselines it
    recorded or, with ``recompute_baselines``, those of
    :func:`segnn_jax.tasks.oc20.run_baselines`."""
    results = json.loads((run_dir / "results.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    baselines = results["baselines"]
    if recompute_baselines:
        from segnn_jax.tasks import oc20

        baselines = oc20.run_baselines(run_dir, systems=_systems(config["data"]["path"]))
    # The strongest baseline on the test split: the one SEGNN has to beat.
    best = min(baselines, key=lambda name: baselines[name]["test"]["mae_ev"])
    return {
        "description": description or LABELS[results["split"]],
        "split": results["split"],
        "mae_ev": results["test"]["mae_ev"],
        "ewt": results["test"]["ewt"],
        "valid": _metrics(results["valid"]),
        "baselines_test": {name: _metrics(baselines[name]["test"]) for name in baselines},
        "baselines_valid": {name: _metrics(baselines[name]["valid"]) for name in baselines},
        "ridge_mae_ev": baselines["composition_ridge"]["test"]["mae_ev"],
        "best_baseline": best,
        "best_baseline_mae_ev": baselines[best]["test"]["mae_ev"],
        "best_baseline_over_segnn": baselines[best]["test"]["mae_ev"] / results["test"]["mae_ev"],
        "adsorbate_mean_mae_ev": baselines["adsorbate_mean"]["test"]["mae_ev"],
        "n_train": results["n_train"],
        "n_valid": results["n_valid"],
        "n_test": results["n_test"],
        "held_out": results.get("groups"),
        "best_epoch": results["best_epoch"],
        "epochs": results["epochs"],
        "num_parameters": results["num_parameters"],
        "energy_reference": config["data"].get("energy_reference", "none"),
        "element_features": config["embedding"].get("element_features", False),
        "standardisation": results["standardisation"],
        "wall_time_s": results["wall_time_s"],
        "command": results["command"],
        "git_revision": results["git_revision"],
        "run_dir": str(run_dir),
        "baselines_recomputed": recompute_baselines,
    }


@functools.lru_cache(maxsize=None)  # each data set is read once per command
def _systems(path: str):
    from segnn_jax.tasks import oc20

    return oc20.load_systems(path)[0]


def _evaluate_ensemble(run_dirs: list, split: str) -> dict:
    return _evaluated(tuple(str(r) for r in run_dirs), split)


@functools.lru_cache(maxsize=None)  # an ensemble's figures and its --by-group share predictions
def _evaluated(run_dirs: tuple, split: str) -> dict:
    from segnn_jax.tasks import oc20

    paths = {json.loads((Path(r) / "config.json").read_text())["data"]["path"] for r in run_dirs}
    return oc20.evaluate_ensemble(list(run_dirs), split, systems={p: _systems(p) for p in paths})


def ensemble_summary(name: str, run_dirs: list, evaluate=None,
                     recompute_baselines: bool = False) -> dict:
    """Validation and test figures of the mean prediction of ``run_dirs`` (one split), next to
    the members' own and the split's baselines (those of the first member's
    :func:`split_summary`)."""
    if evaluate is None:
        evaluate = _evaluate_ensemble
    first = split_summary(Path(run_dirs[0]), recompute_baselines=recompute_baselines)
    figures = {split: evaluate(run_dirs, split) for split in ("valid", "test")}
    keys = ("mae_ev", "ewt", "count", "member_mae_ev", "member_ewt")
    test, valid = ({k: figures[split][k] for k in keys} for split in ("test", "valid"))
    return {
        "description": name,
        "split": first["split"],
        "members": [str(r) for r in run_dirs],
        "mae_ev": test["mae_ev"],
        "ewt": test["ewt"],
        "test": test,
        "valid": valid,
        "baselines_test": first["baselines_test"],
        "baselines_valid": first["baselines_valid"],
        "best_baseline": first["best_baseline"],
        "best_baseline_mae_ev": first["best_baseline_mae_ev"],
        "best_baseline_over_segnn": first["best_baseline_mae_ev"] / test["mae_ev"],
        "ridge_mae_ev": first["ridge_mae_ev"],
        "ridge_over_segnn": first["ridge_mae_ev"] / test["mae_ev"],
        "held_out": first["held_out"],
    }


def group_summary(run_dirs: list, evaluate=None) -> dict:
    """Per held-out group (adsorbate; catalyst for OOD-cat) of the validation and test splits:
    bias, MAE and MAE after the group's bias of SEGNN (the mean of ``run_dirs``) and of every
    baseline (:func:`segnn_jax.tasks.oc20.errors_by_group`)."""
    from segnn_jax.tasks import oc20

    if evaluate is None:
        evaluate = _evaluate_ensemble
    cfg = oc20.validate_config(json.loads((Path(run_dirs[0]) / "config.json").read_text()))
    splits, _ = oc20.split_systems(cfg, _systems(cfg["data"]["path"]))
    evaluated = {split: splits[split] for split in ("valid", "test")}
    baselines = oc20.baseline_predictions(cfg, splits["train"], evaluated)
    key = "catalyst" if cfg["data"]["split"] == "ood_cat" else "adsorbate"
    out = {}
    for split, systems in evaluated.items():
        segnn = evaluate(run_dirs, split)
        if segnn["names"] != [s.name for s in systems]:
            raise ValueError(f"{run_dirs[0]}: the {split} predictions are not in split order")
        target = np.asarray([s.energy for s in systems])
        groups = [getattr(s, key) for s in systems]
        out[split] = {name: oc20.errors_by_group(predicted, target, groups) for name, predicted in
                      [("segnn", segnn["predicted_ev"])]
                      + [(b, by_split[split]) for b, by_split in baselines.items()]}
    return {"group_by": key, **out}


def _curves(run_dir: Path):
    """(epoch, validation MAE eV), (epoch, test MAE eV) and (epoch, training batch MAE eV)."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if line.strip()]
    val, test = ([(e["epoch"] + 1, e["mae"]) for e in events
                  if e.get("event") == "eval" and e.get("split") == split]
                 for split in ("val", "test"))
    steps_per_epoch = max((e["step"] for e in events if e.get("event") == "train"), default=1) / \
        max(1, max((e["epoch"] + 1 for e in events if e.get("event") == "train"), default=1))
    train = [(e["step"] / steps_per_epoch, e["mae"]) for e in events if e.get("event") == "train"]
    return val, test, train


def plot(summaries: dict, runs: Path, path: Path) -> None:
    """One panel per run: SEGNN training / validation MAE per epoch and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(4.2 * len(summaries), 3.6), dpi=120,
                             squeeze=False)
    for ax, (split, summary) in zip(axes[0], summaries.items()):
        val, test, train = _curves(Path(summary["run_dir"]))
        if train:
            ax.plot(*zip(*train), color="0.6", lw=0.8, label="SEGNN train (batch MAE)")
        if val:
            ax.plot(*zip(*val), "o-", ms=3, label="SEGNN validation")
        if test:
            ax.plot(*zip(*test), "s--", ms=2, color="C1", alpha=0.7, label="SEGNN test")
        ax.axhline(summary["baselines_valid"]["composition_ridge"]["mae_ev"], color="C3", ls="--",
                   label="ridge comp.+ads. (validation)")
        ax.axhline(summary["baselines_valid"]["adsorbate_mean"]["mae_ev"], color="C2", ls=":",
                   label="per-adsorbate mean (validation)")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("MAE (eV, EMT)")
        ax.set_title(f"{summary['description']}\ntest: SEGNN {summary['mae_ev']:.3f}, "
                     f"best baseline {summary['best_baseline_mae_ev']:.3f} eV", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("OC20-style IS2RE on the EMT stand-in (EMT, not DFT)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def dataset_summary(data: Path, generation: Path | None = None) -> dict:
    """The EMT set: its folder, shard count, manifest (when the folder has one) and generation
    record."""
    shards = sorted(data.glob("shard_*.aselmdb"))
    out = {"path": str(data), "complete_shards": len(shards)}
    if (data / "emt_dataset.json").is_file():
        out["manifest"] = json.loads((data / "emt_dataset.json").read_text())
    if generation is not None:
        out["generation"] = json.loads(generation.read_text())
    return out


def _without_note(argv):
    """The command line with the (long, already stored) ``--note`` text left out."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            out.append("--note ...")
            skip = True
        else:
            out.append("--note ..." if arg.startswith("--note=") else arg)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True,
                        help="folder with one run directory per split (id, ood_ads, ood_cat)")
    parser.add_argument("--data", type=Path, required=True, help="the EMT data set folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/oc20_emt.json"))
    parser.add_argument("--suffix", default="",
                        help="the split runs are RUNS/<split><suffix> (e.g. _adsorbate_ref)")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="further run directories under --runs to report (e.g. a fix)")
    parser.add_argument("--ensembles", nargs="*", default=[], metavar="NAME=RUN,RUN",
                        help="mean prediction of run directories under --runs sharing a split")
    parser.add_argument("--generation", type=Path, default=None,
                        help="JSON record of the generation of the data set")
    parser.add_argument("--by-group", action="store_true",
                        help="add each run's (and ensemble's) bias and MAE per held-out group "
                             "for SEGNN and the baselines (evaluates the best checkpoints)")
    parser.add_argument("--recompute-baselines", action="store_true",
                        help="fit every baseline again on each run's training split instead of "
                             "reading the recorded ones (which must come out the same)")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    recompute = args.recompute_baselines
    runs = {split: args.runs / f"{split}{args.suffix}" for split in SPLITS}
    summaries = {split: split_summary(run, recompute_baselines=recompute)
                 for split, run in runs.items() if (run / "results.json").is_file()}
    variants = {name: split_summary(args.runs / name, description=name,
                                    recompute_baselines=recompute)
                for name in args.variants}
    if not summaries:
        print(f"no finished run under {args.runs}", file=sys.stderr)
        return 1
    ensembles = {}
    for spec in args.ensembles:
        name, _, members = spec.partition("=")
        if not members:
            parser.error(f"--ensembles expects NAME=RUN,RUN,..., got {spec!r}")
        ensembles[name] = ensemble_summary(name, [args.runs / m for m in members.split(",")],
                                           recompute_baselines=recompute)
        if args.by_group:
            ensembles[name]["by_group"] = group_summary(
                [args.runs / m for m in members.split(",")])
    if args.by_group:
        for summary in [*summaries.values(), *variants.values()]:
            summary["by_group"] = group_summary([Path(summary["run_dir"])])
    figure = args.out.with_suffix(".png")
    plot({**summaries, **variants}, args.runs, figure)
    results = {
        "task": "oc20_is2re_emt",
        "level_of_theory": "EMT (ASE effective medium theory; NOT DFT)",
        "target": "relaxed adsorption energy (eV) from the initial structure (IS2RE)",
        "ewt_threshold_ev": 0.02,
        "dataset": dataset_summary(args.data, args.generation),
        "splits": summaries,
        "variants": variants,
        "ensembles": ensembles,
        "missing": [s for s in SPLITS if s not in summaries],
        "figure": os.path.relpath(figure, args.out.parent),
        "command": " ".join(["python", *_without_note(sys.argv)]),
        "note": args.note,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} and {figure}")
    for split, s in {**summaries, **variants}.items():
        print(f"{split:8s} SEGNN MAE {s['mae_ev']:.4f} eV EwT {s['ewt']:.3f} | ridge "
              f"{s['ridge_mae_ev']:.4f} | ads. mean {s['adsorbate_mean_mae_ev']:.4f} | best "
              f"baseline {s['best_baseline']} {s['best_baseline_mae_ev']:.4f} "
              f"({s['best_baseline_over_segnn']:.2f}x SEGNN) | "
              f"n {s['n_train']}/{s['n_valid']}/{s['n_test']}")
    for name, e in ensembles.items():
        print(f"{name}: ensemble of {len(e['members'])} MAE {e['mae_ev']:.4f} eV (members "
              f"{', '.join(f'{m:.4f}' for m in e['test']['member_mae_ev'])}), validation "
              f"{e['valid']['mae_ev']:.4f} | ridge {e['ridge_mae_ev']:.4f} | best baseline "
              f"{e['best_baseline']} {e['best_baseline_mae_ev']:.4f}")
    for name, summary in [*summaries.items(), *variants.items(), *ensembles.items()]:
        for line in _group_lines(name, summary.get("by_group")):
            print(line)
    return 0


def _group_lines(name: str, by_group: dict | None) -> list:
    """One line per held-out group: SEGNN's bias, MAE and MAE after bias, next to the baseline
    with the lowest MAE on that group."""
    if not by_group:
        return []
    lines = []
    for split in ("valid", "test"):
        for group, segnn in by_group[split]["segnn"].items():
            best = min((b for b in by_group[split] if b != "segnn"),
                       key=lambda b: by_group[split][b][group]["mae_ev"])
            other = by_group[split][best][group]
            lines.append(
                f"{name} {split} {group}: SEGNN bias {segnn['bias_ev']:+.3f} MAE "
                f"{segnn['mae_ev']:.3f} (after bias {segnn['mae_after_bias_ev']:.3f}) | {best} "
                f"bias {other['bias_ev']:+.3f} MAE {other['mae_ev']:.3f} (after bias "
                f"{other['mae_after_bias_ev']:.3f})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
