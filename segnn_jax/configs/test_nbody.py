"""A tiny charged N-body config for tests and smoke runs (seconds on a CPU).

16 training systems, 2 layers with 8 hidden features, a handful of steps; not meant to learn much.
"""

import ml_collections

from segnn_jax.configs import nbody_charged


def get_config() -> ml_collections.ConfigDict:
    config = nbody_charged.get_config()
    config.data.update(dict(n_train=16, n_valid=8, n_test=8))
    config.batch.batch_size = 8
    config.model.update(dict(hidden_features=8, num_layers=2))
    config.train.update(dict(num_epochs=2, eval_every=1, log_every=1, progress_bar=False,
                             tensorboard=False))
    config.train.optimizer.learning_rate = 1e-3
    return config
