"""The whole pipeline from raw positions and velocities: equivariance, batching, padding, NaN safety."""

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import segnn_jax as sj
from segnn_jax.tasks import models as model_configs
from segnn_jax.tensor_product import ORDERS
from segnn_jax.training.config import ConfigError
from model_fixtures import featurize, make_model, pad, random_graph, to_device


def random_o3(key, dtype):
    """A random rotation composed with the inversion: an improper element of O(3)."""
    return (-e3nn.rand_matrix(key, (), dtype=dtype)).astype(dtype)


def transform_outputs(out, rotation, task):
    irreps = "1x1o" if task == "node" else "2x0e"
    return e3nn.IrrepsArray(irreps, out).transform_by_matrix(rotation).array


@pytest.mark.parametrize("network,task,norm", [
    ("segnn", "node", None),
    ("segnn", "graph", "instance"),
    ("seconv_nonlinear", "node", None),
    ("seconv_linear", "graph", None),
])
def test_equivariance_from_raw_inputs_float32(keys, network, task, norm):
    _check_equivariance(keys, network, task, norm, jnp.float32, tolerance=1e-4)


def test_equivariance_with_weights_first_contractions(keys):
    _check_equivariance(keys, "segnn", "node", None, jnp.float32, tolerance=1e-4,
                        contraction_order="weights_first")


def test_equivariance_from_raw_inputs_float64(keys):
    with jax.enable_x64(True):
        _check_equivariance(keys, "segnn", "graph", "instance", jnp.float64, tolerance=1e-10)


def _check_equivariance(keys, network, task, norm, dtype, tolerance,
                        contraction_order="couple_first"):
    rng = np.random.default_rng(0)
    graph = to_device(pad([random_graph(rng, 5), random_graph(rng, 4)], 12, 40, 3), dtype)
    model = make_model(network, task, norm, contraction_order=contraction_order)
    pos, vel = graph.nodes["positions"], graph.nodes["velocities"]
    params, state = model.init(next(keys), graph, pos, vel)
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    apply = jax.jit(lambda p, g, x, v: model.apply(p, state, g, x, v)[0])
    reference = apply(params, graph, pos, vel)
    real = np.asarray(sj.node_mask(graph) if task == "node" else sj.graph_mask(graph))

    for _ in range(3):
        rotation = random_o3(next(keys), dtype)
        shift = jax.random.normal(next(keys), (3,), dtype) * 3
        # A permutation of the real nodes within each graph (padding stays put).
        perm = np.concatenate([rng.permutation(5), 5 + rng.permutation(4), np.arange(9, 12)])
        inverse = np.argsort(perm)
        permuted = graph._replace(senders=inverse[np.asarray(graph.senders)],
                                  receivers=inverse[np.asarray(graph.receivers)])
        out = apply(params, permuted, (pos @ rotation.T + shift)[perm], (vel @ rotation.T)[perm])
        if task == "node":
            out = out[inverse]
        expected = transform_outputs(reference, rotation, task)
        error = np.abs(np.asarray(out - expected))[real].max() / np.abs(np.asarray(expected))[real].max()
        assert error < tolerance, f"relative equivariance error {error:.2e}"


@pytest.mark.parametrize("norm", [None, "instance"])
def test_batch_equals_graphs_one_by_one(keys, norm):
    rng = np.random.default_rng(1)
    graphs = [random_graph(rng, n, kind="radius") for n in (6, 3, 5)]
    model = make_model("segnn", "graph", norm)
    batch = to_device(pad(graphs, 20, 64, 5))
    params, state = model.init(next(keys), batch, batch.nodes["positions"], batch.nodes["velocities"])
    apply = jax.jit(lambda g: model.apply(params, state, g, g.nodes["positions"], g.nodes["velocities"])[0])
    together = apply(batch)[:3]
    for index, graph in enumerate(graphs):
        alone = apply(to_device(pad([graph], 20, 64, 5)))[0]
        np.testing.assert_allclose(together[index], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [None, "instance", "batch"])
