"""Interatomic potential on EMT relaxation frames (S2EF-style; EMT, not DFT): energies + forces.

A CPU-sized SEGNN potential (conservative forces F = -dE/dx): 2 layers of 32x0e+16x1o, SH
attributes up to l = 1, embedding of Z to 16 scalars, 8 Bessel functions with a smooth envelope,
cutoff 4 A; frames with an atomic force above 5 eV/A dropped; loss 10 (dE/n)^2 + |dF|^2 / 3n per
structure; Adam 3e-3 with cosine decay. Data::

    python -m segnn_jax.datasets.emt_frames data/emt_frames --n-relaxations 1000 --seed 0
    segnn train emt_s2ef --config.data.path=data/emt_frames

``--config.potential.head=direct`` trains the direct 1x1o force head instead.
"""

import ml_collections

from segnn_jax.tasks.potential import (
    BATCH_DEFAULTS,
    DATA_DEFAULTS,
    LOSS_DEFAULTS,
    MODEL_DEFAULTS,
    POTENTIAL_DEFAULTS,
)
from segnn_jax.training import default_train_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "potential"
    # The first frames of some relaxations hold forces of 10-20 eV/A (an adsorbate started far
    # from equilibrium); they would dominate the squared force loss and MD never visits them.
    config.data = dict(DATA_DEFAULTS, cutoff=4.0, max_force=5.0)
    config.batch = dict(BATCH_DEFAULTS, batch_size=8, buckets=(0.75, 1.0))
    config.potential = dict(POTENTIAL_DEFAULTS, head="conservative")
    config.loss = dict(LOSS_DEFAULTS, energy_weight=10.0, force_weight=1.0)
    config.model = dict(MODEL_DEFAULTS)  # 32x0e+16x1o, lmax_attr 1, 2 layers, node-level
    train = default_train_config()
    train.update(num_epochs=10, eval_every=1, log_every=100, seed=0, progress_bar=False)
    train["optimizer"].update(optimizer="adam", learning_rate=3e-3, schedule="cosine",
                              warmup_epochs=0.2)
    config.train = train
    return config
