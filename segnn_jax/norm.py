"""Equivariant normalisation of steerable node features, per graph (instance) or per batch.

Statistics never include padding nodes: every reduction takes the node mask.

For each channel of each irrep block, scalars (``0e``) are mean-centred, and every channel is divided
by ``sqrt(mean over nodes of mean over components of x**2 + eps)``. Affine: one weight per channel,
one bias per scalar channel.

Shape letters: N nodes, G graphs, C channels of a block, D components of its irrep.
"""

from __future__ import annotations

from typing import Optional, Tuple

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp

__all__ = ["BatchNorm", "InstanceNorm", "apply_affine", "instance_norm", "normalise_with"]

_SCALAR = e3nn.Irrep("0e")


def _dense(x: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
    """Drops e3nn's zero flags, so that every chunk is an array."""
    return e3nn.IrrepsArray(x.irreps, x.array)


def _segment_mean(values: jnp.ndarray, segment_ids: jnp.ndarray, counts: jnp.ndarray,
                  num_segments: int) -> jnp.ndarray:
    total = jax.ops.segment_sum(values, segment_ids, num_segments=num_segments)
    return total / jnp.maximum(counts, 1.0).reshape((-1,) + (1,) * (values.ndim - 1))


def instance_norm(
    x: e3nn.IrrepsArray,  # [N, irreps]
    graph_index: jnp.ndarray,  # [N] int
    node_mask: jnp.ndarray,  # [N] bool
    n_graphs: int,
    eps: float = 1e-5,
) -> e3nn.IrrepsArray:
    """Normalises each graph's nodes with that graph's statistics (no affine part).

    Returns:
        ``[N, irreps]``; padding nodes come out as zeros.
    """
    x = _dense(x)
    mask = node_mask.astype(x.dtype)
    counts = jax.ops.segment_sum(mask, graph_index, num_segments=n_graphs)
    chunks = []
    for (mul, ir), chunk in zip(x.irreps, x.chunks):
        chunk = chunk * mask[:, None, None]  # [N, C, D]
        if ir == _SCALAR:
            mean = _segment_mean(chunk, graph_index, counts, n_graphs)  # [G, C, 1]
            chunk = (chunk - mean[graph_index]) * mask[:, None, None]
        power = _segment_mean(jnp.mean(chunk**2, axis=-1), graph_index, counts, n_graphs)  # [G, C]
        chunks.append(chunk * jax.lax.rsqrt(power + eps)[graph_index][..., None])
    return e3nn.from_chunks(x.irreps, chunks, x.shape[:-1], x.dtype)


def normalise_with(x: e3nn.IrrepsArray, mean: jnp.ndarray, power: jnp.ndarray,
                   eps: float = 1e-5) -> e3nn.IrrepsArray:
    """Normalises with given statistics: ``mean`` ``[n_scalar_channels]``, ``power`` ``[num_irreps]``."""
    x = _dense(x)
    chunks, s, c = [], 0, 0
    for (mul, ir), chunk in zip(x.irreps, x.chunks):
        if ir == _SCALAR:
            chunk = chunk - mean[s:s + mul, None]
            s += mul
        chunks.append(chunk * jax.lax.rsqrt(power[c:c + mul] + eps)[:, None])
        c += mul
    return e3nn.from_chunks(x.irreps, chunks, x.shape[:-1], x.dtype)


def _masked_statistics(x: e3nn.IrrepsArray, node_mask: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    x = _dense(x)
    mask = node_mask.astype(x.dtype)
    count = jnp.maximum(mask.sum(), 1.0)
    means, powers = [], []
    for (mul, ir), chunk in zip(x.irreps, x.chunks):
        chunk = chunk * mask[:, None, None]
        if ir == _SCALAR:
            mean = chunk[..., 0].sum(0) / count
            means.append(mean)
            chunk = (chunk - mean[:, None]) * mask[:, None, None]
        powers.append(jnp.mean(chunk**2, axis=-1).sum(0) / count)
    empty = jnp.zeros((0,), x.dtype)
    return (jnp.concatenate(means) if means else empty), jnp.concatenate(powers)


def apply_affine(x: e3nn.IrrepsArray, weight: jnp.ndarray, bias: jnp.ndarray) -> e3nn.IrrepsArray:
    """Scales every channel by ``weight`` ``[num_irreps]`` and shifts scalars by ``bias``."""
    x = _dense(x)
    chunks, s, c = [], 0, 0
    for (mul, ir), chunk in zip(x.irreps, x.chunks):
        chunk = chunk * weight[c:c + mul, None]
        if ir == _SCALAR:
            chunk = chunk + bias[s:s + mul, None]
            s += mul
        chunks.append(chunk)
        c += mul
    return e3nn.from_chunks(x.irreps, chunks, x.shape[:-1], x.dtype)


def _affine_parameters(x: e3nn.IrrepsArray):
    n_scalars = sum(mul for mul, ir in x.irreps if ir == _SCALAR)
    weight = hk.get_parameter("weight", (x.irreps.num_irreps,), x.dtype, hk.initializers.Constant(1.0))
    bias = hk.get_parameter("bias", (n_scalars,), x.dtype, hk.initializers.Constant(0.0))
    return weight, bias


class InstanceNorm(hk.Module):
    """Per-graph normalisation with a learnable affine part (the SEGNN reference's "instance")."""

    def __init__(self, eps: float = 1e-5, name: Optional[str] = None):
        super().__init__(name=name)
        self.eps = eps

    def __call__(self, x: e3nn.IrrepsArray, graph_index: jnp.ndarray, node_mask: jnp.ndarray,
                 n_graphs: int) -> e3nn.IrrepsArray:
        x = x.regroup()
        weight, bias = _affine_parameters(x)
        return apply_affine(instance_norm(x, graph_index, node_mask, n_graphs, self.eps), weight, bias)


class BatchNorm(hk.Module):
    """Normalisation with statistics over all real nodes (or edges) of the batch.

    Keeps running averages in Haiku state (use ``hk.transform_with_state``); in evaluation
    (``is_training=False``) the running averages are used.
    """

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, name: Optional[str] = None):
        super().__init__(name=name)
        self.momentum = momentum
        self.eps = eps

    def __call__(self, x: e3nn.IrrepsArray, mask: jnp.ndarray, is_training: bool) -> e3nn.IrrepsArray:
        x = x.regroup()
        n_scalars = sum(mul for mul, ir in x.irreps if ir == _SCALAR)
        running_mean = hk.get_state("running_mean", (n_scalars,), x.dtype, jnp.zeros)
        running_power = hk.get_state("running_power", (x.irreps.num_irreps,), x.dtype, jnp.ones)
        if is_training:
            mean, power = _masked_statistics(x, mask)
            hk.set_state("running_mean", (1 - self.momentum) * running_mean + self.momentum * mean)
            hk.set_state("running_power", (1 - self.momentum) * running_power + self.momentum * power)
        else:
            mean, power = running_mean, running_power
        weight, bias = _affine_parameters(x)
        out = apply_affine(normalise_with(x, mean, power, self.eps), weight, bias)
        return e3nn.IrrepsArray(out.irreps, out.array * mask.astype(x.dtype)[:, None])
