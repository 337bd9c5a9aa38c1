"""A tiny QM9 config for tests and smoke runs (seconds on a CPU): the first CSV rows of the fixture.

Set ``data.source`` to a qm9pack-layout CSV (e.g. the shared fixture of its first 1000 rows; None
reads the installed qm9pack). Random split in the Cormorant proportions capped at 32 training /
8 validation / 8 test molecules, 1 layer of 8 hidden features with lmax 1, one padded batch shape,
8 steps; not meant to learn much.
"""

import ml_collections

from segnn_jax.configs import qm9


def get_config() -> ml_collections.ConfigDict:
    config = qm9.get_config()
    config.data.update({"split": "random", "n_train": 32, "n_valid": 8, "n_test": 8})
    config.batch.batch_size = 8
    config.batch.buckets = (1.0,)  # one padded shape: one compilation per step function
    config.model.update({"hidden_features": 8, "lmax_hidden": 1, "lmax_attr": 1, "num_layers": 1})
    config.train.update({"num_epochs": 2, "eval_every": 1, "log_every": 1, "progress_bar": False,
                         "tensorboard": False})
    config.train.optimizer.learning_rate = 1e-3
    return config
