"""Mixed precision (``compute_dtype``): off is the plain float32 function, on is close to it,
keeps float32 parameters and gradients, and its equivariance error is bounded.

Tolerances (relative to the largest reference magnitude): bfloat16 keeps 8 bits of mantissa, so
every rounded value carries up to 2^-9 = 2e-3 relative error, and a few of them add up per layer.
Measured here: 4e-3 for one tensor product, 8e-3 for the outputs of a two-layer network, and an
equivariance error of 0.6e-2 to 2.5e-2 over six seeds. The bounds are 2e-2 (one product) and 5e-2
(network values, gradients and equivariance error); float16 (11 bits) must do 8 times better.
"""

import re

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import make_model, message_product_inputs, pad, random_graph, to_device

import segnn_jax as sj
from segnn_jax import tensor_product as tp
from segnn_jax.tasks import models
from segnn_jax.training import ConfigError

BOUND_PRODUCT = {"bfloat16": 2e-2, "float16": 2.5e-3}
BOUND_NETWORK = {"bfloat16": 5e-2, "float16": 6e-3}


def _relative_max_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _tree_relative_error(tree, reference):
    """Largest deviation over all leaves, relative to the largest reference value of any leaf."""
    leaves, ref = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(reference)
    scale = max(float(np.max(np.abs(np.asarray(r)))) for r in ref)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(r)))) for x, r in
               zip(leaves, ref)) / scale


def _edge_product(keys):
    """A message-like product: gathered receiver and sender features, edge scalars, l <= 2."""
    spec, weights, nodes, extra, senders, receivers, attr = message_product_inputs(
        keys, "0e+1o+2e", "4x0e+3x1o+1x2e")

    def product(w, n, e, a, compute_dtype):
        return tp.tensor_product(spec, w, [(n, receivers), (n, senders), e], a, compute_dtype).array

    return product, (weights, nodes, extra, attr)


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
def test_tensor_product_close_to_float32(keys, compute_dtype):
    product, args = _edge_product(keys)

    def loss(w, n, e, a, compute_dtype):
        return jnp.sum(jnp.sin(product(w, n, e, a, compute_dtype)))

    run = jax.jit(product, static_argnums=4)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
    reference, low = run(*args, None), run(*args, compute_dtype)
    assert low.dtype == jnp.float32
    error = _relative_max_error(low, reference)
    assert 0 < error < BOUND_PRODUCT[compute_dtype], f"{compute_dtype} output error {error:.1e}"
    grads_reference, grads_low = grad(*args, None), grad(*args, compute_dtype)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads_low))
    for g_low, g_ref in zip(grads_low, grads_reference):  # weights, nodes, extra, attributes
        error = _tree_relative_error(g_low, g_ref)
        assert error < BOUND_PRODUCT[compute_dtype], f"{compute_dtype} gradient error {error:.1e}"


def test_low_precision_is_used_and_accumulates_in_float32(keys):
    """The option is not a no-op: the weight matmuls read the low dtype and return float32, also in
    the backward pass; with the option off no low dtype appears at all."""
    product, args = _edge_product(keys)

    def jaxpr(compute_dtype):
        loss = lambda *a: jnp.sum(product(*a, compute_dtype))
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args))

    assert "bf16" not in jaxpr(None) and "f16" not in jaxpr(None)
    text = jaxpr("bfloat16")
    accumulators = re.findall(r"dot_general\[.*?preferred_element_type=(\w+)", text, re.DOTALL)
    assert "bf16" in text
    assert len(accumulators) == text.count("dot_general[") > 0
    assert set(accumulators) == {"float32"}


def test_option_off_is_the_default(keys):
    """compute_dtype=None traces the very same computation as not passing it (bit-identical)."""
    _, args = _edge_product(keys)
    spec = tp.make_spec(["3x0e+2x1o", "3x0e+2x1o", "2x0e"], args[3].irreps, "4x0e+3x1o+1x2e")
    senders = jnp.arange(9) % 5

    def default(w, n, e, a):
        return tp.tensor_product(spec, w, [(n, senders), (n, senders), e], a).array

    def off(w, n, e, a):
        return tp.tensor_product(spec, w, [(n, senders), (n, senders), e], a, None).array

    assert str(jax.make_jaxpr(default)(*args)) == str(jax.make_jaxpr(off)(*args))
    np.testing.assert_array_equal(jax.jit(off)(*args), jax.jit(default)(*args))


def _network_setup(keys, compute_dtype, task="graph", norm="instance"):
    rng = np.random.default_rng(3)
    graph = to_device(pad([random_graph(rng, 5), random_graph(rng, 4)], 12, 40, 3))
    pos, vel = graph.nodes["positions"], graph.nodes["velocities"]
    plain = make_model("segnn", task, norm)
    mixed = make_model("segnn", task, norm, compute_dtype=compute_dtype)
    params, state = plain.init(next(keys), graph, pos, vel)
    mixed_params, _ = mixed.init(next(keys), graph, pos, vel)
    return plain, mixed, params, mixed_params, state, graph


@pytest.mark.parametrize("compute_dtype", [
    "bfloat16", pytest.param("float16", marks=pytest.mark.slow)])  # float16: same code, 20 s