def test_padding_budget_does_not_change_real_outputs(keys, norm):
    rng = np.random.default_rng(2)
    graphs = [random_graph(rng, 5), random_graph(rng, 3)]
    model = make_model("segnn", "node", norm)
    small, large = to_device(pad(graphs, 9, 26, 3)), to_device(pad(graphs, 16, 40, 5))
    params, state = model.init(next(keys), small, small.nodes["positions"], small.nodes["velocities"])

    def run(g):
        return model.apply(params, state, g, g.nodes["positions"], g.nodes["velocities"], True)

    out_small, state_small = jax.jit(run)(small)
    out_large, state_large = jax.jit(run)(large)
    np.testing.assert_allclose(out_small[:8], out_large[:8], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state_small), jax.tree_util.tree_leaves(state_large)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # batch-norm statistics skip padding


def test_no_gradient_flows_between_graphs(keys):
    rng = np.random.default_rng(3)
    batch = to_device(pad([random_graph(rng, 4), random_graph(rng, 4)], 10, 30, 3))
    model = make_model("segnn", "graph", "instance")
    params, state = model.init(next(keys), batch, batch.nodes["positions"], batch.nodes["velocities"])

    def first_graph_output(positions, velocities):
        return model.apply(params, state, batch, positions, velocities)[0][0].sum()

    grads = jax.jit(jax.grad(first_graph_output, argnums=(0, 1)))(batch.nodes["positions"],
                                                                  batch.nodes["velocities"])
    for grad in grads:
        assert np.abs(grad[:4]).sum() > 0
        np.testing.assert_array_equal(grad[4:], 0.0)


def test_finite_with_padding_isolated_nodes_and_empty_graphs(keys):
    """debug_nans is on for every test: any NaN in values or gradients fails here."""
    rng = np.random.default_rng(4)
    isolated = random_graph(rng, 4, kind="radius", cutoff=1.0)
    far = isolated.nodes["positions"].copy()
    far[0] += 100.0  # node 0 has no neighbour
    isolated = sj.make_graph(far, *sj.radius_graph_edges(far, 1.0),
                             nodes={"velocities": isolated.nodes["velocities"]})
    empty = sj.make_graph(np.zeros((0, 3), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                          nodes={"velocities": np.zeros((0, 3), np.float32)})
    coincident = sj.make_graph(np.zeros((2, 3), np.float32), *sj.fully_connected_edges(2),
                               nodes={"velocities": np.zeros((2, 3), np.float32)})
    batch = to_device(pad([isolated, empty, coincident], 10, 30, 5))
    model = make_model("segnn", "graph", "instance")
    pos, vel = batch.nodes["positions"], batch.nodes["velocities"]
    params, state = model.init(next(keys), batch, pos, vel)

    def loss(p, x, v):
        out = model.apply(p, state, batch, x, v)[0]
        return jnp.sum(jnp.where(sj.graph_mask(batch)[:, None], out, 0.0) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, pos, vel)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    # The isolated node's attribute is (1, 0, 0, 0) plus the harmonics of its velocity alone.
    attr = sj.node_attributes(sj.edge_attributes(sj.edge_vectors(batch), 1), batch.receivers, 10,
                              sj.edge_mask(batch))
    np.testing.assert_allclose(attr.array[0], [1.0, 0.0, 0.0, 0.0])


def test_bad_inputs_give_precise_errors(keys):
    rng = np.random.default_rng(5)
    graph = random_graph(rng, 4)
    inputs = sj.SteerableGraphsTuple(graph, e3nn.ones("2x0e", (4,)), e3nn.ones("0e+1o", (4,)),
                                     e3nn.ones("0e+1o", (12,)))
    def run(st, hidden="4x0e+1x1o"):
        f = hk.transform(lambda s: sj.SEGNN(hidden, "1x0e", 1)(s))
        return f.init(next(keys), st)

    with pytest.raises(ValueError, match="same irreps"):
        run(inputs._replace(node_attributes=e3nn.ones("0e+1o+2e", (4,))))
    with pytest.raises(ValueError, match=r"edge_attributes must have shape \[12, dim\]"):
        run(inputs._replace(edge_attributes=e3nn.ones("0e+1o", (11,))))
    with pytest.raises(ValueError, match="must be invariant"):
        run(inputs._replace(additional_message_features=e3nn.ones("1o", (12,))))
    with pytest.raises(TypeError, match="IrrepsArray"):
        run(inputs._replace(node_features=jnp.ones((4, 2))))
    with pytest.raises(ValueError, match="output_irreps must be k x 0e"):
        hk.transform(lambda: sj.SEGNN("4x0e", "1x1o", 1, task="graph")).init(None)
    with pytest.raises(ValueError, match="norm must be one of"):
        hk.transform(lambda: sj.SEGNNLayer("4x0e", norm="layer")).init(None)
    with pytest.raises(sj.InvalidPositionsError, match="shape"):
        sj.make_graph(np.zeros((4, 2)), *sj.fully_connected_edges(4))
    with pytest.raises(sj.InvalidPositionsError, match="non-finite"):
        sj.validate_positions(np.array([[0.0, np.nan, 0.0]]))
    with pytest.raises(sj.PaddingBudgetError, match="n_node budget 4"):
        sj.pad_graph(graph, 4, 20, 2)
    with pytest.raises(sj.PaddingBudgetError, match="n_edge budget 5"):
        sj.pad_graph(graph, 8, 5, 2)


@pytest.mark.parametrize("network,norm", [("segnn", "instance"), ("segnn", "batch"),
                                          ("seconv_nonlinear", None)])
def test_scanned_layers_equal_unrolled_layers(keys, network, norm):
    """scan_layers=True is the same function: converted parameters give the same outputs."""
    rng = np.random.default_rng(6)
    batch = to_device(pad([random_graph(rng, 5), random_graph(rng, 4)], 12, 40, 3))
    pos, vel = batch.nodes["positions"], batch.nodes["velocities"]
    outputs = {}
    for scan in (False, True):
        def forward(g, x, v, scan=scan):
            inputs = featurize(g, x, v)
            kwargs = dict(task="graph", norm=norm, scan_layers=scan)
            if network == "segnn":
                return sj.SEGNN("4x0e+2x1o", "2x0e", 3, **kwargs)(inputs, True).array
            return sj.SEConv("4x0e+2x1o", "2x0e", 3, nonlinear=True, **kwargs)(inputs, True).array

        outputs[scan] = hk.without_apply_rng(sj.transform_with_jitted_init(forward))
    params, state = outputs[False].init(next(keys), batch, pos, vel)
    unrolled, _ = jax.jit(outputs[False].apply)(params, state, batch, pos, vel)
    stacked_params = sj.stack_layer_params(params, 3)
    stacked_state = sj.stack_layer_params(state, 3)
    scanned, new_state = jax.jit(outputs[True].apply)(stacked_params, stacked_state, batch, pos, vel)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-6)
    template, _ = outputs[True].init(next(keys), batch, pos, vel)
    assert jax.tree_util.tree_structure(template) == jax.tree_util.tree_structure(stacked_params)
    round_trip = sj.unstack_layer_params(stacked_params)
    assert jax.tree_util.tree_structure(round_trip) == jax.tree_util.tree_structure(params)


