"""Message products in the edge frame (segnn_jax.edge_frame): the same function as the plain
tensor product, its gradients, the check of the attributes, and the whole network with it."""

import functools

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import segnn_jax as sj
from segnn_jax import edge_frame
from segnn_jax import tensor_product as tp
from segnn_jax.configs import qm9 as qm9_config
from segnn_jax.layers import gate, gate_irreps
from segnn_jax.tasks import models as model_configs
from segnn_jax.training.config import ConfigError
from model_fixtures import featurize, make_model, pad, random_graph, to_device


def _directions(rng, n_random):
    """Random directions and the awkward ones: the axes (the pole y among them) and both sides of
    the switch between the two constructions of the rotation (|n_z| = 0.9)."""
    special = [[0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0],
               [0, np.sqrt(1 - 0.9001**2), 0.9001], [np.sqrt(1 - 0.8999**2), 0, -0.8999]]
    vectors = np.concatenate([np.array(special), rng.normal(size=(n_random, 3))])
    return vectors * rng.uniform(0.5, 2.0, size=(len(vectors), 1))


def _close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    error = float(np.max(np.abs(actual - expected))) / scale
    assert error <= 1e-5, f"{what}: relative error {error:.1e}"


# (features, attribute lmax, normalisation, output irreps, gated): the message products of the
# shipped configs' kinds, and paths with l1 + l2 + l3 odd (1o x 1o -> 1e, 1o x 2e -> 2o, ...).
CASES = [
    ("4x0e+2x1o+1x2e", 3, "component", "4x0e+2x1o+1x2e", True),
    ("3x0e+2x1o", 1, "integral", "3x0e+2x1o", True),
    ("2x0e+2x1o+1x1e", 2, "norm", "2x0e+1x0o+2x1o+2x1e+1x2o", False),
]


@pytest.mark.parametrize("features,lmax_attr,normalization,out,gated", CASES)
def test_product_in_frame_is_the_tensor_product(features, lmax_attr, normalization, out, gated):
    """Outputs and gradients (weights, features, positions) match the plain product to 1e-5,
    for gathered segments (receiver, sender) and an extra scalar, as in a message."""
    rng = np.random.default_rng(0)
    n_nodes, vectors = 7, _directions(rng, 24)
    n_edges = len(vectors)
    senders = jnp.asarray(rng.integers(0, n_nodes, n_edges))
    receivers = jnp.asarray(rng.integers(0, n_nodes, n_edges))
    nodes = e3nn.normal(features, jax.random.PRNGKey(1), (n_nodes,))
    vectors = jnp.asarray(vectors, jnp.float32)
    irreps_out = gate_irreps(out) if gated else e3nn.Irreps(out)
    attr_irreps = e3nn.Irreps.spherical_harmonics(lmax_attr)
    spec = tp.make_spec([nodes.irreps, nodes.irreps, "1x0e"], attr_irreps, irreps_out)
    weights = tp.init_weights(jax.random.PRNGKey(2), spec)
    finish = (lambda y: gate(y, out)) if gated else (lambda y: y)
    finish_in_frame = (lambda y: edge_frame.gate(y, out)) if gated else (lambda y: y)

    def inputs(nodes, vectors):
        attr = sj.edge_attributes(vectors, lmax_attr, normalization)
        extra = e3nn.IrrepsArray("1x0e", jnp.sum(vectors**2, axis=-1, keepdims=True))
        return [(nodes, receivers), (nodes, senders), extra], attr

    def plain(weights, nodes, vectors):
        segments, attr = inputs(nodes, vectors)
        return finish(tp.tensor_product(spec, weights, segments, attr)).array

    def in_frame(weights, nodes, vectors):
        segments, attr = inputs(nodes, vectors)
        frame = edge_frame.make_frame(attr, jnp.ones((n_edges,), bool), nodes.irreps.lmax)
        x = edge_frame.to_frame(frame, segments)
        return edge_frame.from_frame(frame, finish_in_frame(
            edge_frame.product(spec, weights, x, frame))).array

    _close(jax.jit(in_frame)(weights, nodes, vectors), jax.jit(plain)(weights, nodes, vectors),
           "outputs")
    probe = jax.random.normal(jax.random.PRNGKey(3), (n_edges, irreps_out.dim if not gated
                                                      else e3nn.Irreps(out).dim))

    def grads(fn):
        def loss(*args):
            return jnp.sum(jnp.sin(fn(*args)) * probe)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(weights, nodes, vectors)

    expected, actual = grads(plain), grads(in_frame)
    for n, (a, b) in enumerate(zip(actual[0], expected[0])):
        _close(a, b, f"gradient of {spec.path_name(n)}")
    _close(actual[1].array, expected[1].array, "gradient of the node features")
    _close(actual[2], expected[2], "gradient of the edge vectors")


