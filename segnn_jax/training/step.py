"""The pure, jit-compiled training and evaluation steps, on one device or data-parallel on many.

Model contract (any model, any task):

* ``init(rng, batch) -> (params, model_state)``: the ``init`` of ``hk.transform_with_state``.
* ``loss_fn(params, model_state, batch, rng, is_training) -> (loss_sum, (sums, new_model_state))``
  where ``loss_sum`` is the **sum** of the per-item losses over the real (unpadded) items of the
  batch, and ``sums`` a dict of scalars holding at least ``"count"``, the number of real items
  (graphs or nodes) the loss averages over, plus any metric sums such as ``"abs_error_sum"``. The
  task masks the padding inside ``loss_fn``; the engine only divides: the loss is
  (total ``loss_sum``) / (total ``count``) over all devices, so padding never changes a number. A
  metric ``"X_sum"`` is reported as ``X = X_sum / X_count`` if the task gives ``"X_count"``, else
  ``X_sum / count``.

Data parallelism uses ``jax.shard_map`` over a one-dimensional mesh with axis ``"data"``: the
:class:`TrainState` is replicated, each device gets its own padded batch (the batch leaves carry a
leading device axis, ``[n_devices, ...]``), and the gradient is
``grad(sum_d loss_sum_d) / sum_d count_d``, computed as a ``psum`` of per-device gradients of
``loss_sum_d / total_count``. This is exactly the gradient of the single-device loss on the
concatenated data (up to float summation order). Float leaves of ``new_model_state`` (e.g. running
statistics) are averaged over devices.

Multi-host: call ``jax.distributed.initialize()`` in every process before anything else touches JAX,
build the mesh over all devices with :func:`data_mesh` (``jax.devices()`` is then global), and let
each process feed only its local devices' batches, stacked ``[n_local_devices, ...]``:
:func:`shard_batch` assembles the global array with ``jax.make_array_from_process_local_data``.
Each process must give the same number of steps per epoch (pad the epoch with empty batches, whose
``count`` is 0, if needed).

Shape letters: D devices of the mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from segnn_jax.compile_options import jit
from segnn_jax.tensor_product import differentiated_hybrid

__all__ = [
    "TrainState",
    "data_mesh",
    "init_train_state",
    "make_eval_step",
    "make_train_step",
    "metrics_from_sums",
    "shard_batch",
    "stack_batches",
]

LossFn = Callable[..., Tuple[jnp.ndarray, Tuple[Dict[str, jnp.ndarray], Any]]]
_AXIS = "data"


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree (passes through ``jit`` and checkpoints).

    Attributes:
        params: model parameters (Haiku params).
        opt_state: optax state.
        model_state: Haiku state (e.g. running statistics); ``{}`` if the model has none.
        step: int32 scalar, number of optimiser steps taken.
        rng: raw ``uint32[2]`` PRNG key, split once per step for dropout-like randomness.
        ema_params: exponential moving average of ``params``, or ``None``.
    """

    params: Any
    opt_state: Any
    model_state: Any
    step: jnp.ndarray
    rng: jnp.ndarray
    ema_params: Any = None


def init_train_state(init_fn: Callable, optimizer: optax.GradientTransformation, rng: jnp.ndarray,
                     example_batch: Any, *, ema: bool = False) -> TrainState:
    """Initialises parameters, model state and optimiser state.

    Args:
        init_fn: ``init(rng, batch) -> (params, model_state)``.
        optimizer: from :func:`segnn_jax.training.make_optimizer`.
        rng: raw PRNG key; split into an init key and the state's training key.
        example_batch: one *unstacked* padded batch (no device axis).
        ema: keep an exponential moving average of the parameters.

    Returns:
        A fresh :class:`TrainState` with ``step == 0``.
    """
    init_rng, train_rng = jax.random.split(rng)
    # Compiled as one program: run op by op, initialising even a tiny SEGNN compiles each of its
    # hundreds of operations separately (25 s for three layers of tiny irreps on a CPU).
    params, model_state = jit(init_fn)(init_rng, example_batch)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        model_state=model_state,
        step=jnp.zeros((), jnp.int32),
        rng=train_rng,
        ema_params=jax.tree.map(jnp.array, params) if ema else None,
    )


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A one-dimensional mesh with axis ``"data"`` over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (_AXIS,))


