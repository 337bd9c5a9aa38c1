"""Restoring a finished run's best parameters for evaluation and prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Tuple, Union

import jax
import numpy as np

from segnn_jax.training.checkpoint import CheckpointManager
from segnn_jax.training.optim import make_optimizer
from segnn_jax.training.step import init_train_state

__all__ = ["restore_best_params"]


def restore_best_params(
    init_fn: Callable,
    train_config: Mapping[str, Any],
    run_dir: Union[str, Path],
    example_batch: Any,
) -> Tuple[Any, Any, int]:
    """Parameters and model state of the best-by-validation checkpoint of a run.

    Returns the EMA parameters when the run kept them and evaluated with them.

    Args:
        init_fn: the model's ``init(rng, batch) -> (params, model_state)``.
        train_config: the run's validated ``train`` section (optimizer, seed, ema, checkpoints).
        run_dir: the run directory (with ``checkpoints/``).
        example_batch: a batch of the shape the model was trained on.

    Returns:
        ``(params, model_state, step)``.

    Raises:
        CheckpointError: no usable checkpoint, or one of another model.
    """
    optimizer, _ = make_optimizer(train_config["optimizer"],
                                  total_steps=max(int(train_config["num_epochs"]), 1),
                                  steps_per_epoch=1)
    ema = train_config["ema_decay"] is not None
    # Only the structure, shapes and dtypes of the template matter to the restore.
    template = jax.eval_shape(
        lambda: init_train_state(init_fn, optimizer, jax.random.PRNGKey(int(train_config["seed"])),
                                 example_batch, ema=ema))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    manager = CheckpointManager(Path(run_dir).resolve() / "checkpoints",
                                keep=int(train_config["keep_checkpoints"]))
    state, _, step = manager.restore_best(template)
    params = state.ema_params if ema and train_config["eval_with_ema"] else state.params
    return params, state.model_state, step
