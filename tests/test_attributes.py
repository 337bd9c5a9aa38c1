"""Attributes from raw geometry: harmonics, node means, isolated nodes, padding-safe norms."""

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import segnn_jax as sj


def test_edge_vectors_point_from_receiver_to_sender_and_include_shifts():
    graph = sj.make_graph(np.array([[0.0, 0, 0], [1.0, 2, 3]]), np.array([1]), np.array([0]),
                          edges={"shifts": np.array([[10.0, 0, 0]])})
    np.testing.assert_allclose(sj.edge_vectors(graph), [[11.0, 2, 3]])


@pytest.mark.parametrize("normalization,l0", [("integral", 1 / np.sqrt(4 * np.pi)), ("component", 1.0)])
def test_edge_attributes_normalisation(normalization, l0):
    vectors = jnp.array([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    attr = sj.edge_attributes(vectors, 2, normalization)
    assert attr.irreps == e3nn.Irreps("0e+1o+2e")
    np.testing.assert_allclose(attr.array[:, 0], l0, rtol=1e-6)
    # The l=1 part is l0 * sqrt(3) times the unit vector in both normalisations.
    unit = vectors / np.sqrt((vectors**2).sum(1, keepdims=True))
    np.testing.assert_allclose(attr.array[:, 1:4], l0 * np.sqrt(3) * unit, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="normalization"):
        sj.edge_attributes(vectors, 1, "unit")


def test_node_attributes_mean_physical_vectors_and_isolated_nodes():
    edge_attr = e3nn.IrrepsArray("0e+1o", jnp.array([[0.5, 1.0, 0, 0], [0.5, 0, 1.0, 0], [0.5, 0, 0, 4.0]]))
    receivers = jnp.array([0, 0, 1])
    mask = jnp.array([True, True, False])  # the last edge is padding
    velocity = jnp.array([[0.0, 0, 0], [0, 0, 0], [3.0, 0, 0]])
    attr = sj.node_attributes(edge_attr, receivers, 3, mask, physical_vectors=[velocity],
                              normalization="component")
    np.testing.assert_allclose(attr.array[0], [1.0, 0.5, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(attr.array[1], [1.0, 0.0, 0.0, 0.0], atol=1e-6)  # only padding edges
    np.testing.assert_allclose(attr.array[2], [1.0, np.sqrt(3), 0.0, 0.0], atol=1e-6)  # isolated


def test_safe_norm_has_zero_gradient_at_zero():
    grad = jax.grad(lambda v: sj.safe_norm(v).sum())(jnp.zeros((2, 3)))
    np.testing.assert_array_equal(grad, 0.0)
    np.testing.assert_allclose(sj.safe_norm(jnp.array([3.0, 4.0])), 5.0)


def test_pair_products():
    graph = sj.make_graph(np.zeros((3, 3)) + np.arange(3)[:, None], np.array([0, 1]), np.array([2, 2]))
    np.testing.assert_allclose(sj.pair_products(jnp.array([1.0, -1.0, 2.0]), graph), [2.0, -2.0])
