r"""Interleaved A/B of the tensor-product backends on one SEGNN message product (forward + backward).

The first message tensor product of a layer, ``[f_i, f_j, e_ij] x a_ij -> gate irreps`` with the
node features gathered to the edges, as in :class:`segnn_jax.SEGNNLayer`; the jitted gradient of
a linear loss with respect to the weights, the node features and the attributes. Each repeat times
both backends, in alternating order, so that a load change on a shared machine hits both; the
result is the median time of each and the median of the per-repeat ratios.

Usage::

    python benchmarks/backends_ab.py --configs nbody qm9 --repeats 30 \
        --out benchmarks/results/backends_ab_cpu.json

Sizes: ``nbody`` 500 nodes, 2,000 edges, hidden 32x0e+32x1o, harmonics up to l=1, 2 extra
scalars; ``qm9`` 2,300 nodes, 6,300 edges (a batch of 128 molecules at 2 Angstrom), hidden
36x0e+36x1o+36x2e, harmonics up to l=3, 1 extra scalar. Random features and graph.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import common

SIZES = {
    "nbody": {"nodes": 500, "edges": 2000, "hidden": "32x0e+32x1o", "lmax": 1, "extra": 2},
    "qm9": {"nodes": 2300, "edges": 6300, "hidden": "36x0e+36x1o+36x2e", "lmax": 3, "extra": 1},
}


def build(name: str, backend: str, seed: int = 0):
    """The jitted gradient function of config ``name`` with ``backend``, and its arguments."""
    import e3nn_jax as e3nn
    import jax

    from segnn_jax import tensor_product as tp
    from segnn_jax.layers import gate_irreps
    from segnn_jax.tensor_product_cue import product_function

    size = SIZES[name]
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    nodes = e3nn.normal(size["hidden"], next(keys), (size["nodes"],))
    extra = e3nn.normal(f"{size['extra']}x0e", next(keys), (size["edges"],))
    vectors = jax.random.normal(next(keys), (size["edges"], 3))
    attr = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(size["lmax"]), vectors, True)
    senders = jax.random.randint(next(keys), (size["edges"],), 0, size["nodes"])
    receivers = jax.random.randint(next(keys), (size["edges"],), 0, size["nodes"])
    spec = tp.make_spec([nodes.irreps, nodes.irreps, extra.irreps], attr.irreps,
                        gate_irreps(size["hidden"]))
    weights = tp.init_weights(next(keys), spec)
    target = jax.random.normal(next(keys), (size["edges"], spec.irreps_out.dim))
    product = product_function(backend)

    def loss(weights, nodes, attr):
        out = product(spec, weights, [(nodes, receivers), (nodes, senders), extra], attr)
        return (out.array * target).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (weights, nodes, attr)


def compare(name: str, repeats: int) -> dict:
    backends = ("e3nn", "cuequivariance")
    fns, compile_s = {}, {}
    for backend in backends:
        fn, args = build(name, backend)
        start = time.perf_counter()
        common.block(fn(*args))
        compile_s[backend] = time.perf_counter() - start  # compilation and a first call
        fns[backend] = (fn, args)
    times = {backend: [] for backend in backends}
    for r in range(repeats):
        for backend in backends if r % 2 == 0 else backends[::-1]:
            fn, args = fns[backend]
            start = time.perf_counter()
            common.block(fn(*args))
            times[backend].append(time.perf_counter() - start)
    ratios = [c / e for c, e in zip(times["cuequivariance"], times["e3nn"])]
    return {
        "size": SIZES[name],
        "first_call_s": compile_s,
        "median_ms": {b: 1e3 * statistics.median(t) for b, t in times.items()},
        "median_ratio_cue_over_e3nn": statistics.median(ratios),
        "repeats": repeats,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["nbody", "qm9"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import jax

    result = {"what": "message tensor product, jitted gradient w.r.t. weights, features, "
                      "attributes; interleaved A/B",
              "platform": jax.default_backend(), "versions": common.versions(),
              "cpu_before": common.cpu_info(), "configs": {}}
    for name in args.configs:
        result["configs"][name] = record = compare(name, args.repeats)
        print(f"{name}: e3nn {record['median_ms']['e3nn']:.1f} ms, cuequivariance "
              f"{record['median_ms']['cuequivariance']:.1f} ms, ratio "
              f"{record['median_ratio_cue_over_e3nn']:.2f}; first calls "
              + ", ".join(f"{b} {s:.1f} s" for b, s in record["first_call_s"].items()))
    result["cpu_after"] = common.cpu_info()
    print("load average before/after:", result["cpu_before"]["load_average_1_5_15"],
          result["cpu_after"]["load_average_1_5_15"])
    common.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