def test_jitted_init_gives_the_plain_init_and_keeps_flags_static(keys):
    """sj.transform_with_jitted_init: the parameters of Haiku's own init, with ``is_training``
    static whether given by position or by name (the forward branches on it in Python)."""
    def forward(x, is_training=False):
        return sj.O3TensorProduct("2x0e+1x1o")(x).array * (2.0 if is_training else 1.0)

    x = e3nn.normal("3x0e+1x1o", next(keys), (4,))
    key = next(keys)
    plain = hk.transform_with_state(forward).init(key, x, True)
    jitted = sj.transform_with_jitted_init(forward)
    for params_and_state in (jitted.init(key, x, True), jitted.init(key, x, is_training=True)):
        for a, b in zip(jax.tree_util.tree_leaves(params_and_state),
                        jax.tree_util.tree_leaves(plain)):
            np.testing.assert_array_equal(a, b)
    without_flag = sj.transform_with_jitted_init(lambda x: sj.O3TensorProduct("2x0e")(x).array)
    assert jax.tree_util.tree_leaves(without_flag.init(key, x))


def test_row_tiles_are_the_same_function(keys):
    """row_tile (every tensor product in tiles of rows, rematerialised) changes no output or
    gradient: 26 nodes and 80 edges in tiles of 8 leave partial last tiles."""
    rng = np.random.default_rng(7)
    batch = to_device(pad([random_graph(rng, 5), random_graph(rng, 4, kind="radius")], 26, 80, 3))
    pos, vel = batch.nodes["positions"], batch.nodes["velocities"]
    # lmax 1: tiling cuts rows, whatever the irreps; l = 2 only made the test slower to compile.
    models = {tile: make_model("segnn", "graph", "instance", layers=1, lmax=1, row_tile=tile)
              for tile in (None, 8)}
    params, state = models[None].init(next(keys), batch, pos, vel)

    def loss(params, tile):
        out = models[tile].apply(params, state, batch, pos, vel)[0]
        return jnp.sum(jnp.sin(out)), out

    results = {tile: jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, tile)
               for tile in models}
    (grads_plain, out_plain), (grads_tiled, out_tiled) = results[None], results[8]
    np.testing.assert_allclose(out_tiled, out_plain, rtol=1e-5, atol=1e-6)
    plain_leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads_plain)]
    scale = max(float(np.max(np.abs(g))) for g in plain_leaves)  # gradients near 0 differ by rounding
    for plain, tiled in zip(plain_leaves, jax.tree_util.tree_leaves(grads_tiled)):
        assert float(np.max(np.abs(np.asarray(tiled) - plain))) <= 1e-5 * scale


