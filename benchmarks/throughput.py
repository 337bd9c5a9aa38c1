r"""Throughput of segnn_jax's SEGNN on the reference configurations (forward and training step).

Per configuration it reports: parameters, nodes, edges, compile time of the forward and of the
training step (``jax.jit(f).lower(...).compile()``, timed separately), peak memory (process peak RSS,
and JAX allocator statistics when the backend has them), forward and training-step times (warm-up,
``block_until_ready``, median and interquartile range of many runs), graphs per second of training,
XLA's FLOP estimate of one training step (``compiled.cost_analysis()``), the achieved GFLOP/s and its
fraction of the machine's measured float32 2048x2048 matrix-multiply rate.

Each configuration is measured in a fresh subprocess so that its peak RSS is its own.

Usage::

    python benchmarks/throughput.py --configs nbody qm9 oc20 --repeats 20 \
        --out benchmarks/results/throughput_cpu.json

``--compute-dtype bfloat16`` (or ``float16``) times the mixed-precision model (float32 parameters,
tensor products in the low dtype with float32 accumulation); ``benchmarks/mixed_precision.py``
compares it with float32 interleaved, with its equivariance error.

The training step is a real one: Adam update of all parameters on an MSE (N-body) or L1 (QM9, OC20)
loss via ``jax.value_and_grad``, jitted as a whole.

``--backend cuequivariance`` times the same model with NVIDIA's cuequivariance-jax running the
tensor products (``segnn_jax.tensor_product_cue``; same parameters and function).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    # Run as a script from a checkout: make this project's segnn_jax importable.
    sys.path.insert(0, str(HERE.parent))

import numpy as np

from benchmarks import common, inputs

DTYPES = ("float32", "float64", "bfloat16")


def build_ours(
    arrays: dict, spec: dict, dtype: str = "float32", seed: int = 0, row_tile=None,
    backend: str = "e3nn",
    scan_layers: bool = False, compute_dtype=None, contraction_order: Optional[str] = None,
    edge_frame: Optional[bool] = None,
) -> common.ModelBench:
    """This project's SEGNN for configuration ``spec`` on the batch ``arrays``, ready to be timed.

    The attributes (spherical harmonics of the edge vectors, node attributes, extra invariants) are
    computed inside the jitted function, as in a real training step.

    Args:
        arrays: from :func:`benchmarks.inputs.build`.
        spec: the configuration's settings.
        dtype: of parameters and floating inputs; ``"float64"`` enables ``jax_enable_x64``.
        seed: of the parameter initialisation.
        row_tile: rows per tile of every tensor product (None: one pass), see ``SEGNN``.
        scan_layers: one scanned layer body over stacked parameters, see ``SEGNN``.
        backend: the tensor-product backend, ``"e3nn"`` or ``"cuequivariance"``, see ``SEGNN``.
        compute_dtype: None, ``"bfloat16"`` or ``"float16"``: mixed precision, see ``SEGNN``.
        contraction_order: ``"couple_first"``, ``"weights_first"`` or ``"hybrid"`` (see
            ``SEGNN``); None or
            ``"config"``: the configuration's (``spec["contraction_order"]``, the faster one
            measured here).
        edge_frame: the message products in the edge frame (see ``SEGNN``); None: the
            configuration's (``spec["edge_frame"]``).
    """
    import e3nn_jax as e3nn
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import jraph

    from segnn_jax import SEGNN, SteerableGraphsTuple, attributes, transform_with_jitted_init
    from segnn_jax.compile_options import resolve_options
    from segnn_jax.tensor_product import differentiated_hybrid

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    n_nodes = len(arrays["positions"])
    contraction_order = resolve_contraction_order(contraction_order, spec, backend)
    edge_frame = resolve_edge_frame(edge_frame, spec)

    def model(batch, is_training):
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
            graph.receivers,
            n_nodes,
            physical_vectors=physical,
            normalization=spec["sh_normalization"],
        )
        distance = attributes.safe_norm(vectors, keepdims=True)
        if "charges" in batch:
            extra = jnp.concatenate(
                [distance, attributes.pair_products(batch["charges"], graph)], axis=-1
            )
        else:
            extra = distance**2
        if "atomic_numbers" in batch:
            embedded = hk.Embed(
                vocab_size=100, embed_dim=spec["embedding_dim"], name="atom_embedding"
            )(batch["atomic_numbers"])
            features = e3nn.IrrepsArray(f"{spec['embedding_dim']}x0e", embedded)
        else:
            features = e3nn.IrrepsArray(spec["input"], batch["features"])
        st_graph = SteerableGraphsTuple(
            graph, features, node_attr, edge_attr, e3nn.IrrepsArray(spec["extra"], extra)
        )
        network = SEGNN(
            spec["hidden"],
            spec["output"],
            spec["layers"],
            task=spec["task"],
            pool=spec["pool"],
            norm=spec["norm"],
            row_tile=row_tile,
            scan_layers=scan_layers,
            backend=backend,
            compute_dtype=compute_dtype,
            contraction_order=contraction_order,
            edge_frame=edge_frame,
        )
        return network(st_graph, is_training).array

    transformed = transform_with_jitted_init(model)
    batch = cast_batch(arrays, dtype)
    params, state = transformed.init(jax.random.PRNGKey(seed), batch, is_training=True)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.dtype(dtype)), params)

    def apply(params, state, batch):
        return transformed.apply(params, state, None, batch, True)

    return common.ModelBench(apply, params, state, batch, spec["loss"],
                             compiler_options=resolve_options(spec.get("compiler_options")),
                             step_context=differentiated_hybrid)


def cast_batch(arrays: dict, dtype: str) -> dict:
    """Device arrays of the batch, floating ones cast to ``dtype`` (targets stay float32)."""
    import jax.numpy as jnp

    out = {}
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating) and key != "targets":
            out[key] = jnp.asarray(value, dtype=jnp.dtype(dtype))
        else:
            out[key] = jnp.asarray(value)
    return out


def resolve_row_tile(option: str):
    """The ``--row-tile`` option as the model config reads it ("none": one pass, or an integer)."""
    from segnn_jax.tasks import models

    return models.validate_model_config({"row_tile": option})["row_tile"]


def resolve_compute_dtype(option):
    """The ``--compute-dtype`` option as the model config reads it (None, "bfloat16", "float16")."""
    from segnn_jax.tasks import models

    return models.validate_model_config({"compute_dtype": option})["compute_dtype"]


def resolve_contraction_order(option: Optional[str], spec: dict, backend: str = "e3nn") -> str:
    """The ``--contraction-order`` option: ``"config"`` or None take the configuration's.

    The configurations' orders are choices for the e3nn-jax path; another backend runs its own
    kernels, so there the configuration's order is couple-first (an explicit order is passed on).
    """
    if option in (None, "config"):
        return spec.get("contraction_order", "couple_first") if backend == "e3nn" \
            else "couple_first"
    from segnn_jax.tasks import models

    return models.validate_model_config(
        {"contraction_order": option, "backend": backend})["contraction_order"]


def resolve_edge_frame(option, spec: dict) -> bool:
    """The ``--edge-frame`` option: ``"on"``/``"off"`` (or a bool), ``"config"``/None take the
    configuration's (``spec["edge_frame"]``, off where absent)."""
    if option in (None, "config"):
        return bool(spec.get("edge_frame", False))
    if isinstance(option, bool):
        return option
    if option not in ("on", "off"):
        raise ValueError(f"edge_frame must be 'config', 'on' or 'off', got {option!r}")
    return option == "on"