def _to_frame_by_einsum(frame, segments):
    """The parts of ``to_frame`` written plainly (einsum per irrep, JAX's own derivatives): the
    reference for its broadcast forward and hand-written backward pass."""
    rotated = []
    for array, index in segments:
        array = array.regroup()
        array = array if index is None else array[index]
        rotated.append({ir: jnp.einsum("eij,ecj->eci", frame.matrix(ir.l), chunk) if ir.l else chunk
                        for (mul, ir), chunk in zip(array.irreps, tp.split_chunks(array))
                        if mul > 0})
    irreps = e3nn.Irreps(sum((a.irreps for a, _ in segments), e3nn.Irreps(""))).regroup()
    parts = {}
    for m in edge_frame._orders(irreps.lmax):
        parts[m] = jnp.concatenate([r[ir][:, :, ir.l + m] for _, ir in irreps if ir.l >= abs(m)
                                    for r in rotated if ir in r], axis=-1)
    return parts


def test_to_frame_and_its_backward_pass_match_plain_rotations():
    """Unsorted irreps with a zero multiplicity, a gathered and an edge segment, half-precision
    features: the parts and their derivatives (features, frame matrices) match the reference."""
    rng = np.random.default_rng(5)
    vectors = jnp.asarray(_directions(rng, 6), jnp.float32)
    n_edges, n_nodes = len(vectors), 5
    index = jnp.asarray(rng.integers(0, n_nodes, n_edges))
    nodes = e3nn.normal("1x1o+2x0e+0x2e+1x2e+1x1o", jax.random.PRNGKey(0), (n_nodes,))
    edges = e3nn.normal("1x2e+1x0e", jax.random.PRNGKey(1), (n_edges,))
    frame = edge_frame.make_frame(sj.edge_attributes(vectors, 2), jnp.ones((n_edges,), bool), 2)
    probes = {m: jax.random.normal(jax.random.PRNGKey(10 + m), (n_edges, 8)) for m in range(-2, 3)}

    def loss(fn, nodes_array, edges_array, rotations, wigner):
        framed = frame._replace(rotations=rotations, wigner=wigner)
        parts = fn(framed, [(e3nn.IrrepsArray(nodes.irreps, nodes_array), index),
                            (e3nn.IrrepsArray(edges.irreps, edges_array), None)])
        return sum(jnp.sum(jnp.sin(part) * probes[m][:, :part.shape[1]])
                   for m, part in parts.items()), parts

    for dtype in (jnp.float32, jnp.bfloat16):
        args = (nodes.array.astype(dtype), edges.array.astype(dtype), frame.rotations,
                frame.wigner)
        results = [jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3),
                                    has_aux=True))(*args)
                   for fn in (lambda f, s: edge_frame.to_frame(f, s).parts, _to_frame_by_einsum)]
        (grads, parts), (expected_grads, expected_parts) = results
        assert parts.keys() == expected_parts.keys()
        # bfloat16 cotangents of the features: one rounding of each, a unit in the last place.
        tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
        for m in parts:
            np.testing.assert_allclose(parts[m], expected_parts[m], atol=tolerance, rtol=tolerance)
        for got, expected in zip(jax.tree_util.tree_leaves(grads),
                                 jax.tree_util.tree_leaves(expected_grads)):
            assert got.dtype == expected.dtype
            np.testing.assert_allclose(np.asarray(got, np.float32),
                                       np.asarray(expected, np.float32), atol=tolerance,
                                       rtol=tolerance)


