r"""OC20 experiments: a thin entry point over ``segnn train`` (the task code ships in segnn_jax).

    python experiments/oc20/main.py --config.data.path=data/emt                      # = segnn train oc20_emt (ID)
    python experiments/oc20/main.py --config.data.path=data/emt --config.data.split=ood_ads
    python experiments/oc20/main.py --config.data.dataset=xu_kitchin \
        --config.data.path=../shared/data/adsorption_dft                             # DFT cross-validation
"""

import sys

from segnn_jax.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    config = args.pop(0) if args and not args[0].startswith("-") else "oc20_emt"
    sys.exit(main(["train", config, *args]))