def _untiled_step_flops(arrays: dict, spec: dict, dtype: str, compute_dtype=None,
                        contraction_order=None, edge_frame=None):
    import jax

    bench = build_ours(arrays, spec, dtype, row_tile=None, compute_dtype=compute_dtype,
                       contraction_order=contraction_order, edge_frame=edge_frame)
    lowered = jax.jit(bench.step_fn).lower(bench.params, bench.state, bench.opt_state, bench.batch)
    return common.cost_flops(lowered)


def measure(name: str, repeats: int, max_seconds: float, dtype: str, matmul: dict,
            row_tile: str = "none", scan_layers: bool = False, compute_dtype=None,
            backend: str = "e3nn", batches: Optional[Path] = None,
            contraction_order: str = "config", edge_frame: str = "config") -> dict:
    """All figures of one configuration, measured in this process."""
    arrays, spec = inputs.build_or_load(name, batches)
    record = {
        "settings": spec,
        "dtype": dtype,
        "nodes": len(arrays["positions"]),
        "edges": len(arrays["senders"]),
        "graphs": len(arrays["n_node"]),
        "row_tile": resolve_row_tile(row_tile),
        "scan_layers": scan_layers,
        "tensor_product_backend": backend,
        "compute_dtype": resolve_compute_dtype(compute_dtype),
        "contraction_order": resolve_contraction_order(contraction_order, spec, backend),
        "edge_frame": resolve_edge_frame(edge_frame, spec),
    }
    bench = build_ours(arrays, spec, dtype, backend=backend,
                       row_tile=record["row_tile"], scan_layers=scan_layers,
                       compute_dtype=record["compute_dtype"],
                       contraction_order=record["contraction_order"],
                       edge_frame=record["edge_frame"])
    record["params"] = bench.n_params
    record["compiler_options"] = bench.compiler_options  # as resolved: what XLA compiled with
    forward = bench.compile("forward")
    step = bench.compile("train_step")
    record["compile_forward_s"] = forward["compile_s"]
    record["compile_train_step_s"] = step["compile_s"]
    forward_times = common.summarise(bench.time("forward", repeats, max_seconds))
    step_times = common.summarise(bench.time("train_step", repeats, max_seconds))
    record["forward"] = forward_times
    record["train_step"] = step_times
    record["forward_ms"] = forward_times["median_ms"]
    record["train_step_ms"] = step_times["median_ms"]
    record["graphs_per_s"] = record["graphs"] / (step_times["median_ms"] / 1e3)
    record["forward_graphs_per_s"] = record["graphs"] / (forward_times["median_ms"] / 1e3)
    record["flops_source"] = "XLA compiled.cost_analysis()['flops'] of the jitted training step"
    if record["row_tile"] is not None or scan_layers:
        # XLA counts a loop body once, so a tiled or scanned step's estimate misses most of its
        # work: count the same function unrolled and untiled, from its lowering (no compilation).
        step["flops"] = _untiled_step_flops(arrays, spec, dtype, record["compute_dtype"],
                                            record["contraction_order"], record["edge_frame"])
        record["flops_source"] = ("XLA cost analysis of the lowered unrolled, untiled training "
                                  "step (the same function)")
    if step["flops"] is not None:
        record["gflops_per_step"] = step["flops"] / 1e9
        record["gflops_forward"] = forward["flops"] / 1e9 if forward["flops"] is not None else None
        record["achieved_gflops"] = record["gflops_per_step"] / (step_times["median_ms"] / 1e3)
        record["fraction_of_matmul_rate"] = record["achieved_gflops"] / matmul["median_gflops"]
    else:
        record["gflops_per_step"] = record["achieved_gflops"] = None
        record["flops_source"] = "not available from this backend"
    record["peak_rss_mb"] = common.peak_rss_mb()
    record["jax_memory_mb"] = common.device_memory_mb()
    record["load_average_after"] = common.cpu_info()["load_average_1_5_15"]
    return record


