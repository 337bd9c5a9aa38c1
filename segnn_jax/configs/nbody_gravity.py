"""Gravity N-body (100 bodies, 6-nearest-neighbour graphs) with SEGNN, on a reduced CPU data budget.

The model and optimiser are the reference's (SEGNN.md section 3: 4 layers, 64 hidden features,
Adam 5e-4, L2 weight decay 1e-12, evaluation every 5 epochs). The data budget is reduced so that a
2-core CPU can afford it: 500 training, 100 validation and 100 test systems, batch 25 (2500 nodes,
15,000 edges per batch), 100 epochs. Simulating is the slow part: 130-160 s per chunk of 32
100-body systems were measured on a shared 2-core CPU, so the 700 systems take roughly 30-60
minutes the first time (then they are cached).

The full protocol (10,000 training systems, batch 100, 1000 epochs; for a GPU)::

    segnn train nbody_gravity --config.data.n_train=10000 --config.data.n_valid=2000 \
        --config.data.n_test=2000 --config.batch.batch_size=100 --config.train.num_epochs=1000
"""

import ml_collections

from segnn_jax.tasks import models
from segnn_jax.tasks.nbody import BATCH_DEFAULTS, DATA_DEFAULTS
from segnn_jax.training import default_train_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "nbody"
    # neighbours None: the data set's default, 6 nearest neighbours for gravity.
    config.data = dict(DATA_DEFAULTS, dataset="gravity", n_train=500, n_valid=100, n_test=100)
    config.batch = dict(BATCH_DEFAULTS, batch_size=25)
    config.model = dict(models.default_model_config(), name="segnn", hidden_features=64,
                        lmax_hidden=1, lmax_attr=1, num_layers=4, norm="none")
    train = default_train_config()
    train.update(num_epochs=100, eval_every=5, log_every=10, seed=0)
    train["optimizer"].update(optimizer="adam", learning_rate=5e-4, weight_decay=1e-12,
                              schedule="constant")
    config.train = train
    return config