def stack_batches(batches: Sequence[Any]) -> Any:
    """Stacks equally shaped padded batches into one with a leading device axis ``[D, ...]``."""
    shapes = {tuple(np.shape(x) for x in jax.tree.leaves(b)) for b in batches}
    if len(shapes) != 1:
        raise ValueError("stack_batches needs batches padded to the same shapes, got "
                         f"{len(shapes)} different shape sets")
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host batch ``[n_local_devices, ...]`` on the mesh, one slice per device.

    Works on one host and across hosts (each process passes its local part).
    """
    sharding = NamedSharding(mesh, P(_AXIS))
    n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])

    def put(x):
        x = np.asarray(x)
        if x.shape[0] != n_local:
            raise ValueError(f"batch leaves must have a leading axis of {n_local} local devices, "
                             f"got shape {x.shape}")
        global_shape = (mesh.devices.size,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, batch)


def metrics_from_sums(sums: Dict[str, Any]) -> Dict[str, float]:
    """Host-side normalisation: ``X_sum / X_count`` (or ``/ count``); counts are kept as they are.

    >>> metrics_from_sums({"loss_sum": 6.0, "count": 3.0, "abs_error_sum": 3.0})
    {'loss': 2.0, 'abs_error': 1.0, 'count': 3.0}
    """
    sums = {k: float(v) for k, v in sums.items()}
    out = {}
    for key, value in sums.items():
        if key.endswith("_sum"):
            base = key[: -len("_sum")]
            denom = sums.get(f"{base}_count", sums.get("count", 0.0))
            out[base] = value / denom if denom > 0 else float("nan")
    out.update({k: v for k, v in sums.items() if k == "count" or k.endswith("_count")})
    return out


def _check_sums(sums: Dict[str, Any]) -> None:
    if "count" not in sums:
        raise KeyError("loss_fn must return sums with a 'count' entry (number of real items)")


def _mean_float_leaves(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, _AXIS) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _unstack(batch: Any) -> Any:
    return jax.tree.map(lambda x: x[0], batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    mesh: Optional[Mesh] = None, ema_decay: Optional[float] = None,
                    donate: bool = True, compiler_options: Optional[Mapping[str, Any]] = None
                    ) -> Callable[[TrainState, Any], Tuple[TrainState, Dict]]:
    """Builds the jitted ``train_step(state, batch) -> (state, sums)``.

    Args:
        loss_fn: the objective (see the module docstring).
        optimizer: an optax transformation.
        mesh: ``None`` for one device (``batch`` without device axis), or a :func:`data_mesh`, in
            which case the batch leaves are ``[D, ...]`` (host NumPy or already sharded).
        ema_decay: if given, ``ema_params <- d * ema_params + (1 - d) * params`` after each update,
            with ``d = min(ema_decay, (1 + t) / (10 + t))`` at step ``t`` (the state must have been
            created with ``ema=True``). The warm-up keeps the average from being dominated by the
            initial parameters for the first ~1/(1 - ema_decay) steps, when it is evaluated early.
        donate: donate the old state's buffers to the new one (saves memory; the old state is
            invalid after the call).
        compiler_options: XLA options on top of the library's (``segnn_jax.compile_options``),
            e.g. ``{"xla_cpu_use_fusion_emitters": False}``.

    Returns:
        ``train_step``; the returned sums are device scalars summed over all devices:
        ``loss_sum``, ``count``, the task's other sums and ``grad_norm`` (global norm of the
        normalised gradient, before clipping). Reading them forces a device sync, so read them only
        every few steps.
    """

    def local_grads(params, model_state, batch, rng, total_count: Callable):
        def objective(p):
            with differentiated_hybrid():  # every product here is differentiated
                loss_sum, (sums, new_model_state) = loss_fn(p, model_state, batch, rng, True)
            _check_sums(sums)
            # The count does not depend on the parameters; stop_gradient keeps it out of the graph.
            total = jnp.maximum(total_count(jax.lax.stop_gradient(sums["count"])), 1)
            return loss_sum / total, (loss_sum, sums, new_model_state)

        return jax.grad(objective, has_aux=True)(params)

    def update(state: TrainState, grads, loss_sum, sums, new_model_state):
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_decay is not None:
            if ema is None:
                raise ValueError("ema_decay given but the TrainState has no ema_params; "
                                 "create it with init_train_state(..., ema=True)")
            t = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
            ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                               ema, params)
        new_state = TrainState(params, opt_state, new_model_state, state.step + 1,
                               state.rng, ema)
        out = dict(sums, loss_sum=loss_sum, grad_norm=grad_norm)
        return new_state, out

    if mesh is None:
        def single(state: TrainState, batch):
            rng, step_rng = jax.random.split(state.rng)
            grads, (loss_sum, sums, new_model_state) = local_grads(
                state.params, state.model_state, batch, step_rng, lambda c: c)
            return update(state._replace(rng=rng), grads, loss_sum, sums, new_model_state)

        return jit(single, donate_argnums=(0,) if donate else (),
                   compiler_options=compiler_options)

    def per_device(state: TrainState, batch):
        batch = _unstack(batch)
        rng, step_rng = jax.random.split(state.rng)
        # Different randomness on each device, as if each device held different items.
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(_AXIS))
        grads, (loss_sum, sums, new_model_state) = local_grads(
            state.params, state.model_state, batch, step_rng, lambda c: jax.lax.psum(c, _AXIS))
        grads = jax.lax.psum(grads, _AXIS)
        loss_sum, sums = jax.lax.psum((loss_sum, sums), _AXIS)
        new_model_state = _mean_float_leaves(new_model_state)
        return update(state._replace(rng=rng), grads, loss_sum, sums, new_model_state)

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(_AXIS)), out_specs=(P(), P()),
                            check_vma=False)
    jitted = jit(sharded, donate_argnums=(0,) if donate else (),
                 compiler_options=compiler_options)

    def train_step(state: TrainState, batch):
        return jitted(state, _place(batch, mesh))

    return train_step


def _place(batch: Any, mesh: Mesh) -> Any:
    leaves = jax.tree.leaves(batch)
    if leaves and all(isinstance(x, jax.Array) and not isinstance(x, np.ndarray)
                      and len(x.sharding.device_set) == mesh.devices.size for x in leaves):
        return batch
    return shard_batch(batch, mesh)


def make_eval_step(loss_fn: LossFn, *, mesh: Optional[Mesh] = None,
                   compiler_options: Optional[Mapping[str, Any]] = None
                   ) -> Callable[[Any, Any, Any], Dict[str, jnp.ndarray]]:
    """Builds the jitted ``eval_step(params, model_state, batch) -> sums``.

    ``loss_fn`` runs with ``is_training=False`` and a fixed key. The sums (``loss_sum``, ``count``
    and the task's metric sums) are added over devices; accumulate them over batches and normalise
    once with :func:`metrics_from_sums`, so every item weighs the same whatever the batching.

    Args:
        loss_fn: the objective (see the module docstring).
        mesh: as in :func:`make_train_step`.
        compiler_options: as in :func:`make_train_step`.
    """
    rng = jax.random.PRNGKey(0)

    def local(params, model_state, batch):
        loss_sum, (sums, _) = loss_fn(params, model_state, batch, rng, False)
        _check_sums(sums)
        return dict(sums, loss_sum=loss_sum)

    if mesh is None:
        return jit(local, compiler_options=compiler_options)

    def per_device(params, model_state, batch):
        return jax.lax.psum(local(params, model_state, _unstack(batch)), _AXIS)

    jitted = jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(_AXIS)),
                               out_specs=P(), check_vma=False), compiler_options=compiler_options)

    def eval_step(params, model_state, batch):
        return jitted(params, model_state, _place(batch, mesh))

    return eval_step
