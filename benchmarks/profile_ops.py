r"""Where a whole training step's time goes, by kind of XLA operation (JAX profiler trace).

``throughput.py`` times the step and ``profile_step.py`` times each block alone; this script runs
the compiled training step of a configuration under ``jax.profiler.trace`` and sums the durations
of the executed XLA operations (thunks) by kind: the name of an operation without its numeric
suffix, e.g. ``concatenate``, ``ynn_fusion`` (fusions handed to the XNNPACK-derived library,
which covers the matrix multiplies on CPU), ``copy_bitcast_fusion``. Kinds are then grouped as
``matmul`` (dot and the library fusions), ``data_movement`` (concatenate, copy, transpose, pad,
slice, gather, scatter, broadcast and fusions made only of those) and ``elementwise`` (the rest),
which is what the note on the FLOP-rate gap rests on. Usage::

    python benchmarks/profile_ops.py --configs nbody qm9 \
        --out benchmarks/results/profile_ops_cpu.json

The profiler's own overhead makes the traced steps slower than ``throughput.py``'s; the shares are
what this measures. Run it on a quiet machine.

The trace keeps a bounded number of events. A step that runs loops of thousands of iterations (XLA's
legacy CPU emitters, which the QM9 configuration selects, turn every scatter into a while loop over
its indices: 6,024 iterations per edge-to-node sum) overflows it with few steps, and the operations
it kept then cover only part of the step: 0.9 of 2.8 s for QM9 with 3 steps in session 15.
``coverage`` (traced operation time over the untraced step) says how much was seen; below 0.8 the
script warns, and fewer ``--steps`` (1 was complete there) give a complete trace.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import common, inputs  # noqa: E402

_MOVEMENT = {"concatenate", "copy", "transpose", "pad", "slice", "gather", "scatter", "broadcast",
             "bitcast", "reshape", "dynamic", "update", "wrapped", "iota"}
# Events of the runtime rather than of an operation (dispatch, argument handling, waits, and the
# zero-length "end: <op>" markers the CPU thunk executor emits).
_RUNTIME_EVENTS = ("Execute", "ParseArguments", "Pjit", "ThreadPool", "Handle inputs", "Wait for")
# Control flow: a while loop's (or a call's, a conditional's) event spans the operations of its
# body, which have their own events; counting both counted the body twice (a scanned network's
# whole layer stack).
_CONTROL_FLOW = {"while", "call", "conditional"}


def kind_of(name: str) -> str:
    """``concatenate.155`` -> ``concatenate``; ``ynn_fusion.20`` -> ``ynn_fusion``."""
    return re.sub(r"\.\d+$", "", name)


def group_of(kind: str) -> str:
    """``matmul``, ``data_movement`` or ``elementwise`` for an operation kind."""
    if kind == "dot" or kind.startswith("ynn") or "dot" in kind.split("_"):
        return "matmul"
    words = set(kind.replace("wrapped_", "").split("_")) - {"fusion"}
    return "data_movement" if words and words <= _MOVEMENT else "elementwise"


def operation_times(trace_path: Path, steps: int) -> dict[str, dict[str, float]]:
    """Mean time (ms) and count per step of every operation kind in a Chrome/perfetto trace."""
    with gzip.open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or "dur" not in event or name.startswith(("$", "end: ")):
            continue
        if any(marker in name for marker in _RUNTIME_EVENTS) or kind_of(name) in _CONTROL_FLOW:
            continue
        total[kind_of(name)] += event["dur"]
        count[kind_of(name)] += 1
    return {kind: {"ms": total[kind] / 1000 / steps, "count": count[kind] / steps}
            for kind, _ in total.most_common()}


def profile(name: str, steps: int, warmup: int) -> dict:
    """The training step of configuration ``name`` traced for ``steps`` calls."""
    import jax

    from benchmarks import throughput

    arrays, spec = inputs.build(name)
    bench = throughput.build_ours(arrays, spec)
    bench.compile("train_step")
    for _ in range(warmup):
        common.block(bench.call("train_step"))
    untraced = common.time_calls(lambda: bench.call("train_step"), steps, 120.0)
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                common.block(bench.call("train_step"))
        traced_s = (time.perf_counter() - start) / steps
        trace = next(Path(trace_dir).rglob("*.trace.json.gz"))
        kinds = operation_times(trace, steps)
    groups = collections.defaultdict(lambda: {"ms": 0.0, "count": 0.0})
    for kind, entry in kinds.items():
        group = groups[group_of(kind)]
        group["ms"] += entry["ms"]
        group["count"] += entry["count"]
    summed = sum(g["ms"] for g in groups.values())
    for group in groups.values():
        group["share"] = group["ms"] / summed if summed else None
    untraced_ms = common.summarise(untraced)
    return {
        "nodes": int(len(arrays["positions"])),
        "edges": int(len(arrays["senders"])),
        "train_step_ms_untraced": untraced_ms,
        "train_step_ms_traced": traced_s * 1000,
        "operations_ms_per_step": summed,
        "coverage": summed / untraced_ms["median_ms"],
        "groups": dict(groups),
        "kinds": {k: v for k, v in list(kinds.items())[:40]},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["nbody", "qm9"],
                        choices=sorted(inputs.CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="traced training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    from segnn_jax.training import git_revision

    result = {
        "settings": {"configs": args.configs, "steps": args.steps, "warmup": args.warmup},
        "git_revision": git_revision(),
        "versions": common.versions(),
        "cpu": common.cpu_info(),
        "configs": {},
    }
    for name in args.configs:
        record = profile(name, args.steps, args.warmup)
        result["configs"][name] = record
        print(f"{name}: {record['train_step_ms_untraced']['median_ms']:.1f} ms per step untraced; "
              f"operations {record['operations_ms_per_step']:.1f} ms per step traced")
        if record["coverage"] < 0.8:
            print(f"  warning: the trace holds operations for only {record['coverage']:.0%} of the "
                  "untraced step (its event buffer overflowed); the shares below are partial")
        for group, entry in sorted(record["groups"].items(), key=lambda kv: -kv[1]["ms"]):
            print(f"  {group:14s} {entry['ms']:8.1f} ms  {entry['share']:6.1%}  "
                  f"({entry['count']:.0f} operations)")
    result["cpu_after"] = common.cpu_info()
    common.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
