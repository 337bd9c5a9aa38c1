"""Charged N-body with SEGNN, the reference hyper-parameters, shortened to ~15 min on a 2-core CPU.

Reference (SEGNN.md section 3): the first 3000 of the 10,000 training systems, 2000 validation and
2000 test systems; fully connected 5-particle graphs; input frame 30, target frame 40; SEGNN with
4 layers, 64 hidden features (weight-balanced ``32x0e+32x1o`` for lmax 1/1), no norm; Adam with
learning rate 5e-4 and L2 weight decay 1e-12; batch 100; evaluation every 5 epochs; test MSE at the
best validation epoch.

The only change is the number of epochs, chosen so that the default run takes about 10-15 minutes
on a 2-core CPU. The paper's full protocol is one override::

    segnn train nbody_charged --config.train.num_epochs=1000

The SEConv baselines: ``--config.model.name=seconv_nonlinear`` (or ``seconv_linear``).
"""

import ml_collections

from segnn_jax.tasks import models
from segnn_jax.tasks.nbody import BATCH_DEFAULTS, DATA_DEFAULTS
from segnn_jax.training import default_train_config

# Measured on the shared 2-core CPU: 120 epochs of 30 training steps, with an evaluation of the
# 4000 validation and test systems every 5 epochs, took 4.7 minutes (session 12, the slower AMD
# machine, benchmarks/results/nbody_charged_main_job.json) and 13-20 minutes under heavy load.
EPOCHS = 120


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "nbody"
    config.data = dict(DATA_DEFAULTS, dataset="charged", n_train=3000, n_valid=2000, n_test=2000)
    config.batch = dict(BATCH_DEFAULTS, batch_size=100)
    # Weights before coupling: the same function, a 1.2x faster training step on these graphs
    # (benchmarks/README.md).
    config.model = dict(models.default_model_config(), name="segnn", hidden_features=64,
                        lmax_hidden=1, lmax_attr=1, num_layers=4, norm="none",
                        contraction_order="weights_first")
    train = default_train_config()
    train.update(num_epochs=EPOCHS, eval_every=5, log_every=10, seed=0)
    train["optimizer"].update(optimizer="adam", learning_rate=5e-4, weight_decay=1e-12,
                              schedule="constant")
    config.train = train
    return config
