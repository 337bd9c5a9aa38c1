"""Haiku tensor-product layers and gates: equivariance with reflections, biases, initial scale."""

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import segnn_jax as sj
from segnn_jax import tensor_product as tp


def _apply(layer_fn, key, *inputs):
    f = hk.without_apply_rng(hk.transform(layer_fn))
    params = jax.jit(f.init)(key, *inputs)
    return params, jax.jit(f.apply)


@pytest.mark.parametrize("layer", [sj.O3TensorProduct, sj.O3TensorProductGate])
def test_layers_are_equivariant_with_reflections(keys, layer):
    x = e3nn.normal("3x0e+2x1o+1x2e", next(keys), (6,))
    a = e3nn.spherical_harmonics("0e+1o+2e", jax.random.normal(next(keys), (6, 3)), True)
    params, apply = _apply(lambda x, a: layer("4x0e+2x1o+2x2e")(x, a), next(keys), x, a)
    rotation = -e3nn.rand_matrix(next(keys), ())
    out = apply(params, x.transform_by_matrix(rotation), a.transform_by_matrix(rotation))
    expected = apply(params, x, a).transform_by_matrix(rotation)
    np.testing.assert_allclose(out.array, expected.array, rtol=1e-4, atol=1e-5)


def test_biases_only_on_even_scalars(keys):
    x = e3nn.normal("2x0e+1x0o+1x1o", next(keys), (3,))
    params, _ = _apply(lambda x: sj.O3TensorProduct("3x0e+1x0o+2x1o")(x), next(keys), x)
    assert params["o3_tensor_product"]["b"].shape == (3,)
    params, _ = _apply(lambda x: sj.O3TensorProduct("2x1o")(x), next(keys), x)
    assert "b" not in params["o3_tensor_product"]


def test_gate_irreps_and_gating():
    assert sj.gate_irreps("32x0e+32x1o") == e3nn.Irreps("64x0e+32x1o")
    assert sj.gate_irreps("36x0e+36x1o+36x2e") == e3nn.Irreps("108x0e+36x1o+36x2e")
    assert sj.gate_irreps("8x0e") == e3nn.Irreps("8x0e")
    x = e3nn.IrrepsArray("2x0e+1x1o", jnp.array([1.0, -1.0, 2.0, 3.0, 4.0]))
    out = sj.gate(x, "1x0e+1x1o")
    np.testing.assert_allclose(out.array[0], jax.nn.silu(1.0), rtol=1e-6)
    np.testing.assert_allclose(out.array[1:], jax.nn.sigmoid(-1.0) * np.array([2.0, 3.0, 4.0]), rtol=1e-6)
    with pytest.raises(ValueError, match="gate expects"):
        sj.gate(x, "2x0e")


def test_unit_initialisation_gives_unit_second_moment(keys):
    x = e3nn.normal("32x0e+32x1o", next(keys), (512,))
    a = e3nn.normal("0e+1o", next(keys), (512,))
    moments = []
    for _ in range(4):
        params, apply = _apply(lambda x, a: sj.O3TensorProduct("32x0e+32x1o", weight_init="unit")(x, a),
                               next(keys), x, a)
        moments.append(float(jnp.mean(apply(params, x, a).array ** 2)))
    assert 0.9 < np.mean(moments) < 1.1


def test_initialisation_draws_once_and_bounds_every_path(keys):
    """All paths of a layer come from one random draw (a draw per path compiled the generator
    once per path: 16 s of compilation to initialise a 3-layer network of tiny irreps), and each
    path still gets its own uniform bound and its own values."""
    x = e3nn.normal("3x0e+2x1o", next(keys), (4,))
    a = e3nn.spherical_harmonics("0e+1o+2e", jax.random.normal(next(keys), (4, 3)), True)
    f = hk.transform(lambda x, a: sj.O3TensorProduct("4x0e+2x1o+2x2e")(x, a))
    key = next(keys)
    assert str(jax.make_jaxpr(f.init)(key, x, a)).count("random_bits") == 1
    params = jax.jit(f.init)(key, x, a)["o3_tensor_product"]
    spec = tp.make_spec(["3x0e+2x1o"], "0e+1o+2e", "4x0e+2x1o+2x2e")
    drawn = [np.asarray(params[spec.path_name(n)]) for n in range(len(spec.paths))]
    assert len(drawn) == 7
    for w, bound in zip(drawn, tp.init_bound(spec, "reference")):
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.3 * bound
    firsts = [w.ravel()[0] for w in drawn]
    assert len(set(firsts)) == len(firsts)  # no two paths share a slice