def _child(args) -> None:
    record = measure(
        args.child, args.repeats, args.max_seconds, args.dtype, json.loads(args.matmul),
        args.row_tile, args.scan_layers, args.compute_dtype,
        backend=args.backend, batches=args.batches, contraction_order=args.contraction_order,
        edge_frame=args.edge_frame,
    )
    Path(args.child_out).write_text(json.dumps(record))


def _serve(args) -> None:
    arrays, spec = inputs.load(Path(args.serve))
    common.serve(build_ours(arrays, spec, args.dtype, backend=args.backend,
                            row_tile=resolve_row_tile(args.row_tile),
                            scan_layers=args.scan_layers,
                            compute_dtype=resolve_compute_dtype(args.compute_dtype),
                            contraction_order=args.contraction_order,
                            edge_frame=args.edge_frame))


def _print_record(name: str, r: dict) -> None:
    if "error" in r:
        print(f"{name}: FAILED {r['error']}")
        return
    print(
        f"{name}: {r['params']:,} params, {r['nodes']} nodes, {r['edges']} edges, {r['graphs']} graphs"
    )
    print(
        f"  compile forward {r['compile_forward_s']:.1f} s, train step {r['compile_train_step_s']:.1f} s; "
        f"peak RSS {r['peak_rss_mb']:.0f} MiB"
    )
    print(
        f"  forward {r['forward_ms']:.1f} ms (IQR {r['forward']['iqr_ms']:.1f}, {r['forward']['runs']} runs); "
        f"train step {r['train_step_ms']:.1f} ms (IQR {r['train_step']['iqr_ms']:.1f}, "
        f"{r['train_step']['runs']} runs); {r['graphs_per_s']:.1f} graphs/s"
    )
    if r.get("gflops_per_step") is not None:
        print(
            f"  {r['gflops_per_step']:.2f} GFLOP/step -> {r['achieved_gflops']:.1f} GFLOP/s "
            f"({100 * r['fraction_of_matmul_rate']:.0f}% of the matmul rate)"
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=["nbody", "qm9", "oc20"], choices=sorted(inputs.CONFIGS)
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed calls per function (after 2 warm-up)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="stop timing a function after this long (at least 3 calls)",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument(
        "--row-tile",
        default="none",
        help="rows per tensor-product tile: none (one pass, the models' default) or an integer",
    )
    parser.add_argument(
        "--scan-layers", action="store_true",
        help="one scanned layer body over stacked parameters (the QM9 config's default)",
    )
    parser.add_argument(
        "--backend", default="e3nn",
        help="tensor-product backend: e3nn (the default) or cuequivariance (cuequivariance-jax)",
    )
    parser.add_argument(
        "--compute-dtype", default="none",
        help="mixed precision: none (float32 throughout), bfloat16 or float16 tensor products",
    )
    parser.add_argument(
        "--contraction-order", default="config",
        help="tensor-product contraction order: each configuration's (config, the default) or one "
             "for all (a value of the model option contraction_order, e.g. hybrid)",
    )
    parser.add_argument(
        "--edge-frame", default="config", choices=("config", "on", "off"),
        help="message products in the edge frame: each configuration's (config, the default), "
             "or on/off for all",
    )
    parser.add_argument(
        "--batches", type=Path, default=None,
        help="read the batches from DIR/NAME.npz (written by benchmarks/inputs.py --save) "
             "instead of building them here",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other configurations' records already in --out",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process (peak RSS then covers all configurations)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--matmul", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    host_memory = common.retain_freed_host_memory()  # before the first JAX computation
    from segnn_jax.tensor_product_cue import check_backend

    check_backend(args.backend)  # a typo fails here, not in every configuration
    resolve_contraction_order(args.contraction_order, {}, args.backend)  # likewise
    if args.child:
        _child(args)
        return {}
    if args.serve:
        _serve(args)
        return {}

    import jax

    settings = {
        "configs": args.configs,
        "repeats": args.repeats,
        "max_seconds": args.max_seconds,
        "dtype": args.dtype,
        "row_tile": args.row_tile,
        "scan_layers": args.scan_layers,
        "tensor_product_backend": args.backend,
        "compute_dtype": args.compute_dtype,
        "batches": None if args.batches is None else str(args.batches),
        "contraction_order": args.contraction_order,
        "edge_frame": args.edge_frame,
        "warmup_calls": 2,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "subprocess_per_config": not args.in_process,
        "host_memory": host_memory,
    }
    result = {"settings": settings, "versions": common.versions(), "cpu": common.cpu_info()}
    print("settings:", json.dumps(settings))
    print("versions:", json.dumps(result["versions"]))
    print("cpu:", json.dumps(result["cpu"]))
    result["matmul_float32"] = common.matmul_gflops()
    print(
        f"float32 2048x2048 matmul: {result['matmul_float32']['median_gflops']:.1f} GFLOP/s (median)"
    )
    from segnn_jax.training import git_revision

    revision = git_revision()
    result["configs"] = {}
    previous = {}
    if args.update and args.out is not None and args.out.exists():
        previous = json.loads(args.out.read_text())
        result["configs"] = previous.get("configs", {})
    for name in args.configs:
        start = time.perf_counter()
        cpu_before = common.cpu_info()
        try:
            if args.in_process:
                record = measure(
                    name, args.repeats, args.max_seconds, args.dtype, result["matmul_float32"],
                    args.row_tile, args.scan_layers, args.compute_dtype,
                    backend=args.backend, batches=args.batches,
                    contraction_order=args.contraction_order, edge_frame=args.edge_frame,
                )
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "record.json"
                    command = [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--child",
                        name,
                        "--child-out",
                        str(out),
                        "--repeats",
                        str(args.repeats),
                        "--max-seconds",
                        str(args.max_seconds),
                        "--dtype",
                        args.dtype,
                        "--row-tile",
                        args.row_tile,
                        *(["--scan-layers"] if args.scan_layers else []),
                        "--backend",
                        args.backend,
                        *(["--batches", str(args.batches)] if args.batches else []),
                        "--contraction-order",
                        args.contraction_order,
                        "--edge-frame",
                        args.edge_frame,
                        "--compute-dtype",
                        args.compute_dtype,
                        "--matmul",
                        json.dumps(result["matmul_float32"]),
                    ]
                    done = subprocess.run(command, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-2000:]}")
                    record = json.loads(out.read_text())
        # One failing configuration must not lose the others' figures.
        except Exception as error:  # noqa: BLE001
            record = {"error": f"{type(error).__name__}: {error}"}
        record["wall_s"] = time.perf_counter() - start
        record["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record["load_average_before"] = cpu_before["load_average_1_5_15"]
        record["matmul_float32_gflops_same_run"] = result["matmul_float32"]["median_gflops"]
        record["git_revision"] = revision
        result["configs"][name] = record
        _print_record(name, record)
    result["cpu_after"] = common.cpu_info()
    # --update keeps what else the file records (notes, commands, superseded runs).
    for key, value in previous.items():
        result.setdefault(key, value)
    common.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
