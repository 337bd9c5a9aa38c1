"""The weighted tensor product against a direct (dense Clebsch-Gordan) evaluation, and its properties."""

import functools

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from model_fixtures import message_product_inputs

from segnn_jax import tensor_product as tp


def direct_tensor_product(spec, weights, x1, x2):
    """out_w = sum_paths sqrt(2l+1) W[u,v,w] CG[i,j,k] x1[u,i] x2[v,j], path by path."""
    x1 = x1.regroup()
    x2 = x2 if x2 is not None else e3nn.ones("0e", x1.shape[:-1])
    outputs = [0.0] * len(spec.irreps_out)
    for path, w in zip(spec.paths, weights):
        ir1, ir2 = spec.irreps_in1[path.i1].ir, x2.irreps[path.i2].ir
        ir_out = spec.irreps_out[path.i_out].ir
        cg = np.sqrt(ir_out.dim) * e3nn.clebsch_gordan(ir1.l, ir2.l, ir_out.l)
        outputs[path.i_out] = outputs[path.i_out] + jnp.einsum(
            "...ui,...vj,ijk,uvw->...wk", x1.chunks[path.i1], x2.chunks[path.i2], cg, w)
    chunks = [o if not isinstance(o, float) else jnp.zeros(x1.shape[:-1] + (mul, ir.dim))
              for o, (mul, ir) in zip(outputs, spec.irreps_out)]
    return e3nn.from_chunks(spec.irreps_out, chunks, x1.shape[:-1], x1.dtype)


CASES = [
    ("3x0e+2x1o", "0e+1o", "4x0e+3x1o"),
    ("2x0e+2x1o+2x2e", "0e+1o+2e+3o", "3x0e+2x1o+2x2e"),
    ("2x0e+1x1e+1x0o", "2x0e+1x1o", "2x0e+1x1o+1x1e+1x0o"),  # mul2 > 1 and odd parities
]


@pytest.mark.parametrize("in1,in2,out", CASES)
def test_matches_direct_evaluation(keys, in1, in2, out):
    spec = tp.make_spec(in1, in2, out)
    weights = tp.init_weights(next(keys), spec)
    x1 = e3nn.normal(in1, next(keys), (7,))
    x2 = e3nn.normal(in2, next(keys), (7,))
    # Compiled, as everywhere in this file: op by op, each operation compiles on its own.
    ours = jax.jit(functools.partial(tp.tensor_product, spec))(weights, [x1], x2)
    direct = jax.jit(functools.partial(direct_tensor_product, spec))(weights, x1, x2)
    np.testing.assert_allclose(ours.array, direct.array, rtol=1e-5, atol=1e-5)


def test_linear_when_second_input_is_absent(keys):
    spec = tp.make_spec("3x0e+2x1o", None, "4x0e+3x1o")
    weights = tp.init_weights(next(keys), spec)
    x1 = e3nn.normal("3x0e+2x1o", next(keys), (6,))
    out = tp.tensor_product(spec, weights, [x1], None)
    np.testing.assert_allclose(out.array, direct_tensor_product(spec, weights, x1, None).array,
                               rtol=1e-5, atol=1e-6)
    assert [p.i2 for p in spec.paths] == [0, 0]