@pytest.mark.parametrize("network,task,norm,layers,scan", [
    ("segnn", "graph", "instance", 1, False),
    ("segnn", "graph", "instance", 2, True),  # scanned layers, as the QM9 config
])
def test_contraction_orders_are_the_same_network(keys, network, task, norm, layers, scan):
    """The same parameters give the same outputs and gradients with either contraction order,
    padding included (26 nodes, 80 edges for 9 real nodes)."""
    rng = np.random.default_rng(3)
    batch = to_device(pad([random_graph(rng, 5), random_graph(rng, 4, kind="radius")], 26, 80, 3))
    pos, vel = batch.nodes["positions"], batch.nodes["velocities"]
    # The hybrid order where the QM9 config uses it: with scanned layers.
    orders = ORDERS if scan else ("couple_first", "weights_first")
    models = {order: make_model(network, task, norm, layers=layers, lmax=1,
                                contraction_order=order, scan_layers=scan)
              for order in orders}
    params, state = models["couple_first"].init(next(keys), batch, pos, vel)
    params_wf, _ = models["weights_first"].init(next(keys), batch, pos, vel)
    assert jax.tree_util.tree_structure(params_wf) == jax.tree_util.tree_structure(params)

    def loss(params, order):
        out = models[order].apply(params, state, batch, pos, vel)[0]
        return jnp.sum(jnp.sin(out)), out

    results = {order: jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, order)
               for order in models}
    grads_cf, out_cf = results["couple_first"]
    leaves_cf = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads_cf)]
    scale = max(float(np.max(np.abs(g))) for g in leaves_cf)
    for order in orders[1:]:
        grads, out = results[order]
        np.testing.assert_allclose(out, out_cf, rtol=1e-5, atol=1e-6)
        for couple_first, other in zip(leaves_cf, jax.tree_util.tree_leaves(grads)):
            assert float(np.max(np.abs(np.asarray(other) - couple_first))) <= 1e-5 * scale, order


def test_bad_contraction_order_is_refused():
    with pytest.raises(ValueError, match="contraction_order|order must be"):
        hk.transform(lambda: sj.SEGNN("4x0e+2x1o", "1x1o", 1, contraction_order="fast")
                     ).apply({}, None)
    with pytest.raises(ValueError, match="contraction_order='weights_first' needs backend='e3nn'"):
        hk.transform(lambda: sj.O3TensorProduct("2x0e", contraction_order="weights_first",
                                                backend="cuequivariance")).apply({}, None)
    for bad in ({"contraction_order": "fast"},
                {"contraction_order": "weights_first", "backend": "cuequivariance"},
                {"contraction_order": "hybrid", "backend": "cuequivariance"}):
        with pytest.raises(ConfigError, match=r"config\.model\.contraction_order"):
            model_configs.validate_model_config(bad)
    config = model_configs.validate_model_config({"contraction_order": "weights_first"})
    assert config["contraction_order"] == "weights_first"
    assert model_configs.validate_model_config({})["contraction_order"] == "couple_first"
