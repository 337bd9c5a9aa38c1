"""How a trained N-body run's test MSE is made up, and how far another draw of test systems could
move it: per-system errors, bootstrap intervals, and paired comparisons of runs.

    python experiments/nbody/error_profile.py RUN_DIR [RUN_DIR ...] [--split test]
        [--reference 0.0043] [--resamples 10000] [--seed 0] [--out profile.json]

The split's MSE is the mean over its systems of each system's MSE (every system has the same number
of bodies), so resampling systems with replacement gives the spread of that figure over other draws
of as many test systems from the same simulator. For every run and for the two trivial baselines it
reports:

* the MSE and its 95% bootstrap interval (percentiles of the resampled means);
* the median system's MSE, the share of the total held by the worst 1% and 5% of systems, and the
  MSE without the worst 1%: close encounters make a few systems dominate the mean;
* with ``--reference``: the fraction of resamples at or below that figure (e.g. a published MSE).

With two or more runs, each later run is compared with the first on the same resampled systems
(paired): the mean difference of their MSEs, its 95% interval, and the fraction of resamples in
which the later run is the better one. The runs must be validated and tested on the same systems.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from segnn_jax import __version__
from segnn_jax.artifact import load_trained
from segnn_jax.tasks import nbody
from segnn_jax.training.run import git_revision

SPLITS = ("valid", "test")
# Resampled means are drawn this many resamples at a time: [chunk, systems] indices stay small.
_CHUNK = 500
_MIN_RESAMPLES = 100


def per_system_mse(predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[S]``: each system's MSE over its bodies and coordinates (float64)."""
    return np.mean((predicted.astype(np.float64) - targets) ** 2, axis=(1, 2))


def bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``[B, R]``: the means of ``values [R, S]`` over ``resamples`` draws of S systems with
    replacement, the same draws for every row (so that rows can be compared pairwise)."""
    values = np.atleast_2d(values)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        idx = rng.integers(0, values.shape[1], size=(min(_CHUNK, resamples - start),
                                                     values.shape[1]))
        means.append(values[:, idx].mean(axis=-1).T)
    return np.concatenate(means)


def _interval(samples: np.ndarray) -> List[float]:
    return [float(q) for q in np.percentile(samples, [2.5, 97.5])]


def profile(errors: np.ndarray, resampled: np.ndarray,
            reference: Optional[float] = None) -> Dict[str, Any]:
    """The figures of one row: ``errors [S]`` per-system MSE and ``resampled [B]`` their
    bootstrap means."""
    worst = np.sort(errors)[::-1]
    n_1, n_5 = max(1, round(0.01 * len(worst))), max(1, round(0.05 * len(worst)))
    # A perfect prediction (every error 0) has no worst systems: their share is 0, not 0/0.
    total = worst.sum() or 1.0
    out = {
        "mse": float(errors.mean()),
        "ci95": _interval(resampled),
        "median_system_mse": float(np.median(errors)),
        "worst_1pct_share": float(worst[:n_1].sum() / total),
        "worst_5pct_share": float(worst[:n_5].sum() / total),
        "mse_without_worst_1pct": float(worst[n_1:].mean()) if len(worst) > n_1 else None,
        "n_systems": int(len(errors)),
    }
    if reference is not None:
        out["fraction_at_or_below_reference"] = float(np.mean(resampled <= reference))
    return out


def error_profile(run_dirs: Sequence[str], *, split: str = "test", resamples: int = 10_000,
                  seed: int = 0, reference: Optional[float] = None) -> Dict:
    """Per-run and per-baseline profiles, and paired comparisons with the first run.

    Raises:
        ValueError: an unknown split, too few resamples, a run given twice, or runs tested on
            other systems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if resamples < _MIN_RESAMPLES:
        raise ValueError(f"resamples must be at least {_MIN_RESAMPLES}, got {resamples}")
    if len(set(map(str, run_dirs))) < len(run_dirs):
        raise ValueError(f"a run is given more than once: {[str(d) for d in run_dirs]}")
    runs = [load_trained(run_dir, task="nbody") for run_dir in run_dirs]
    nbody.check_same_evaluation_data([(str(d), run.config) for d, run in zip(run_dirs, runs)])
    data = nbody.load_splits(runs[0].config, (split,), progress=False)[split]
    baselines = {"input_position": data.positions,
                 "constant_velocity": data.positions + data.horizon * data.velocities}
    names = [str(d) for d in run_dirs] + list(baselines)
    predictions = [nbody.predict_positions(run, data) for run in runs] + list(baselines.values())
    errors = np.stack([per_system_mse(p, data.targets) for p in predictions])
    resampled = bootstrap_means(errors, resamples, seed)
    profiles = {name: profile(errors[i], resampled[:, i], reference)
                for i, name in enumerate(names)}
    comparisons = {}
    for i, name in enumerate(names[1:len(runs)], start=1):
        difference = resampled[:, i] - resampled[:, 0]
        comparisons[name] = {"versus": names[0],
                             "mse_difference": float(errors[i].mean() - errors[0].mean()),
                             "ci95": _interval(difference),
                             "fraction_better": float(np.mean(difference < 0))}
    return {"split": split, "resamples": resamples, "seed": seed, "reference": reference,
            "runs": {name: profiles[name] for name in names[:len(runs)]},
            "baselines": {name: profiles[name] for name in baselines},
            "paired_with_first": comparisons}


def _line(name: str, p: Dict) -> str:
    lo, hi = p["ci95"]
    line = (f"{name}: MSE {p['mse']:.5f} (95% {lo:.5f}-{hi:.5f}); median system "
            f"{p['median_system_mse']:.5f}; worst 1% hold {p['worst_1pct_share']:.0%}, worst 5% "
            f"{p['worst_5pct_share']:.0%}")
    if "fraction_at_or_below_reference" in p:
        line += f"; at or below the reference in {p['fraction_at_or_below_reference']:.1%}"
    return line


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="trained N-body run directories")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--reference", type=float, help="an MSE to compare with, e.g. 0.0043")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    try:
        result = error_profile(args.runs, split=args.split, resamples=args.resamples,
                               seed=args.seed, reference=args.reference)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, p in {**result["runs"], **result["baselines"]}.items():
        print(_line(name, p))
    for name, c in result["paired_with_first"].items():
        lo, hi = c["ci95"]
        print(f"{name} - {c['versus']}: {c['mse_difference']:+.5f} (95% {lo:+.5f} to {hi:+.5f}); "
              f"better in {c['fraction_better']:.1%} of resamples")
    result.update(command="python experiments/nbody/error_profile.py " + " ".join(
                      argv if argv is not None else sys.argv[1:]),
                  git_revision=git_revision(), segnn_version=__version__)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
