"""Where the time of a SEGNN training step goes: each block of one layer timed on its own.

For a configuration's batch (default QM9), each block of one message-passing layer is jitted alone and
timed forward and forward+backward (``jax.value_and_grad`` of a scalar with respect to parameters and
inputs, the work a training step does for it), with XLA's FLOP and bytes-accessed estimates:

- ``attributes``: edge vectors, spherical harmonics, node attributes, extra invariants (once per step);
- ``message_1``: the gated tensor product of ``[f_i, f_j, e_ij]`` with the edge attributes;
- ``message_2``: the second gated tensor product of the messages;
- ``aggregate``: the scatter-sum of messages to receivers;
- ``update_1``: the gated tensor product of ``[f_i, m_i]`` with the node attributes;
- ``update_2``: the last tensor product of the update;
- ``norm``: instance norm (only for configurations that use it).

The sum over blocks times the layer count approximates the training step minus embedding, heads and
the optimiser. A micro-benchmark of the channel-mixing contraction in the two memory layouts follows
(:func:`layout_microbenchmark`). Usage::

    python benchmarks/profile_step.py --config qm9 --repeats 5
    python benchmarks/profile_step.py --layout-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np

from benchmarks import common, inputs


def _analysis(compiled) -> dict:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {
        "gflops": analysis.get("flops", 0.0) / 1e9,
        "gbytes": analysis.get("bytes accessed", 0.0) / 1e9,
    }


def profile(name: str, repeats: int, max_seconds: float) -> dict:
    """Per-block forward and forward+backward times of one layer of configuration ``name``."""
    import e3nn_jax as e3nn
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import jraph

    from segnn_jax import attributes
    from segnn_jax.layers import O3TensorProduct, O3TensorProductGate
    from segnn_jax.norm import InstanceNorm

    arrays, spec = inputs.build(name)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    n_nodes, n_graphs = len(arrays["positions"]), len(arrays["n_node"])
    hidden = e3nn.Irreps(spec["hidden"]).regroup()
    graph_index = jnp.asarray(np.repeat(np.arange(n_graphs), arrays["n_node"]))
    node_mask = jnp.ones((n_nodes,), bool)

    def attrs(batch):
        graph = jraph.GraphsTuple(
            nodes={"positions": batch["positions"]},
            edges={"shifts": batch["shifts"]},
            senders=batch["senders"],
            receivers=batch["receivers"],
            n_node=batch["n_node"],
            n_edge=batch["n_edge"],
            globals=None,
        )
        vectors = attributes.edge_vectors(graph)
        edge_attr = attributes.edge_attributes(vectors, spec["lmax"], spec["sh_normalization"])
        physical = (batch["velocities"],) if "velocities" in batch else ()
        node_attr = attributes.node_attributes(
            edge_attr,
            batch["receivers"],
            n_nodes,
            physical_vectors=physical,
            normalization=spec["sh_normalization"],
        )
        distance = attributes.safe_norm(vectors, keepdims=True)
        if "charges" in batch:
            extra = jnp.concatenate(
                [distance, attributes.pair_products(batch["charges"], graph)], -1
            )
        else:
            extra = distance**2
        return edge_attr, node_attr, e3nn.IrrepsArray(spec["extra"], extra)

    edge_attr, node_attr, extra = jax.jit(attrs)(batch)
    key = jax.random.PRNGKey(0)
    features = e3nn.normal(hidden, key, (n_nodes,))
    messages = e3nn.normal(hidden, jax.random.PRNGKey(1), (len(arrays["senders"]),))
    senders, receivers = batch["senders"], batch["receivers"]

    blocks = {
        "message_1": (
            lambda f, m: O3TensorProductGate(hidden)(
                [(f, receivers), (f, senders), extra], edge_attr
            )
        ),
        "message_2": (lambda f, m: O3TensorProductGate(hidden)(m, edge_attr)),
        "aggregate": (lambda f, m: e3nn.scatter_sum(m, dst=receivers, output_size=n_nodes)),
        "update_1": (lambda f, m: O3TensorProductGate(hidden)([f, f], node_attr)),
        "update_2": (lambda f, m: O3TensorProduct(hidden)(f, node_attr)),
    }
    if spec["norm"] == "instance":
        blocks["norm"] = lambda f, m: InstanceNorm()(f, graph_index, node_mask, n_graphs)

    results = {}

    def measure(label, forward, args):
        def loss(*a):
            return jnp.sum(forward(*a) ** 2)

        fwd = common.compile_timed(forward, *args)[0]
        bwd_fn = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
        bwd = common.compile_timed(bwd_fn, *args)[0]
        entry = {}
        for kind, compiled in (("forward", fwd), ("forward_backward", bwd)):
            common.block(compiled(*args))
            times = common.summarise(
                common.time_calls(lambda c=compiled: c(*args), repeats, max_seconds)
            )
            entry[kind] = dict(
                _analysis(compiled), median_ms=times["median_ms"], iqr_ms=times["iqr_ms"]
            )
            entry[kind]["achieved_gflops"] = entry[kind]["gflops"] / (times["median_ms"] / 1e3)
        results[label] = entry
        print(
            f"{label:10s} fwd {entry['forward']['median_ms']:8.1f} ms ({entry['forward']['gflops']:.2f} GFLOP, "
            f"{entry['forward']['gbytes']:.2f} GB) | fwd+bwd {entry['forward_backward']['median_ms']:8.1f} ms "
            f"({entry['forward_backward']['gflops']:.2f} GFLOP, {entry['forward_backward']['gbytes']:.2f} GB, "
            f"{entry['forward_backward']['achieved_gflops']:.1f} GFLOP/s)",
            flush=True,
        )

    measure("attributes", lambda p: attrs(dict(batch, positions=p))[0].array, (batch["positions"],))
    for label, block in blocks.items():
        transformed = hk.without_apply_rng(
            hk.transform(lambda f, m, block=block: block(f, m).array)
        )
        params = transformed.init(key, features, messages)
        measure(
            label, lambda p, f, m, t=transformed: t.apply(p, f, m), (params, features, messages)
        )
    layer_ms = sum(
        r["forward_backward"]["median_ms"] for k, r in results.items() if k != "attributes"
    )
    return {
        "config": name,
        "nodes": n_nodes,
        "edges": len(arrays["senders"]),
        "layers": spec["layers"],
        "blocks": results,
        "one_layer_forward_backward_ms": layer_ms,
        "all_layers_forward_backward_ms": layer_ms * spec["layers"],
        "versions": common.versions(),
        "cpu": common.cpu_info(),
    }


def layout_microbenchmark(
    n_rows: int = 6024, mul_in: int = 36, dim: int = 5, mul_out: int = 252, repeats: int = 5
) -> dict:
    """The channel-mixing contraction of a tensor product in two memory layouts.

    Defaults: the l = 2 chunk of QM9's ``message_2`` (6,024 edges, 36 input channels, 252 output
    channels over its paths). e3nn's ``[rows, mul, 2l+1]`` layout makes XLA contract the middle axis
    and transpose; the component-major ``[rows * (2l+1), mul]`` layout is one plain matrix multiply.
    """
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(0), (n_rows, mul_in, dim), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), (mul_in, mul_out), jnp.float32)
    x_component_major = jnp.swapaxes(x, 1, 2).reshape(n_rows * dim, mul_in)
    variants = {
        "mul_ir einsum ...ui,uk->...ki": (lambda x, w: jnp.einsum("...ui,uk->...ki", x, w), x),
        "mul_ir einsum ...ui,uk->...ik": (lambda x, w: jnp.einsum("...ui,uk->...ik", x, w), x),
        "ir_mul matmul [rows*i, u] @ [u, k]": (lambda x, w: x @ w, x_component_major),
    }
    gflop = 2.0 * n_rows * mul_in * dim * mul_out / 1e9
    out = {
        "shape": {"rows": n_rows, "mul_in": mul_in, "dim": dim, "mul_out": mul_out},
        "gflop": gflop,
    }
    for label, (fn, arg) in variants.items():
        compiled = jax.jit(fn).lower(arg, w).compile()
        common.block(compiled(arg, w))
        ms = common.summarise(common.time_calls(lambda c=compiled, a=arg: c(a, w), repeats, 10.0))[
            "median_ms"
        ]
        out[label] = {"median_ms": ms, "gflops": gflop / (ms / 1e3)}
        print(f"{label:36s} {ms:7.1f} ms  {gflop / (ms / 1e3):5.1f} GFLOP/s", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="qm9", choices=sorted(inputs.CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--layout-only", action="store_true", help="only the channel-mixing layout micro-benchmark"
    )
    args = parser.parse_args(argv)
    if args.layout_only:
        return layout_microbenchmark(repeats=args.repeats)
    result = profile(args.config, args.repeats, args.max_seconds)
    result["layout_microbenchmark"] = layout_microbenchmark(repeats=args.repeats)
    print(
        f"one layer fwd+bwd {result['one_layer_forward_backward_ms']:.0f} ms; x{result['layers']} layers = "
        f"{result['all_layers_forward_backward_ms']:.0f} ms"
    )
    common.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
