r"""Gravity N-body (100 bodies, 6-nearest-neighbour graphs) with SEGNN, on a reduced CPU data budget.

The model and optimiser are the reference's (SEGNN.md section 3: 4 layers, 64 hidden features,
Adam 5e-4, L2 weight decay 1e-12, evaluation every 5 epochs). The data budget is what a shared
2-core CPU affords: 128 training, 32 validation and 100 test systems (the first ones of each split
of the 10,000/2,000/2,000 stream), batch 16 (1600 nodes, 9600 edges per batch), 100 epochs.
Simulating is the slow part: a chunk of 32 100-body systems took 130-160 s of wall time on a
lightly loaded 2-core CPU and ~6 minutes under heavy shared load (about 1 CPU-minute), so these
260 systems take 15-50 minutes the first time (then they are cached).

The trivial baselines look unusual on this data set and are right: by frame 30 the systems have
collapsed into a virialised cluster (median radius ~0.85, speeds ~6), so over the 1.0 time units
to frame 40 the bodies turn around many times and predicting the constant-velocity position
(MSE ~15) is far worse than predicting no motion (MSE ~1.5); constant velocity does win for
horizons up to ~0.1.

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
    config.data = dict(DATA_DEFAULTS, dataset="gravity", n_train=128, n_valid=32, n_test=100)
    config.batch = dict(BATCH_DEFAULTS, batch_size=16)
    # Weights before coupling, as for charged N-body (the same function; benchmarks/README.md).
    config.model = dict(models.default_model_config(), name="segnn", hidden_features=64,
                        lmax_hidden=1, lmax_attr=1, num_layers=4, norm="none",
                        contraction_order="weights_first")
    train = default_train_config()
    train.update(num_epochs=100, eval_every=5, log_every=8, seed=0)
    train["optimizer"].update(optimizer="adam", learning_rate=5e-4, weight_decay=1e-12,
                              schedule="constant")
    config.train = train
    return config
