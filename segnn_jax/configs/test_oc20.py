"""A tiny OC20 config for tests and smoke runs (seconds on a CPU); set ``data.path``.

The author's recipe shrunk: 1 layer of 4x0e+2x1o, embedding of 4 scalars, cutoff 4 A, batch 4 with
one padded shape, 1 epoch; not meant to learn anything.
"""

import ml_collections

from segnn_jax.configs import oc20_emt


def get_config() -> ml_collections.ConfigDict:
    config = oc20_emt.get_config()
    config.data.update({"cutoff": 4.0, "valid_fraction": 0.2, "test_fraction": 0.2})
    config.batch.batch_size = 4
    config.batch.buckets = (1.0,)  # one padded shape: one compilation per step function
    config.embedding.dim = 4
    config.model.update({"hidden_irreps": "4x0e+2x1o", "num_layers": 1})
    config.train.update({"num_epochs": 1, "eval_every": 1, "log_every": 1, "progress_bar": False,
                         "tensorboard": False})
    config.train.optimizer.update({"learning_rate": 1e-3, "decay_epochs": (),
                                   "schedule": "constant", "warmup_epochs": 0.0})
    return config
