"""N-body experiments: a thin entry point over ``segnn train`` (the task code ships in segnn_jax).

    python experiments/nbody/main.py                                   # = segnn train nbody_charged
    python experiments/nbody/main.py nbody_gravity --config.train.num_epochs=10
    python experiments/nbody/main.py --config.train.num_epochs=1000    # the paper's protocol
"""

import sys

from segnn_jax.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    config = args.pop(0) if args and not args[0].startswith("-") else "nbody_charged"
    sys.exit(main(["train", config, *args]))
