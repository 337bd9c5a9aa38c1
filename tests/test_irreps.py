"""Hidden-irreps rules and the exact parameter counts of the reference configurations."""

import e3nn_jax as e3nn
import haiku as hk
import jax
import numpy as np
import pytest

import segnn_jax as sj

SH1 = e3nn.Irreps.spherical_harmonics(1)
SH3 = e3nn.Irreps.spherical_harmonics(3)


def test_weight_balanced_irreps_of_the_reference_configs():
    assert sj.weight_balanced_irreps(64, SH1, lmax=1) == e3nn.Irreps("32x0e+32x1o")
    assert sj.weight_balanced_irreps(128, SH3, lmax=2) == e3nn.Irreps("36x0e+36x1o+36x2e")
    assert sj.weight_balanced_irreps(256, e3nn.Irreps.spherical_harmonics(2), lmax=1,
                                     sh=False) == e3nn.Irreps("188x0e+61x1o")


def test_balanced_irreps_keeps_the_dimension():
    for lmax, dim in [(1, 64), (2, 100), (3, 257)]:
        assert sj.balanced_irreps(lmax, dim).dim == dim
        assert sj.balanced_irreps(lmax, dim, sh_type=False).dim == dim
    assert sj.balanced_irreps(2, 90) == e3nn.Irreps("30x0e+10x1o+6x2e")
    assert sj.balanced_irreps(1, 120, sh_type=False) == e3nn.Irreps("42x0e+13x1o+13x1e")


def _parameter_shapes(network, node_irreps, attr_irreps, extra_irreps):
    n_nodes, n_edges = 3, 6

    def forward():
        graph = sj.make_graph(np.eye(3), *sj.fully_connected_edges(3))
        st = sj.SteerableGraphsTuple(
            graph,
            e3nn.zeros(node_irreps, (n_nodes,)),
            e3nn.zeros(attr_irreps, (n_nodes,)),
            e3nn.zeros(attr_irreps, (n_edges,)),
            e3nn.zeros(extra_irreps, (n_edges,)),
        )
        return network()(st)

    # eval_shape: the full reference models are only traced, never compiled.
    params = jax.eval_shape(hk.transform(forward).init, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda x: int(np.prod(x.shape)), params)


def _count(tree) -> int:
    return sum(jax.tree_util.tree_leaves(tree))


def _split(module_params):
    weights = sum(v for k, v in module_params.items() if k.startswith("w["))
    biases = module_params.get("b", 0)
    return weights, biases


def test_nbody_reference_parameter_count():
    counts = _parameter_shapes(lambda: sj.SEGNN("32x0e+32x1o", "1x1o", 4), "2x1o+1x0e", SH1, "2x0e")
    assert _count(counts) == 147_424
    expected = {  # SEGNN.md §2.6: (weights, biases)
        "segnn/embedding": (192, 32),
        "segnn/layer_0/message_1/~/tensor_product": (12480, 64),
        "segnn/layer_0/message_2/~/tensor_product": (6144, 64),
        "segnn/layer_0/update_1/~/tensor_product": (12288, 64),
        "segnn/layer_0/update_2": (4096, 32),
        "segnn/pre_pool_1/~/tensor_product": (6144, 64),
        "segnn/pre_pool_2": (64, 0),
    }
    for module, wb in expected.items():
        assert _split(counts[module]) == wb, module
    layer = sum(_count(v) for k, v in counts.items() if k.startswith("segnn/layer_0/"))
    assert layer == 35_232


def test_qm9_reference_parameter_count():
    counts = _parameter_shapes(
        lambda: sj.SEGNN("36x0e+36x1o+36x2e", "1x0e", 7, task="graph", pool="avg", norm="instance"),
        "5x0e", SH3, "1x0e")
    assert _count(counts) == 1_033_525
    expected = {
        "segnn/embedding": (540, 36),
        "segnn/layer_0/message_1/~/tensor_product": (49428, 108),
        "segnn/layer_0/message_2/~/tensor_product": (24624, 108),
        "segnn/layer_0/update_1/~/tensor_product": (49248, 108),
        "segnn/layer_0/update_2": (16848, 36),
        "segnn/pre_pool_1/~/tensor_product": (24624, 108),
        "segnn/pre_pool_2": (11664, 108),
        "segnn/post_pool_1/~/tensor_product": (11664, 108),
        "segnn/post_pool_2": (108, 1),
    }
    for module, wb in expected.items():
        assert _split(counts[module]) == wb, module
    assert _count(counts["segnn/layer_0/norm"]) == 144
    layer = sum(_count(v) for k, v in counts.items() if k.startswith("segnn/layer_0/"))
    assert layer == 140_652


def test_count_tensor_product_weights():
    assert sj.count_tensor_product_weights("32x0e+32x1o", SH1, "32x0e+32x1o") == 64**2
    with pytest.raises(ValueError):
        sj.count_tensor_product_weights("2x0e", "1x0e", "foo")