def test_product_in_frame_in_mixed_precision_is_close_to_float32():
    """compute_dtype: the frame's matrix multiplies read bfloat16 and accumulate in float32."""
    rng = np.random.default_rng(2)
    vectors = jnp.asarray(_directions(rng, 8), jnp.float32)
    attr = sj.edge_attributes(vectors, 2)
    features = e3nn.normal("4x0e+2x1o+1x2e", jax.random.PRNGKey(1), (len(vectors),))
    spec = tp.make_spec([features.irreps], attr.irreps, "4x0e+2x1o+1x2e")
    weights = tp.init_weights(jax.random.PRNGKey(2), spec)

    @jax.jit
    def in_frame(weights, features, attr):
        frame = edge_frame.make_frame(attr, jnp.ones((len(vectors),), bool), 2)
        x = edge_frame.to_frame(frame, [features])
        return [edge_frame.from_frame(frame, edge_frame.product(
            spec, weights, x, frame, dtype)).array for dtype in (None, "bfloat16")]

    full, half = in_frame(weights, features, attr)
    assert half.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(full)))
    assert 0 < float(jnp.max(jnp.abs(half - full))) <= 2e-2 * scale


def test_zero_length_edges_carry_nothing_and_other_attributes_give_nan():
    """A real zero-length edge (coincident atoms, attribute (1, 0, ...)) carries no message; a
    real edge whose attribute is no direction's harmonics gets NaN rather than a silently
    different message; padding edges are exempt from both."""
    vectors = jnp.asarray([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.3, 2.0],
                           [0.5, 0.5, 0.5]])
    attr = sj.edge_attributes(vectors, 2)
    # Row 4: harmonics of a vector that is not a unit one (normalize=False), not a direction's.
    attr = e3nn.IrrepsArray(attr.irreps, attr.array.at[4].set(e3nn.spherical_harmonics(
        attr.irreps, vectors[4], normalize=False, normalization="integral").array))
    mask = jnp.asarray([True, True, False, True, True])
    frame = edge_frame.make_frame(attr, mask, 1)
    np.testing.assert_array_equal(frame.valid, [True, True, True, True, False])
    np.testing.assert_array_equal(frame.directed, [True, False, True, True, True])
    features = e3nn.normal("2x0e+1x1o", jax.random.PRNGKey(0), (5,))
    with jax.debug_nans(False):  # NaN is the documented result here
        back = edge_frame.from_frame(frame, edge_frame.to_frame(frame, [features]))
        back = np.asarray(back.array)
    assert np.all(np.isnan(back[4])) and np.all(np.isfinite(back[:4]))
    assert np.all(back[1] == 0.0)
    # Rotating into the frame and back is the identity on the directed edges.
    np.testing.assert_allclose(back[[0, 2, 3]], np.asarray(features.array)[[0, 2, 3]], atol=1e-6)


def test_attributes_of_other_irreps_are_refused():
    for irreps in ("1x0e+1x1o+1x1e", "1x0e", "2x0e+1x1o"):
        attr = e3nn.IrrepsArray(irreps, jnp.ones((3, e3nn.Irreps(irreps).dim)))
        with pytest.raises(ValueError, match="spherical harmonics"):
            edge_frame.make_frame(attr, jnp.ones((3,), bool), 1)


@pytest.mark.parametrize("network,task,norm,layers,lmax", [
    ("segnn", "graph", "instance", 2, 2),  # scanned layers, as the QM9 config
    ("seconv_nonlinear", "node", None, 1, 1),
    ("seconv_linear", "node", None, 1, 1),
])
def test_network_in_edge_frame_is_the_same_network(keys, network, task, norm, layers, lmax):
    """The same parameters give the same outputs and gradients with the messages in the edge
    frame, padding edges included (26 nodes, 80 edges for 9 real nodes)."""
    rng = np.random.default_rng(3)
    batch = to_device(pad([random_graph(rng, 5), random_graph(rng, 4, kind="radius")], 26, 80, 3))
    pos, vel = batch.nodes["positions"], batch.nodes["velocities"]
    models = {flag: make_model(network, task, norm, layers=layers, lmax=lmax,
                               scan_layers=layers > 1, edge_frame=flag,
                               hidden="3x0e+2x1o+1x2e" if lmax == 2 else "3x0e+2x1o")
              for flag in (False, True)}
    params, state = models[False].init(next(keys), batch, pos, vel)
    real = np.asarray(sj.node_mask(batch) if task == "node" else sj.graph_mask(batch))

    def loss(params, positions, flag):
        # Real rows only, as every loss: a padding edge (zero length) carries another message in
        # the frame (its own attribute is not a direction's), which reaches padding nodes only.
        out = models[flag].apply(params, state, batch, positions, vel)[0]
        return jnp.sum(jnp.sin(out[real])), out

    results = {flag: jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(
        params, pos, flag) for flag in models}
    (grads, out), (grads_frame, out_frame) = results[False], results[True]
    _close(np.asarray(out_frame)[real], np.asarray(out)[real], "outputs")
    leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads[0])]
    scale = max(float(np.max(np.abs(g))) for g in leaves)
    for plain, framed in zip(leaves, jax.tree_util.tree_leaves(grads_frame[0])):
        assert float(np.max(np.abs(np.asarray(framed) - plain))) <= 1e-5 * scale
    _close(np.asarray(grads_frame[1])[np.asarray(sj.node_mask(batch))],
           np.asarray(grads[1])[np.asarray(sj.node_mask(batch))], "gradient of the positions")


