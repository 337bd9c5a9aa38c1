"""Mixed precision (``compute_dtype``) against float32: equivariance error, deviation, speed.

Per configuration (see :mod:`benchmarks.inputs`), with the same float32 parameters for every
variant:

- equivariance error of each variant: ``max |f(R x) - R f(x)| / max |R f(x)|`` over all outputs
  and a few random improper rotations R (positions, velocities and vector input features
  rotated; N-body predicts a vector per node, QM9 an invariant per graph);
- deviation from float32: ``max |f_low(x) - f_32(x)| / max |f_32(x)|`` of the forward, and the
  relative difference of the training loss;
- speed: forward and training step of each variant compiled in this one process, then timed in
  interleaved rounds (the variants alternate, their order reversed every round, ``--calls``
  blocked calls each per round), so that load from other jobs hits all of them alike. The ratio
  is the median low-precision time over the median float32 time (> 1: slower).

Usage::

    nice -n 15 python benchmarks/mixed_precision.py --configs nbody qm9 \\
        --out benchmarks/results/mixed_precision_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    # Run as a script from a checkout: make this project's segnn_jax importable.
    sys.path.insert(0, str(HERE.parent))

import numpy as np

from benchmarks import common, inputs, throughput

VARIANTS = ("float32", "bfloat16", "float16")


def _relative_max_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(value - reference)) / np.max(np.abs(reference)))


def rotate_batch(batch: dict, spec: dict, rotation) -> dict:
    """The batch with every vector input rotated by ``rotation`` (a 3x3 orthogonal matrix)."""
    import e3nn_jax as e3nn

    rotated = dict(batch)
    for key in ("positions", "velocities", "shifts"):
        if key in batch:
            rotated[key] = batch[key] @ rotation.T.astype(batch[key].dtype)
    if "features" in batch:
        rotated["features"] = e3nn.IrrepsArray(spec["input"], batch["features"]) \
            .transform_by_matrix(rotation).array
    return rotated


def equivariance_error(bench: common.ModelBench, spec: dict, rotations) -> float:
    """Largest relative equivariance error of the compiled forward over ``rotations``."""
    import e3nn_jax as e3nn

    forward = bench.compiled["forward"]  # the benchmark batches have no padding rows
    reference = forward(bench.params, bench.state, bench.batch)
    errors = []
    for rotation in rotations:
        out = forward(bench.params, bench.state, rotate_batch(bench.batch, spec, rotation))
        expected = e3nn.IrrepsArray(spec["output"], reference).transform_by_matrix(rotation).array
        errors.append(_relative_max_error(out, expected))
    return max(errors)


def interleaved(benches: dict, which: str, rounds: int, calls: int) -> dict:
    """Medians of ``which`` per variant over interleaved rounds, and the ratios to float32."""
    names = list(benches)
    for bench in benches.values():  # warm-up
        for _ in range(2):
            common.block(bench.call(which))
    seconds = {name: [] for name in names}
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            seconds[name] += common.time_calls(lambda b=benches[name]: b.call(which), calls, 1e9)
    record = {name: common.summarise(values) for name, values in seconds.items()}
    for name in names:
        if name != "float32":
            record[f"ratio_{name}_over_float32"] = (record[name]["median_ms"]
                                                    / record["float32"]["median_ms"])
    return record


def measure(name: str, variants, rounds: int, calls: int, n_rotations: int, seed: int) -> dict:
    """All figures of one configuration."""
    import e3nn_jax as e3nn
    import jax

    arrays, spec = inputs.build(name)
    scan_layers = name == "qm9"  # the QM9 config's setting: compiles in ~11 s instead of ~37 s
    record = {"settings": spec, "nodes": len(arrays["positions"]), "edges": len(arrays["senders"]),
              "graphs": len(arrays["n_node"]), "scan_layers": scan_layers, "row_tile": None}
    benches, compile_s = {}, {}
    for variant in variants:
        bench = throughput.build_ours(arrays, spec, "float32", seed=seed, scan_layers=scan_layers,
                                      compute_dtype=None if variant == "float32" else variant)
        if benches:  # one set of float32 parameters for all variants
            first = next(iter(benches.values()))
            bench.params, bench.opt_state = first.params, first.opt_state
        compile_s[variant] = {which: bench.compile(which)["compile_s"]
                              for which in ("forward", "train_step")}
        benches[variant] = bench
        print(f"{name} {variant}: compiled in {compile_s[variant]}", flush=True)
    record["params"] = next(iter(benches.values())).n_params
    record["parameter_dtypes"] = sorted({str(leaf.dtype) for bench in benches.values()
                                         for leaf in jax.tree_util.tree_leaves(bench.params)})
    record["compile_s"] = compile_s

    keys = jax.random.split(jax.random.PRNGKey(seed + 1), n_rotations)
    rotations = [np.asarray(-e3nn.rand_matrix(key, ())) for key in keys]  # improper rotations
    reference = benches["float32"].call("forward")
    reference_loss = float(benches["float32"].call("train_step")[-1])
    accuracy = {}
    for variant, bench in benches.items():
        entry = {"equivariance_error": equivariance_error(bench, spec, rotations)}
        if variant != "float32":
            entry["forward_deviation_from_float32"] = _relative_max_error(
                bench.call("forward"), reference)
            loss = float(bench.call("train_step")[-1])
            entry["loss_relative_difference"] = abs(loss - reference_loss) / abs(reference_loss)
        accuracy[variant] = entry
        print(f"{name} {variant}: {entry}", flush=True)
    record["accuracy"] = accuracy
    record["n_rotations"] = n_rotations

    record["load_average_before_timing"] = common.cpu_info()["load_average_1_5_15"]
    record["forward"] = interleaved(benches, "forward", rounds, calls)
    record["train_step"] = interleaved(benches, "train_step", rounds, calls)
    record["load_average_after_timing"] = common.cpu_info()["load_average_1_5_15"]
    for which in ("forward", "train_step"):
        medians = {v: f"{record[which][v]['median_ms']:.1f} ms" for v in benches}
        ratios = {k: round(v, 3) for k, v in record[which].items() if k.startswith("ratio")}
        print(f"{name} {which}: {medians} {ratios}", flush=True)
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["nbody"], choices=["nbody", "qm9"])
    parser.add_argument("--variants", nargs="+", default=["float32", "bfloat16"],
                        choices=VARIANTS, help="float32 always comes first, as the reference")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per variant per round")
    parser.add_argument("--rotations", type=int, default=3, help="random rotations per error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--update", action="store_true",
                        help="keep the other configurations' records already in --out")
    args = parser.parse_args(argv)
    variants = ["float32"] + [v for v in args.variants if v != "float32"]

    import jax

    run = {"variants": variants, "rounds": args.rounds, "calls_per_round": args.calls,
           "rotations": args.rotations, "seed": args.seed, "argv": sys.argv[1:]}
    settings = {"parameters": "float32 (master weights), the same for every variant",
                "timing": "interleaved rounds, variant order reversed every round; medians",
                "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
    result = {"settings": settings, "versions": common.versions(), "cpu": common.cpu_info()}
    print("settings:", json.dumps(dict(settings, **run)))
    print("versions:", json.dumps(result["versions"]))
    print("cpu:", json.dumps(result["cpu"]))
    result["configs"] = {}
    if args.update and args.out is not None and args.out.exists():
        result["configs"] = json.loads(args.out.read_text()).get("configs", {})
    for name in args.configs:
        start = time.perf_counter()
        record = measure(name, variants, args.rounds, args.calls, args.rotations, args.seed)
        record["run"] = run  # --update keeps records of earlier runs: each has its own settings
        record["versions"] = result["versions"]
        record["wall_s"] = time.perf_counter() - start
        record["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result["configs"][name] = record
    result["cpu_after"] = common.cpu_info()
    common.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
