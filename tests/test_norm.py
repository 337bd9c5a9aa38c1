"""Instance and batch normalisation: per-graph statistics, padding excluded, equivariance."""

import e3nn_jax as e3nn
import haiku as hk
import jax.numpy as jnp
import numpy as np

from segnn_jax import norm


def test_instance_norm_is_per_graph_and_skips_padding(keys):
    x = e3nn.normal("3x0e+2x1o", next(keys), (7,))
    graph_index = jnp.array([0, 0, 0, 1, 1, 2, 2])
    mask = jnp.array([True, True, True, True, True, False, False])
    out = norm.instance_norm(x, graph_index, mask, 3)
    # Graph 1 alone gives the same result as inside the batch.
    alone = norm.instance_norm(e3nn.IrrepsArray(x.irreps, x.array[3:5]),
                               jnp.zeros(2, int), jnp.ones(2, bool), 1)
    np.testing.assert_allclose(out.array[3:5], alone.array, rtol=1e-5, atol=1e-6)
    # Scalars are centred and every channel has unit mean power within each real graph.
    for nodes in (slice(0, 3), slice(3, 5)):
        block = out.array[nodes]
        np.testing.assert_allclose(block[:, :3].mean(0), 0.0, atol=1e-5)
        power = (block[:, 3:].reshape(-1, 2, 3) ** 2).mean(-1).mean(0)
        np.testing.assert_allclose(power, 1.0, rtol=1e-3)
    np.testing.assert_array_equal(out.array[5:], 0.0)


def test_instance_norm_is_equivariant(keys):
    x = e3nn.normal("2x0e+2x1o+1x2e", next(keys), (6,))
    index, mask = jnp.array([0, 0, 0, 1, 1, 1]), jnp.ones(6, bool)
    rotation = -e3nn.rand_matrix(next(keys), ())
    out = norm.instance_norm(x.transform_by_matrix(rotation), index, mask, 2)
    expected = norm.instance_norm(x, index, mask, 2).transform_by_matrix(rotation)
    np.testing.assert_allclose(out.array, expected.array, rtol=1e-4, atol=1e-5)


def test_batch_norm_statistics_skip_padding_and_running_averages_are_used_in_eval(keys):
    x = e3nn.normal("2x0e+1x1o", next(keys), (6,))
    mask = jnp.array([True, True, True, True, False, False])
    f = hk.without_apply_rng(hk.transform_with_state(lambda x, m, t: norm.BatchNorm(momentum=1.0)(x, m, t)))
    params, state = f.init(next(keys), x, mask, True)
    out, state = f.apply(params, state, x, mask, True)
    polluted = e3nn.IrrepsArray(x.irreps, x.array.at[4:].set(1e3))
    out_polluted, state_polluted = f.apply(params, state, polluted, mask, True)
    np.testing.assert_allclose(out.array[:4], out_polluted.array[:4], rtol=1e-5)
    np.testing.assert_array_equal(out.array[4:], 0.0)
    # With momentum 1 the running statistics are the last batch's: evaluation then reproduces training.
    evaluated, _ = f.apply(params, state, x, mask, False)
    np.testing.assert_allclose(evaluated.array, out.array, rtol=1e-4, atol=1e-6)