def test_network_in_edge_frame_is_equivariant(keys):
    rng = np.random.default_rng(0)
    graph = to_device(pad([random_graph(rng, 5), random_graph(rng, 4)], 12, 40, 3))
    model = make_model("segnn", "node", None, layers=1, lmax=2, edge_frame=True,
                       hidden="3x0e+2x1o+1x2e")
    pos, vel = graph.nodes["positions"], graph.nodes["velocities"]
    params, state = model.init(next(keys), graph, pos, vel)
    apply = jax.jit(lambda x, v: model.apply(params, state, graph, x, v)[0])
    reference = apply(pos, vel)
    real = np.asarray(sj.node_mask(graph))
    for _ in range(2):
        rotation = -e3nn.rand_matrix(next(keys), ())  # improper: a rotation and the inversion
        shift = jax.random.normal(next(keys), (3,)) * 3
        out = apply(pos @ rotation.T + shift, vel @ rotation.T)
        expected = e3nn.IrrepsArray("1x1o", reference).transform_by_matrix(rotation).array
        _close(np.asarray(out)[real], np.asarray(expected)[real], "rotated outputs")


def test_coincident_atoms_send_no_message_in_the_edge_frame(keys):
    """Two atoms at one point: finite values and gradients, and the network in the frame equals
    the plain one with the zero-length edges' messages weighted by 0 (edge_weights)."""
    rng = np.random.default_rng(1)
    graph = random_graph(rng, 4)
    positions = np.asarray(graph.nodes["positions"]).copy()
    positions[1] = positions[0]
    graph = to_device(pad([graph._replace(nodes=dict(graph.nodes, positions=positions))],
                          8, 20, 2))
    pos, vel = graph.nodes["positions"], graph.nodes["velocities"]
    lengths = np.linalg.norm(np.asarray(sj.edge_vectors(graph)), axis=-1)
    weights = jnp.asarray((lengths > 0) | ~np.asarray(sj.edge_mask(graph)), jnp.float32)
    assert float(jnp.sum(weights == 0)) == 2  # 0 -> 1 and 1 -> 0

    def forward(positions, frame):
        inputs = featurize(graph, positions, vel)
        if not frame:
            inputs = inputs._replace(edge_weights=weights)
        return sj.SEGNN("4x0e+2x1o", "1x1o", 1, edge_frame=frame)(inputs).array

    models = {frame: hk.without_apply_rng(hk.transform(lambda x, frame=frame: forward(x, frame)))
              for frame in (False, True)}
    params = models[False].init(next(keys), pos)
    real = np.asarray(sj.node_mask(graph))
    results = {}
    for frame, model in models.items():
        def loss(positions):
            out = model.apply(params, positions)
            return jnp.sum(jnp.sin(out[real])), out

        results[frame] = jax.jit(jax.grad(loss, has_aux=True))(pos)
    (grad, out), (grad_frame, out_frame) = results[False], results[True]
    assert np.isfinite(np.asarray(out_frame)[real]).all()
    assert np.isfinite(np.asarray(grad_frame)).all()
    _close(np.asarray(out_frame)[real], np.asarray(out)[real], "outputs")
    _close(np.asarray(grad_frame)[real], np.asarray(grad)[real], "gradient of the positions")


def test_edge_frame_flag_is_checked():
    with pytest.raises(TypeError, match="edge_frame must be True or False"):
        hk.transform(lambda: sj.SEGNN("4x0e+2x1o", "1x1o", 1, edge_frame="yes")).apply({}, None)
    with pytest.raises(ConfigError, match=r"config\.model\.edge_frame: expected true or false"):
        model_configs.validate_model_config({"edge_frame": "yes"})
    assert model_configs.validate_model_config({})["edge_frame"] is False
    assert qm9_config.get_config().model.edge_frame is True