def test_network_close_to_float32_with_float32_parameters(keys, compute_dtype):
    plain, mixed, params, mixed_params, state, graph = _network_setup(keys, compute_dtype)
    pos, vel = graph.nodes["positions"], graph.nodes["velocities"]
    # Parameters are created float32 (master weights), with the float32 model's structure.
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(mixed_params))
    assert jax.tree_util.tree_structure(mixed_params) == jax.tree_util.tree_structure(params)
    real = np.asarray(sj.graph_mask(graph))

    def loss(params, model):
        out = model.apply(params, state, graph, pos, vel)[0]
        return jnp.sum(jnp.where(real[:, None], jnp.sin(out), 0.0)), out

    results = [jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, model)
               for model in (plain, mixed)]
    (grads_plain, out_plain), (grads_mixed, out_mixed) = results
    assert out_mixed.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads_mixed))
    error = _relative_max_error(out_mixed[real], out_plain[real])
    assert 0 < error < BOUND_NETWORK[compute_dtype], f"{compute_dtype} output error {error:.1e}"
    error = _tree_relative_error(grads_mixed, grads_plain)
    assert error < BOUND_NETWORK[compute_dtype], f"{compute_dtype} gradient error {error:.1e}"


def random_o3(key):
    """A random rotation composed with the inversion: an improper element of O(3)."""
    return -e3nn.rand_matrix(key, ())


def equivariance_error(apply, params, graph, keys, repeats=3):
    """Largest relative error ``max|f(R x) - R f(x)| / max|R f(x)|`` over real nodes and random
    improper rotations, for a node-level ``1x1o`` model."""
    pos, vel = graph.nodes["positions"], graph.nodes["velocities"]
    real = np.asarray(sj.node_mask(graph))
    reference = apply(params, graph, pos, vel)
    errors = []
    for _ in range(repeats):
        rotation = random_o3(next(keys))
        out = apply(params, graph, pos @ rotation.T, vel @ rotation.T)
        expected = reference @ rotation.T  # 1x1o: vectors (the inversion flips them)
        errors.append(_relative_max_error(out[real], expected[real]))
    return max(errors)


def test_equivariance_error_is_bounded(keys):
    """bfloat16 rounds rotated inputs differently, so the model is equivariant only to its
    precision: the error stays below 5e-2, and is far above float32's (< 1e-4)."""
    plain, mixed, params, _, state, graph = _network_setup(keys, "bfloat16", task="node", norm=None)
    errors = {}
    for name, model in (("float32", plain), ("bfloat16", mixed)):
        apply = jax.jit(lambda p, g, x, v, model=model: model.apply(p, state, g, x, v)[0])
        errors[name] = equivariance_error(apply, params, graph, keys)
    assert errors["float32"] < 1e-4
    assert errors["float32"] < errors["bfloat16"] < BOUND_NETWORK["bfloat16"], errors


def test_bad_values_raise_naming_the_option():
    for bad in ("float64", "bf16", "float32", jnp.float32, 16, True):
        with pytest.raises(ValueError, match="compute_dtype"):
            tp.check_compute_dtype(bad)
    assert tp.check_compute_dtype(jnp.bfloat16) == "bfloat16"
    assert tp.check_compute_dtype(None) is None
    for build in (lambda: sj.O3TensorProduct("2x0e", compute_dtype="half"),
                  lambda: sj.SEGNN("4x0e+2x1o", "1x1o", 1, compute_dtype="fp8")):
        with pytest.raises(ValueError, match="compute_dtype"):
            hk.transform(build).apply({}, None)
    with pytest.raises(ValueError, match="compute_dtype='bfloat16' needs backend='e3nn'"):
        hk.transform(lambda: sj.O3TensorProduct("2x0e", compute_dtype="bfloat16",
                                                backend="cuequivariance")).apply({}, None)
    for bad in ({"compute_dtype": "bf16"}, {"compute_dtype": "float32"}, {"compute_dtype": 16},
                {"compute_dtype": True}, {"compute_dtype": "float16", "backend": "cuequivariance"}):
        with pytest.raises(ConfigError, match=r"config\.model\.compute_dtype"):
            models.validate_model_config(bad)


def test_model_config_option():
    for value, expected in (("none", None), (None, None), ("bfloat16", "bfloat16"),
                            ("float16", "float16")):
        assert models.validate_model_config({"compute_dtype": value})["compute_dtype"] == expected
    assert models.validate_model_config({})["compute_dtype"] is None
    factory = models.create_model({"compute_dtype": "bfloat16", "num_layers": 1},
                                  output_irreps="1x1o")
    assert hk.transform(factory).apply({}, None).compute_dtype == "bfloat16"


def test_benchmark_measures_equivariance_and_interleaves(keys):
    """benchmarks/mixed_precision.py on a tiny N-body model (no message-passing layer)."""
    from benchmarks import inputs, mixed_precision, throughput

    arrays = inputs.nbody_batch(n_graphs=3)
    spec = dict(inputs.CONFIGS["nbody"], name="nbody", hidden="2x0e+1x1o", layers=0)
    benches = {v: throughput.build_ours(arrays, spec, compute_dtype=c)
               for v, c in (("float32", None), ("bfloat16", "bfloat16"))}
    rotations = [np.asarray(random_o3(next(keys))) for _ in range(2)]
    errors = {}
    for variant, bench in benches.items():
        bench.compile("forward")
        errors[variant] = mixed_precision.equivariance_error(bench, spec, rotations)
    assert errors["float32"] < 1e-5 < errors["bfloat16"] < BOUND_NETWORK["bfloat16"], errors
    record = mixed_precision.interleaved(benches, "forward", rounds=2, calls=1)
    assert record["float32"]["runs"] == record["bfloat16"]["runs"] == 2
    assert record["ratio_bfloat16_over_float32"] > 0
