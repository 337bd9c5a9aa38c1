"""A tiny potential config for tests and smoke runs (seconds on a CPU); set ``data.path``.

1 layer of 4x0e+2x1o, embedding of 4 scalars, 4 Bessel functions, cutoff 3.5 A, batch 4 with one
padded shape, 1 epoch; not meant to learn much.
"""

import ml_collections

from segnn_jax.configs import emt_s2ef


def get_config() -> ml_collections.ConfigDict:
    config = emt_s2ef.get_config()
    config.data.update({"cutoff": 3.5, "valid_fraction": 0.2, "test_fraction": 0.2})
    config.batch.batch_size = 4
    config.batch.buckets = (1.0,)  # one padded shape: one compilation per step function
    config.potential.update({"embedding_dim": 4, "num_radial": 4})
    config.model.update({"hidden_irreps": "4x0e+2x1o", "num_layers": 1})
    config.train.update({"num_epochs": 1, "eval_every": 1, "log_every": 1, "progress_bar": False,
                         "tensorboard": False})
    config.train.optimizer.update({"learning_rate": 1e-3, "schedule": "constant",
                                   "warmup_epochs": 0.0})
    return config
