"""The generic training engine: optimisers, pure jitted steps, data parallelism, checkpoints, loop.

Model-agnostic: a model enters as ``init(rng, batch) -> (params, model_state)`` and an objective
``loss_fn(params, model_state, batch, rng, is_training) -> (loss_sum, (sums, new_model_state))``
(see :mod:`segnn_jax.training.step` for the contract). Typical use::

    from segnn_jax import training
    cfg = training.validate_train_config(config.train)          # ConfigError before compiling
    result = training.fit(model.init, loss_fn, train_loader, config=cfg, run_dir="runs/qm9",
                          val_data=val_loader, test_data=test_loader, full_config=config)
"""

from segnn_jax.training.checkpoint import (CheckpointError, CheckpointManager,
                                           CorruptCheckpointError, atomic_write_text)
from segnn_jax.training.config import (TRAIN_DEFAULTS, ConfigError, check_budgets,
                                       check_known_options, default_train_config, to_dict,
                                       validate_train_config)
from segnn_jax.training.loop import FitResult, NonFiniteLossError, evaluate, fit
from segnn_jax.training.optim import OPTIMIZER_DEFAULTS, make_optimizer, make_schedule
from segnn_jax.training.restore import restore_best_params
from segnn_jax.training.run import (RunDirectory, count_parameters, git_revision,
                                    plot_learning_curves, read_metrics, summary_table, versions)
from segnn_jax.training.step import (TrainState, data_mesh, init_train_state, make_eval_step,
                                     make_train_step, metrics_from_sums, shard_batch,
                                     stack_batches)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "CorruptCheckpointError",
    "FitResult",
    "NonFiniteLossError",
    "OPTIMIZER_DEFAULTS",
    "RunDirectory",
    "TRAIN_DEFAULTS",
    "TrainState",
    "atomic_write_text",
    "check_budgets",
    "check_known_options",
    "count_parameters",
    "data_mesh",
    "default_train_config",
    "evaluate",
    "fit",
    "git_revision",
    "init_train_state",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "metrics_from_sums",
    "plot_learning_curves",
    "read_metrics",
    "restore_best_params",
    "shard_batch",
    "stack_batches",
    "summary_table",
    "to_dict",
    "validate_train_config",
    "versions",
]