def test_gathered_segments_equal_the_concatenated_input(keys):
    """Segments given as (array, index) are the same function as the gathered, concatenated input."""
    spec, weights, nodes, extra, senders, receivers, attr = message_product_inputs(
        keys, "0e+1o", "4x0e+3x1o")

    def split(w, n):
        return tp.tensor_product(spec, w, [(n, receivers), (n, senders), extra], attr)

    def concatenated(w, n):
        x1 = e3nn.concatenate([n[receivers], n[senders], extra])
        flat = tp.make_spec(x1.irreps, attr.irreps, spec.irreps_out)
        assert flat.weight_shapes == spec.weight_shapes
        return tp.tensor_product(flat, w, [x1], attr)

    np.testing.assert_allclose(jax.jit(split)(weights, nodes).array,
                               jax.jit(concatenated)(weights, nodes).array, rtol=1e-5, atol=1e-5)
    grads = [jax.jit(jax.grad(lambda w, n, f=f: f(w, n).array.sum() ** 2, argnums=(0, 1)))(
        weights, nodes) for f in (split, concatenated)]
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("in1,in2,out", CASES[1:])
def test_equivariant_under_rotation_and_reflection(keys, in1, in2, out):
    spec = tp.make_spec(in1, in2, out)
    weights = tp.init_weights(next(keys), spec)
    x1 = e3nn.normal(in1, next(keys), (4,))
    x2 = e3nn.normal(in2, next(keys), (4,))
    rotation = -e3nn.rand_matrix(next(keys), ())  # rotation times inversion
    product = jax.jit(lambda a, b: tp.tensor_product(spec, weights, [a], b))
    rotated_output = product(x1.transform_by_matrix(rotation), x2.transform_by_matrix(rotation))
    expected = product(x1, x2).transform_by_matrix(rotation)
    np.testing.assert_allclose(rotated_output.array, expected.array, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weight_init,expected", [("reference", 1 / 3), ("unit", 1.0)])
def test_initial_second_moment(keys, weight_init, expected):
    """Unit-variance inputs give outputs with second moment 1/3 (reference scale) or 1 ("unit")."""
    spec = tp.make_spec("32x0e+32x1o+32x2e", "0e+1o+2e", "32x0e+32x1o+32x2e")

    @jax.jit
    def moment(key_w, key_1, key_2):
        weights = tp.init_weights(key_w, spec, weight_init)
        x1 = e3nn.normal(spec.irreps_in1, key_1, (256,))
        x2 = e3nn.normal("0e+1o+2e", key_2, (256,))
        return jnp.mean(tp.tensor_product(spec, weights, [x1], x2).array ** 2)

    moments = [moment(next(keys), next(keys), next(keys)) for _ in range(8)]
    assert abs(float(np.mean(moments)) / expected - 1) < 0.1


def test_gradients_match_finite_differences(keys):
    spec = tp.make_spec("2x0e+1x1o", "0e+1o", "2x0e+1x1o")
    with jax.enable_x64(True):
        weights = [w.astype(jnp.float64) for w in tp.init_weights(next(keys), spec)]
        x1 = e3nn.normal("2x0e+1x1o", next(keys), (3,), dtype=jnp.float64)
        x2 = e3nn.normal("0e+1o", next(keys), (3,), dtype=jnp.float64)

        def f(w, a, b):
            return tp.tensor_product(spec, w, [e3nn.IrrepsArray(x1.irreps, a)],
                                     e3nn.IrrepsArray(x2.irreps, b)).array

        check_grads(jax.jit(f), (weights, x1.array, x2.array), order=2, modes=["rev"], eps=1e-4)


def test_bad_inputs_give_precise_errors(keys):
    with pytest.raises(ValueError, match="cannot be reached"):
        tp.make_spec("2x0e", "0e", "1x1o")
    spec = tp.make_spec("2x0e+1x1o", "0e+1o", "2x0e+1x1o")
    weights = tp.init_weights(next(keys), spec)
    good = e3nn.normal("2x0e+1x1o", next(keys), (3,))
    with pytest.raises(ValueError, match="segment 0 has irreps 2x0e"):
        tp.tensor_product(spec, weights, [e3nn.normal("2x0e", next(keys), (3,))], None)
    with pytest.raises(ValueError, match="x2 has irreps 1x0e"):
        tp.tensor_product(spec, weights, [good], e3nn.normal("0e", next(keys), (3,)))
    with pytest.raises(TypeError, match="IrrepsArray"):
        tp.tensor_product(spec, weights, [good.array], None)
    with pytest.raises(ValueError, match="weight_init"):
        tp.init_bound(spec, "xavier")


def _relative_max_error(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def test_tiled_rows_is_the_same_function(keys):
    """Tiles of edges (gathered node segments, edge segments, attributes) give the untiled values
    and gradients; 9 rows in tiles of 4 leave a partial last tile."""
    tile = 4
    nodes = e3nn.normal("3x0e+2x1o", next(keys), (5,))
    extra = e3nn.normal("2x0e", next(keys), (9,))
    senders = jax.random.randint(next(keys), (9,), 0, 5)
    receivers = jax.random.randint(next(keys), (9,), 0, 5)
    attr = e3nn.spherical_harmonics("0e+1o+2e", jax.random.normal(next(keys), (9, 3)), True)
    spec = tp.make_spec(["3x0e+2x1o", "3x0e+2x1o", "2x0e"], attr.irreps, "4x0e+3x1o+1x2e")
    weights = tp.init_weights(next(keys), spec)

    def product(w, n, e, a, tile):
        def rows(segments, x2):
            out = tp.tensor_product(spec, w, segments, x2)
            return e3nn.scalar_activation(out, [jnp.tanh, None, None])  # a row-wise epilogue
        return tp.tiled_rows(rows, [(n, receivers), (n, senders), e], a, tile).array

    def loss(w, n, e, a, tile):
        return jnp.sum(jnp.sin(product(w, n, e, a, tile)))

    args = (weights, nodes, extra, attr)
    reference = jax.jit(product, static_argnums=4)(*args, None)
    tiled = jax.jit(product, static_argnums=4)(*args, tile)
    assert tiled.shape == reference.shape == (9, spec.irreps_out.dim)
    assert _relative_max_error(tiled, reference) < 1e-5
    grads = [jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(*args, t)
             for t in (None, tile)]
    for untiled, with_tiles in zip(jax.tree_util.tree_leaves(grads[0]),
                                   jax.tree_util.tree_leaves(grads[1])):
        assert _relative_max_error(with_tiles, untiled) < 1e-5


def test_tiled_rows_falls_back_to_one_pass(keys):
    """No tile, rows that fit one tile, or inputs that are not [rows, dim]: fn is called once as is."""
    x = e3nn.normal("2x0e+1x1o", next(keys), (3, 4))  # two leading axes
    calls = []

    def rows(segments, x2):
        calls.append(segments[0].shape)
        return segments[0]

    for tile, data in ((None, x[0]), (8, x[0]), (2, x)):
        np.testing.assert_array_equal(tp.tiled_rows(rows, [data], None, tile).array, data.array)
    assert calls == [(4, 5), (4, 5), (3, 4, 5)]


def test_split_chunks_equal_the_chunks_in_value_and_gradient(keys):
    x = e3nn.normal("3x0e+2x1o+0x2e+1x2e", next(keys), (4,))
    weights = [jax.random.normal(next(keys), (4,) + c.shape[1:]) for c in x.chunks]

    def loss(chunks_of, array):
        chunks = chunks_of(e3nn.IrrepsArray(x.irreps, array))
        return sum(jnp.sum(jnp.sin(c) * w) for c, w in zip(chunks, weights))

    split = tp.split_chunks(x)
    assert [c.shape for c in split] == [c.shape for c in x.chunks]
    for ours, theirs in zip(split, x.chunks):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(jax.grad(lambda a: loss(tp.split_chunks, a))(x.array),
                               jax.grad(lambda a: loss(lambda y: y.chunks, a))(x.array),
                               rtol=1e-6)
    single = e3nn.normal("2x1o", next(keys), (3,))
    np.testing.assert_array_equal(tp.split_chunks(single)[0], single.chunks[0])


@pytest.mark.parametrize("in1,in2,out", CASES)
def test_weights_first_matches_direct_evaluation(keys, in1, in2, out):
    spec = tp.make_spec(in1, in2, out)
    weights = tp.init_weights(next(keys), spec)
    x1 = e3nn.normal(in1, next(keys), (2, 5))  # two leading axes
    x2 = e3nn.normal(in2, next(keys), (2, 5))
    out = jax.jit(lambda w, a, b: tp.tensor_product(spec, w, [a], b, order="weights_first")
                  )(weights, x1, x2)
    assert out.irreps == spec.irreps_out and out.shape == (2, 5, spec.irreps_out.dim)
    direct = jax.jit(lambda w, a, b: direct_tensor_product(spec, w, a, b))(weights, x1, x2)
    np.testing.assert_allclose(out.array, direct.array, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in2", ["0e+1o+2e+3o", "2x0e+1x1o", None])
def test_weights_first_is_the_same_function_in_value_and_gradient(keys, in2):
    """Gathered node segments (mixed on the nodes, then gathered), an edge segment and the
    attributes: outputs and gradients with respect to the weights, the node features, the edge
    features and the attributes (forces flow through them) equal the couple-first ones."""
    hidden = "3x0e+2x1o+2x2e"
    nodes = e3nn.normal(hidden, next(keys), (6,))
    extra = e3nn.normal("2x0e", next(keys), (11,))
    senders = jax.random.randint(next(keys), (11,), 0, 6)
    receivers = jax.random.randint(next(keys), (11,), 0, 6)
    attr = None if in2 is None else e3nn.normal(in2, next(keys), (11,))
    spec = tp.make_spec([hidden, hidden, "2x0e"], in2,
                        "4x0e+3x1o+2x2e" + ("" if in2 is None else "+1x1e"))
    weights = tp.init_weights(next(keys), spec)

    def loss(w, n, e, a, order):
        out = tp.tensor_product(spec, w, [(n, receivers), (n, senders), e], a, order=order)
        return jnp.sum(jnp.sin(out.array))

    args = (weights, nodes, extra, attr)
    argnums = (0, 1, 2) if attr is None else (0, 1, 2, 3)
    results = {order: jax.jit(jax.value_and_grad(loss, argnums=argnums), static_argnums=4)(
        *args, order) for order in tp.ORDERS}
    value_cf, grads_cf = results["couple_first"]
    leaves_cf = jax.tree_util.tree_leaves(grads_cf)
    for order in ("weights_first", "hybrid"):
        value, grads = results[order]
        assert abs(float(value) - float(value_cf)) < 1e-5 * max(1.0, abs(float(value_cf)))
        leaves = jax.tree_util.tree_leaves(grads)
        assert len(leaves) == len(leaves_cf) > 0
        for couple_first, other in zip(leaves_cf, leaves):
            assert _relative_max_error(other, couple_first) < 1e-5, order


def test_hybrid_order_evaluates_couple_first_and_differentiates_weights_first(keys):
    """Run op by op (no jit, so no compiler reordering): the hybrid's value is bit for bit the
    couple-first one when only evaluated and the weights-first one under ``value_and_grad``, whose
    gradients are weights-first's; reverse over reverse (a loss on forces) works, forward mode is
    refused by JAX."""
    spec, weights, nodes, extra, senders, receivers, attr = message_product_inputs(
        keys, "0e+1o", "4x0e+3x1o")

    def product(order, n=nodes.array, w=weights):
        segments = [(e3nn.IrrepsArray(nodes.irreps, n), receivers),
                    (e3nn.IrrepsArray(nodes.irreps, n), senders), extra]
        return tp.tensor_product(spec, w, segments, attr, order=order).array

    def value(order, n=nodes.array, w=weights):
        return jnp.sum(jnp.sin(product(order, n, w)))

    np.testing.assert_array_equal(product("hybrid"), product("couple_first"))
    # The two orders round differently, else this test could not tell them apart.
    assert np.any(np.asarray(product("weights_first")) != np.asarray(product("couple_first")))
    outputs = {}
    for order in ("hybrid", "weights_first"):
        out, pullback = jax.vjp(lambda w, order=order: product(order, w=w), weights)
        outputs[order] = (out, pullback(jnp.cos(out)))
    np.testing.assert_array_equal(outputs["hybrid"][0], outputs["weights_first"][0])
    for a, b in zip(outputs["hybrid"][1][0], outputs["weights_first"][1][0]):
        np.testing.assert_array_equal(a, b)

    @functools.partial(jax.jit, static_argnums=1)
    @jax.grad
    def force_loss_gradient(w, order):
        forces = jax.grad(lambda n: value(order, n=n, w=w))(nodes.array)
        return jnp.sum(forces ** 2)

    for a, b in zip(force_loss_gradient(weights, "hybrid"),
                    force_loss_gradient(weights, "weights_first")):
        assert _relative_max_error(a, b) < 1e-5
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda n: value("hybrid", n=n), (nodes.array,), (nodes.array,))


def test_differentiated_hybrid_traces_weights_first_only(keys, monkeypatch):
    """Inside ``differentiated_hybrid`` a hybrid product is a plain weights-first one: tracing its
    gradient never traces the couple-first coupling, its values and gradients are weights-first's
    bit for bit, forward mode works, and the setting ends with the context, also when the context
    is left by an exception."""
    spec, weights, nodes, extra, senders, receivers, attr = message_product_inputs(
        keys, "0e+1o", "4x0e+3x1o")
    couplings = []
    couple = tp._couple_components
    monkeypatch.setattr(tp, "_couple_components", lambda *a: couplings.append(1) or couple(*a))

    def value(w, n, order):
        segments = [(e3nn.IrrepsArray(nodes.irreps, n), receivers),
                    (e3nn.IrrepsArray(nodes.irreps, n), senders), extra]
        return jnp.sum(jnp.sin(tp.tensor_product(spec, w, segments, attr, order=order).array))

    def gradient(*args):
        # The product inside a jit (so too inside a scan, as SEGNN's scanned layers are) is traced
        # to a jaxpr before it is differentiated, with the custom_vjp's primal.
        inner = jax.jit(value, static_argnums=2)
        return jax.value_and_grad(inner, argnums=(0, 1))(*args)

    def traced_couplings(order):
        jax.clear_caches()  # JAX keeps the traces of a custom_vjp's primal
        couplings.clear()
        jax.make_jaxpr(gradient, static_argnums=2)(weights, nodes.array, order)
        return len(couplings)

    assert traced_couplings("hybrid") > 0  # the couple-first primal, traced though unused
    with tp.differentiated_hybrid():
        assert traced_couplings("hybrid") == 0
        inside = gradient(weights, nodes.array, "hybrid")
        tangent = jax.jvp(lambda n: value(weights, n, "hybrid"), (nodes.array,), (nodes.array,))
    reference = gradient(weights, nodes.array, "weights_first")
    for a, b in zip(jax.tree_util.tree_leaves(inside), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(a, b)
    expected = jax.jvp(lambda n: value(weights, n, "weights_first"), (nodes.array,),
                       (nodes.array,))
    np.testing.assert_array_equal(tangent[1], expected[1])
    with pytest.raises(RuntimeError, match="left early"):
        with tp.differentiated_hybrid():
            raise RuntimeError("left early")
    assert traced_couplings("hybrid") > 0


def test_weights_first_in_mixed_precision_stays_close_to_float32(keys):
    spec, weights, nodes, extra, senders, receivers, attr = message_product_inputs(
        keys, "0e+1o", "4x0e+3x1o")
    segments = [(nodes, receivers), (nodes, senders), extra]

    @jax.jit
    def products(weights, segments, attr):
        return (tp.tensor_product(spec, weights, segments, attr),
                tp.tensor_product(spec, weights, segments, attr, "bfloat16", order="weights_first"))

    exact, low = products(weights, segments, attr)
    assert low.dtype == jnp.float32
    assert 0 < _relative_max_error(low.array, exact.array) < 3e-2


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_both_orders_promote_half_precision_features_with_float32_weights(keys, dtype):
    """Half-precision features and attributes with float32 weights give float32 in either order
    (a scanned layer body needs the same dtype from every tensor product)."""
    spec, weights, nodes, extra, senders, receivers, attr = message_product_inputs(
        keys, "0e+1o", "4x0e+3x1o")
    segments = [(nodes.astype(dtype), receivers), (nodes.astype(dtype), senders),
                extra.astype(dtype)]
    outs = [jax.jit(functools.partial(tp.tensor_product, spec, order=order))(
        weights, segments, attr.astype(dtype)) for order in tp.ORDERS]
    assert [out.dtype for out in outs] == [jnp.float32] * len(tp.ORDERS)
    for out in outs[1:]:
        assert _relative_max_error(out.array, outs[0].array) < 1e-2


def test_unknown_contraction_order_is_refused(keys):
    spec = tp.make_spec("2x0e", None, "2x0e")
    x = e3nn.normal("2x0e", next(keys), (3,))
    with pytest.raises(ValueError, match="couple_first"):
        tp.tensor_product(spec, tp.init_weights(next(keys), spec), [x], None, order="fastest")
