"""The optional cuequivariance backend against the e3nn-jax tensor product (the reference): same
outputs and gradients, for the bare product, a gated layer and a SEGNN, and equivariance."""

import functools
import sys

import e3nn_jax as e3nn
import haiku as hk
import jax
import numpy as np
import pytest
from model_fixtures import featurize, random_graph, to_device

import segnn_jax as sj
from segnn_jax import tensor_product as tp
from segnn_jax import tensor_product_cue as tpc
from segnn_jax.layers import O3TensorProduct, O3TensorProductGate
from segnn_jax.tasks import models
from segnn_jax.training.config import ConfigError

FEATURES, ATTRIBUTES = "4x0e+2x1o+1x2e", "1x0e+1x1o+1x2e"


@pytest.fixture
def cue():
    return pytest.importorskip(
        "cuequivariance_jax",
        reason="cuequivariance-jax not installed (pip install 'segnn[cuequivariance]')")


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    """Leaf by leaf, errors relative to each leaf's largest entry (float32 precision)."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        scale = max(float(np.abs(x).max()), 1e-3)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("in2,out", [
    (ATTRIBUTES, "3x0e+2x1o+2x1e+1x2e"),
    ("2x0e+1x1o", "2x0e+2x1o+1x1e+1x2o"),  # mul2 > 1 and odd parities
    (None, "5x0e+3x1o+1x2e"),  # linear
])
def test_bare_product_and_gradients_match_e3nn(cue, keys, in2, out):
    """Gathered segments, a segment with non-regrouped irreps, several paths per output."""
    nodes = e3nn.normal(FEATURES, next(keys), (5,))
    extra = e3nn.normal("1x1o+2x0e", next(keys), (9,))
    index = jax.random.randint(next(keys), (9,), 0, 5)
    x2 = None if in2 is None else e3nn.normal(in2, next(keys), (9,))
    spec = tp.make_spec([FEATURES, FEATURES, extra.irreps], in2, out)
    weights = tp.init_weights(next(keys), spec, "unit")
    target = e3nn.normal(spec.irreps_out, next(keys), (9,)).array

    def loss(product, weights, nodes, x2):
        y = product(spec, weights, [(nodes, index), (nodes, index[::-1]), extra], x2)
        return (y.array * target).sum(), y.array

    results = [jax.jit(jax.value_and_grad(functools.partial(loss, product), argnums=(0, 1, 2),
                                          has_aux=True))(weights, nodes, x2)
               for product in (tp.tensor_product, tpc.tensor_product_cue)]
    (_, ours), grads = results[0]
    (_, theirs), cue_grads = results[1]
    assert theirs.shape == ours.shape == (9, spec.irreps_out.dim)
    assert_trees_close(theirs, ours)
    assert_trees_close(cue_grads, grads)


def test_bare_product_is_equivariant(cue, keys):
    spec = tp.make_spec(FEATURES, ATTRIBUTES, "3x0e+2x1o+2x1e+1x2e")
    weights = tp.init_weights(next(keys), spec)
    x1 = e3nn.normal(FEATURES, next(keys), (6,))
    x2 = e3nn.normal(ATTRIBUTES, next(keys), (6,))
    rotation = -e3nn.rand_matrix(next(keys), ())  # rotation times inversion
    product = jax.jit(lambda x1, x2: tpc.tensor_product_cue(spec, weights, [x1], x2))
    out = product(x1.transform_by_matrix(rotation), x2.transform_by_matrix(rotation))
    expected = product(x1, x2).transform_by_matrix(rotation)
    assert_trees_close(out.array, expected.array)


def test_gated_layer_matches_e3nn_with_the_same_parameters(cue, keys):
    x = e3nn.normal(FEATURES, next(keys), (7,))
    a = e3nn.spherical_harmonics(ATTRIBUTES, jax.random.normal(next(keys), (7, 3)), True)
    layers = {backend: hk.without_apply_rng(hk.transform(
        lambda x, a, backend=backend: O3TensorProductGate(FEATURES, backend=backend)(x, a)))
        for backend in tpc.BACKENDS}
    params = {b: jax.jit(f.init)(next(keys), x, a) for b, f in layers.items()}
    # One parameter tree: checkpoints load into either backend.
    assert (jax.tree_util.tree_structure(params["e3nn"])
            == jax.tree_util.tree_structure(params["cuequivariance"]))
    assert jax.tree_util.tree_map(np.shape, params["e3nn"]) == jax.tree_util.tree_map(
        np.shape, params["cuequivariance"])
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params["e3nn"])  # non-zero biases

    @functools.partial(jax.jit, static_argnums=0)
    def outputs_and_grads(backend, params, x, a):
        def loss(params, x, a):
            out = layers[backend].apply(params, x, a).array
            return (out ** 2).sum(), out
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, a)

    (_, ours), grads = outputs_and_grads("e3nn", params, x, a)
    (_, theirs), cue_grads = outputs_and_grads("cuequivariance", params, x, a)
    assert_trees_close(theirs, ours)
    assert_trees_close(cue_grads, grads)


def test_two_layer_segnn_matches_e3nn(cue, keys):
    """Forward and gradients (parameters and raw positions) of a 2-layer SEGNN, both backends
    (l <= 1 to keep compilation short; the products above cover l = 2)."""
    graph = to_device(random_graph(np.random.default_rng(0), 5))

    def forward(graph, positions, backend):
        inputs = featurize(graph, positions, lmax=1)
        return sj.SEGNN("4x0e+2x1o", "1x1o", 2, backend=backend)(inputs).array

    model = hk.without_apply_rng(hk.transform(forward))
    positions = graph.nodes["positions"]
    params = jax.jit(model.init, static_argnums=3)(next(keys), graph, positions, "e3nn")

    @functools.partial(jax.jit, static_argnums=2)
    def outputs_and_grads(params, positions, backend):
        def loss(params, positions):
            out = model.apply(params, graph, positions, backend)
            return (out ** 2).sum(), out
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, positions)

    (_, ours), grads = outputs_and_grads(params, positions, "e3nn")
    (_, theirs), cue_grads = outputs_and_grads(params, positions, "cuequivariance")
    assert_trees_close(theirs, ours)
    assert_trees_close(cue_grads, grads)


def test_bad_backend_names_the_option():
    for module in (lambda: O3TensorProduct("2x0e", backend="cue"),
                   lambda: sj.SEGNN("2x0e", "1x0e", 1, backend="torch")):
        with pytest.raises(ValueError, match="backend must be one of"):
            hk.transform(module).init(None)
    with pytest.raises(ConfigError, match=r"config\.model\.backend"):
        models.validate_model_config({"backend": "cuda"})
    assert models.validate_model_config({})["backend"] == "e3nn"


def test_model_config_selects_the_backend(cue):
    factory = models.create_model({"backend": "cuequivariance", "num_layers": 1},
                                  output_irreps="1x1o")
    assert hk.transform(lambda: factory().backend).apply({}, None) == "cuequivariance"


def test_mixed_precision_is_refused(cue, keys):
    spec = tp.make_spec("2x0e", None, "2x0e")
    x = e3nn.normal("2x0e", next(keys), (3,))
    with pytest.raises(ValueError, match="compute_dtype='bfloat16' needs backend='e3nn'"):
        tpc.tensor_product_cue(spec, tp.init_weights(next(keys), spec), [x], None, "bfloat16")


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuequivariance_jax", None)  # import fails
    with pytest.raises(ImportError, match=r"segnn\[cuequivariance\]"):
        tpc.product_function("cuequivariance")
    assert tpc.product_function("e3nn") is tp.tensor_product


def test_backend_benchmark_runs(cue):
    from benchmarks import backends_ab

    record = backends_ab.compare("nbody", repeats=1)
    assert set(record["median_ms"]) == set(tpc.BACKENDS)
    assert all(t > 0 for t in record["median_ms"].values())
