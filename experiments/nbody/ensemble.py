"""The MSE of an ensemble of trained N-body runs: the mean of their predicted positions.

    python experiments/nbody/ensemble.py RUN_DIR [RUN_DIR ...] [--out results.json]

Each run contributes its best checkpoint (chosen by its own validation MSE during training), so the
ensemble is selected on validation data only. It prints, for validation and test, every member's
MSE and the MSE of the mean prediction, and writes them as JSON with ``--out``.

The runs must be of the same N-body data (data set, split sizes, input and target frames); they may
differ in anything else (seed, model, optimiser).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from segnn_jax import __version__
from segnn_jax.artifact import load_trained
from segnn_jax.tasks import nbody
from segnn_jax.training.run import git_revision

SPLITS = ("valid", "test")


def _mse(predicted: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean((predicted.astype(np.float64) - targets) ** 2))


def evaluate_ensemble(run_dirs: Sequence[str]) -> Dict:
    """Member and ensemble MSE on the validation and test splits of the members' data.

    Raises:
        ValueError: fewer than two runs, or runs whose validation or test data differ.
    """
    if len(run_dirs) < 2:
        raise ValueError(f"an ensemble needs at least 2 runs, got {len(run_dirs)}")
    members = [load_trained(run_dir, task="nbody") for run_dir in run_dirs]
    nbody.check_same_evaluation_data(
        [(str(run_dir), member.config) for run_dir, member in zip(run_dirs, members)])
    splits = nbody.load_splits(members[0].config, SPLITS, progress=False)
    out = {"runs": [str(run_dir) for run_dir in run_dirs], "splits": {}}
    for split in SPLITS:
        data = splits[split]
        predictions = [nbody.predict_positions(member, data) for member in members]
        out["splits"][split] = {
            "members_mse": [_mse(p, data.targets) for p in predictions],
            "ensemble_mse": _mse(np.mean(predictions, axis=0), data.targets),
            "count": int(data.targets.size),
        }
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="trained N-body run directories")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    try:
        result = evaluate_ensemble(args.runs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, r in result["splits"].items():
        members = ", ".join(f"{m:.5f}" for m in r["members_mse"])
        print(f"{split}: ensemble of {len(args.runs)} MSE {r['ensemble_mse']:.5f}; "
              f"members {members} (mean {np.mean(r['members_mse']):.5f})")
    result.update(command="python experiments/nbody/ensemble.py " + " ".join(args.runs),
                  git_revision=git_revision(), segnn_version=__version__)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
