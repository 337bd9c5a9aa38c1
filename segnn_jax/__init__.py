"""segnn_jax: Steerable E(3) Equivariant Graph Neural Networks in JAX, Haiku and e3nn-jax."""

from segnn_jax.artifact import ArtifactError, TrainedModel, load_artifact
from segnn_jax.attributes import (
    SteerableGraphsTuple,
    edge_attributes,
    edge_vectors,
    node_attributes,
    pair_products,
    safe_norm,
)
from segnn_jax.compile_options import compiler_options, jit
from segnn_jax.graph import (
    InvalidPositionsError,
    PaddingBudgetError,
    batch_graphs,
    edge_mask,
    fully_connected_edges,
    graph_mask,
    knn_graph_edges,
    make_graph,
    node_graph_index,
    node_mask,
    pad_graph,
    radius_graph_edges,
    unbatch_graphs,
    unpad_graph,
    validate_positions,
)
from segnn_jax.host_memory import retain_freed_memory
from segnn_jax.irreps import balanced_irreps, count_tensor_product_weights, weight_balanced_irreps
from segnn_jax.layers import O3TensorProduct, O3TensorProductGate, gate, gate_irreps
from segnn_jax.norm import BatchNorm, InstanceNorm
from segnn_jax.segnn import (
    SEGNN,
    SEConv,
    SEConvLayer,
    SEGNNLayer,
    pool_nodes,
    stack_layer_params,
    transform_with_jitted_init,
    unstack_layer_params,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BatchNorm",
    "InstanceNorm",
    "InvalidPositionsError",
    "O3TensorProduct",
    "O3TensorProductGate",
    "PaddingBudgetError",
    "SEConv",
    "SEConvLayer",
    "SEGNN",
    "SEGNNLayer",
    "SteerableGraphsTuple",
    "TrainedModel",
    "balanced_irreps",
    "batch_graphs",
    "compiler_options",
    "count_tensor_product_weights",
    "edge_attributes",
    "edge_mask",
    "edge_vectors",
    "fully_connected_edges",
    "gate",
    "gate_irreps",
    "graph_mask",
    "jit",
    "knn_graph_edges",
    "load_artifact",
    "make_graph",
    "node_attributes",
    "node_graph_index",
    "node_mask",
    "pad_graph",
    "pair_products",
    "pool_nodes",
    "radius_graph_edges",
    "retain_freed_memory",
    "safe_norm",
    "stack_layer_params",
    "transform_with_jitted_init",
    "unbatch_graphs",
    "unpad_graph",
    "unstack_layer_params",
    "validate_positions",
    "weight_balanced_irreps",
]
