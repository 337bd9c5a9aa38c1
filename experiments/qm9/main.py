"""QM9 experiments: a thin entry point over ``segnn train`` (the task code ships in segnn_jax).

    python experiments/qm9/main.py                                        # = segnn train qm9 (alpha)
    python experiments/qm9/main.py --config.data.target=homo              # another of the 12 targets
    python experiments/qm9/main.py qm9_extensive --config.data.target=U0  # atom reference + sum pool
    python experiments/qm9/main.py --config.data.n_train=5000 --config.train.num_epochs=3  # CPU budget
"""

import sys

from segnn_jax.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    config = args.pop(0) if args and not args[0].startswith("-") else "qm9"
    sys.exit(main(["train", config, *args]))
