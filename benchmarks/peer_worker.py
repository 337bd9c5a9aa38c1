"""Timing server for the earlier JAX port (``segnn-jax`` 0.7 from PyPI), run inside its own venv.

Started by ``benchmarks/peers.py`` as ``<peers-venv>/bin/python benchmarks/peer_worker.py BATCH.npz``;
answers the requests of :func:`common.serve` on stdin/stdout. It builds that port's SEGNN for the
batch's configuration with its public API (``segnn_jax.SEGNN`` under ``hk.transform_with_state``,
``SteerableGraphsTuple``; the caller computes the attributes), mirroring what
``benchmarks/throughput.py`` computes for ours: the same spherical harmonics, node attributes, extra
invariants and loss.

Both projects are importable as ``segnn_jax``: this file must never run with this checkout on
``sys.path`` (as a script, only ``benchmarks/`` is on it, and the driver clears ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common
import inputs


def _safe_norm(vectors, keepdims=False):
    import jax.numpy as jnp

    squared = jnp.sum(vectors**2, axis=-1, keepdims=keepdims)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def build_peer(arrays: dict, spec: dict, seed: int = 0, compiler_options=None
               ) -> common.ModelBench:
    """segnn-jax 0.7's SEGNN for configuration ``spec`` on the batch ``arrays`` (float32)."""
    import e3nn_jax as e3nn
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import jraph

    import segnn_jax

    if segnn_jax.__version__ != "0.7":
        raise RuntimeError(
            f"expected the earlier port segnn_jax 0.7, imported {segnn_jax.__version__} "
            f"from {segnn_jax.__file__}"
        )
    if "atomic_numbers" in arrays:
        raise ValueError("the peer comparison covers the nbody and qm9 configurations only")
    n_nodes = len(arrays["positions"])
    sh_irreps = e3nn.Irreps.spherical_harmonics(spec["lmax"])
    normalization = spec["sh_normalization"]

    def model(batch):
        senders, receivers = batch["senders"], batch["receivers"]
        positions = batch["positions"]
        vectors = positions[senders] - positions[receivers] + batch["shifts"]
        edge_attr = e3nn.spherical_harmonics(
            sh_irreps, vectors, normalize=True, normalization=normalization
        )
        summed = jax.ops.segment_sum(edge_attr.array, receivers, num_segments=n_nodes)
        counts = jax.ops.segment_sum(
            jnp.ones_like(receivers, jnp.float32), receivers, num_segments=n_nodes
        )
        node_attr = summed / jnp.maximum(counts, 1.0)[:, None]
        if "velocities" in batch:
            node_attr = (
                node_attr
                + e3nn.spherical_harmonics(
                    sh_irreps, batch["velocities"], normalize=True, normalization=normalization
                ).array
            )
        node_attr = e3nn.IrrepsArray(sh_irreps, node_attr.at[:, 0].set(1.0))
        distance = _safe_norm(vectors, keepdims=True)
        if "charges" in batch:
            extra = jnp.concatenate(
                [distance, batch["charges"][senders] * batch["charges"][receivers]], -1
            )
        else:
            extra = distance**2
        graph = jraph.GraphsTuple(
            nodes=e3nn.IrrepsArray(spec["input"], batch["features"]),
            edges=None,
            senders=senders,
            receivers=receivers,
            n_node=batch["n_node"],
            n_edge=batch["n_edge"],
            globals=None,
        )
        st_graph = segnn_jax.SteerableGraphsTuple(
            graph=graph,
            node_attributes=node_attr,
            edge_attributes=edge_attr,
            additional_message_features=e3nn.IrrepsArray(spec["extra"], extra),
        )
        network = segnn_jax.SEGNN(
            hidden_irreps=e3nn.Irreps(spec["hidden"]),
            output_irreps=e3nn.Irreps(spec["output"]),
            num_layers=spec["layers"],
            norm=spec["norm"],
            pool=spec["pool"],
            task=spec["task"],
        )
        return network(st_graph)

    transformed = hk.transform_with_state(model)
    batch = {key: jnp.asarray(value) for key, value in arrays.items()}
    params, state = transformed.init(jax.random.PRNGKey(seed), batch)

    def apply(params, state, batch):
        return transformed.apply(params, state, None, batch)

    return common.ModelBench(apply, params, state, batch, spec["loss"],
                             compiler_options=compiler_options)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        raise SystemExit("usage: peer_worker.py BATCH.npz [COMPILER_OPTIONS_JSON]")
    common.retain_freed_host_memory()  # the policy ours runs under (peers.py records it)
    arrays, spec = inputs.load(Path(argv[0]))
    options = json.loads(argv[1]) if len(argv) == 2 else None
    common.serve(build_peer(arrays, spec, compiler_options=options))


if __name__ == "__main__":
    main()
