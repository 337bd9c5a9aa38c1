"""Tiny models and raw-input pipelines shared by the model tests."""

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import segnn_jax as sj


def featurize(graph, positions=None, velocities=None, lmax=1):
    """Raw positions and velocities to SEGNN inputs, centred on each graph's centroid."""
    positions = graph.nodes["positions"] if positions is None else positions
    velocities = graph.nodes["velocities"] if velocities is None else velocities
    n_nodes = positions.shape[0]
    vectors = sj.edge_vectors(graph, positions)
    edge_attr = sj.edge_attributes(vectors, lmax)
    node_attr = sj.node_attributes(edge_attr, graph.receivers, n_nodes, sj.edge_mask(graph),
                                   physical_vectors=[velocities])
    graph_index = sj.node_graph_index(graph, n_nodes)
    mask = sj.node_mask(graph, n_nodes)[:, None].astype(positions.dtype)
    centroid = jax.ops.segment_sum(positions * mask, graph_index, graph.n_node.shape[0])
    centroid = centroid / jnp.maximum(graph.n_node, 1)[:, None].astype(positions.dtype)
    speed = sj.safe_norm(velocities, keepdims=True)
    features = e3nn.concatenate([
        e3nn.IrrepsArray("1o", (positions - centroid[graph_index]) * mask),
        e3nn.IrrepsArray("1o", velocities),
        e3nn.IrrepsArray("0e", speed),
    ])
    extra = e3nn.IrrepsArray("1x0e", sj.safe_norm(vectors, keepdims=True))
    return sj.SteerableGraphsTuple(graph, features, node_attr, edge_attr, extra)


def make_model(network="segnn", task="node", norm=None, pool="avg", layers=2, lmax=1, row_tile=None,
               compute_dtype=None, contraction_order="couple_first", scan_layers=False,
               hidden=None, edge_frame=False):
    """A transformed tiny network on raw graphs: ``apply(params, state, graph, pos, vel)``."""
    if hidden is None:
        hidden = "4x0e+2x1o" if lmax == 1 else "4x0e+2x1o+1x2e"
    output = "1x1o" if task == "node" else "2x0e"

    def forward(graph, positions, velocities, is_training=False):
        inputs = featurize(graph, positions, velocities, lmax)
        if network == "segnn":
            model = sj.SEGNN(hidden, output, layers, task=task, norm=norm, pool=pool,
                             row_tile=row_tile, compute_dtype=compute_dtype,
                             contraction_order=contraction_order, scan_layers=scan_layers,
                             edge_frame=edge_frame)
        else:
            model = sj.SEConv(hidden, output, layers, task=task, norm=norm, pool=pool,
                              nonlinear=network == "seconv_nonlinear", row_tile=row_tile,
                              compute_dtype=compute_dtype, contraction_order=contraction_order,
                              scan_layers=scan_layers, edge_frame=edge_frame)
        return model(inputs, is_training).array

    return hk.without_apply_rng(sj.transform_with_jitted_init(forward))


def random_graph(rng, n_nodes, kind="full", cutoff=1.5):
    positions = rng.normal(size=(n_nodes, 3))
    velocities = rng.normal(size=(n_nodes, 3))
    if kind == "full":
        senders, receivers = sj.fully_connected_edges(n_nodes)
    else:
        senders, receivers = sj.radius_graph_edges(positions, cutoff)
    return sj.make_graph(positions.astype(np.float32), senders, receivers,
                         nodes={"velocities": velocities.astype(np.float32)})


def pad(graphs, n_node, n_edge, n_graph):
    return sj.pad_graph(sj.batch_graphs(graphs), n_node, n_edge, n_graph)


def to_device(graph, dtype=jnp.float32):
    """Arrays to JAX, floating ones cast to ``dtype``."""
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree_util.tree_map(cast, graph)


def tiny_graphs(n, seed):
    """n small fully connected graphs with 2-feature nodes and one scalar target each."""
    rng = np.random.default_rng(seed)
    graphs = []
    for _ in range(n):
        k = int(rng.integers(2, 6))
        senders, receivers = sj.fully_connected_edges(k)
        graphs.append(sj.make_graph(rng.normal(size=(k, 3)).astype(np.float32), senders, receivers,
                                 nodes={"features": rng.normal(size=(k, 2)).astype(np.float32)},
                                 globals={"targets": rng.normal(size=(1, 1)).astype(np.float32)}))
    return graphs


def message_product_inputs(keys, attr_irreps, out_irreps):
    """A message-like tensor product on 5 nodes and 9 edges: gathered receiver and sender features
    (``3x0e+2x1o``) and edge scalars (``2x0e``) times spherical harmonics of random vectors.

    Returns ``(spec, weights, nodes, extra, senders, receivers, attr)``.
    """
    from segnn_jax import tensor_product as tp

    nodes = e3nn.normal("3x0e+2x1o", next(keys), (5,))
    extra = e3nn.normal("2x0e", next(keys), (9,))
    senders = jax.random.randint(next(keys), (9,), 0, 5)
    receivers = jax.random.randint(next(keys), (9,), 0, 5)
    attr = e3nn.spherical_harmonics(attr_irreps, jax.random.normal(next(keys), (9, 3)), True)
    spec = tp.make_spec(["3x0e+2x1o", "3x0e+2x1o", "2x0e"], attr.irreps, out_irreps)
    weights = tp.init_weights(next(keys), spec)
    return spec, weights, nodes, extra, senders, receivers, attr

