r"""Where a whole training step's time goes, by kind of XLA operation or by the module it came
from (JAX profiler trace).

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

``--by-scope`` also sums the operations by where they came from: the name stack JAX records in
each operation's metadata (Haiku modules such as ``layer/update_1/tensor_product``, the edge
frame's ``to_frame``, ``from_frame``, ``make_frame``), backward operations apart, cut to
``--scope-depth`` names. ``--function forward`` profiles the forward instead of the step::

    python benchmarks/profile_ops.py --configs qm9 --function forward --steps 2 --scan-layers \
        --by-scope
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
from typing import Optional

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


# Parts of a name stack that are not where an operation came from: control flow, JAX's own jitted
# helpers (``jit(_where)``), and the outer transformations' wrappers, which scope_of strips.
_NOT_SCOPES = ("while", "body", "cond", "closed_call", "pjit", "")
_WRAPPER = re.compile(r"^(?:jvp|transpose|vmap|remat|checkpoint)\((.*)\)$")


def scope_of(op_name: str, depth: int) -> str:
    """The module path an operation came from, from its metadata's name stack:
    ``jit(f)/transpose(jvp(segnn))/while/body/closed_call/layer/update_1/tensor_product/dot_general``
    -> ``backward: segnn/layer/update_1/tensor_product`` (depth 4; the last name, the primitive's,
    is dropped).
    """
    kept = []
    for part in op_name.split("/")[:-1]:
        while (wrapped := _WRAPPER.match(part)) is not None:
            part = wrapped.group(1)
        if part in _NOT_SCOPES or part.startswith(("jit(", "p[")):
            continue
        kept.append(part)
    scope = "/".join(kept[:depth]) or "(top level)"
    return f"backward: {scope}" if "transpose(" in op_name else scope


def instruction_op_names(hlo_text: str) -> dict[str, str]:
    """``{instruction name: metadata op_name}`` of a compiled HLO module's text. A fusion without
    metadata of its own takes that of the last operation of its fused computation."""
    own, calls, computation_ops = {}, {}, collections.defaultdict(list)
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if header and not line.startswith(" "):
            computation = header.group(1)
        instruction = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = ", line)
        if instruction is None:
            continue
        op_name = re.search(r'op_name="([^"]+)"', line)
        if op_name is not None:
            own[instruction.group(1)] = op_name.group(1)
            computation_ops[computation].append(op_name.group(1))
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called is not None:
            calls[instruction.group(1)] = called.group(1)
    for name, computation in calls.items():
        if name not in own and computation_ops.get(computation):
            own[name] = computation_ops[computation][-1]
    return own


def operation_times(trace_path: Path, steps: int, key=None) -> dict[str, dict[str, float]]:
    """Mean time (ms) and count per step of every operation kind in a Chrome/perfetto trace, or of
    every ``key(operation name)`` if given."""
    key = key or kind_of
    with gzip.open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or "dur" not in event or name.startswith(("$", "end: ")):
            continue
        if any(marker in name for marker in _RUNTIME_EVENTS) or kind_of(name) in _CONTROL_FLOW:
            continue
        total[key(name)] += event["dur"]
        count[key(name)] += 1
    return {kind: {"ms": total[kind] / 1000 / steps, "count": count[kind] / steps}
            for kind, _ in total.most_common()}


def profile(name: str, steps: int, warmup: int, function: str = "train_step",
            scope_depth: Optional[int] = None, scan_layers: bool = False) -> dict:
    """``function`` (``"train_step"`` or ``"forward"``) of configuration ``name`` traced for
    ``steps`` calls; with ``scope_depth``, also its time by scope (:func:`scope_of`)."""
    import jax

    from benchmarks import throughput

    arrays, spec = inputs.build(name)
    bench = throughput.build_ours(arrays, spec, scan_layers=scan_layers)
    bench.compile(function)
    for _ in range(warmup):
        common.block(bench.call(function))
    untraced = common.time_calls(lambda: bench.call(function), steps, 120.0)
    scopes = None
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                common.block(bench.call(function))
        traced_s = (time.perf_counter() - start) / steps
        trace = next(Path(trace_dir).rglob("*.trace.json.gz"))
        kinds = operation_times(trace, steps)
        if scope_depth is not None:
            op_names = instruction_op_names(bench.compiled[function].as_text())
            scopes = operation_times(trace, steps, key=lambda op: scope_of(
                op_names[op], scope_depth) if op in op_names else "(no metadata)")
    groups = collections.defaultdict(lambda: {"ms": 0.0, "count": 0.0})
    for kind, entry in kinds.items():
        group = groups[group_of(kind)]
        group["ms"] += entry["ms"]
        group["count"] += entry["count"]
    summed = sum(g["ms"] for g in groups.values())
    for group in groups.values():
        group["share"] = group["ms"] / summed if summed else None
    untraced_ms = common.summarise(untraced)
    record = {
        "function": function,
        "scan_layers": scan_layers,
        "nodes": int(len(arrays["positions"])),
        "edges": int(len(arrays["senders"])),
        f"{function}_ms_untraced": untraced_ms,
        f"{function}_ms_traced": traced_s * 1000,
        "operations_ms_per_step": summed,
        "coverage": summed / untraced_ms["median_ms"],
        "groups": dict(groups),
        "kinds": {k: v for k, v in list(kinds.items())[:40]},
    }
    if scopes is not None:
        record["scopes"] = {k: v for k, v in list(scopes.items())[:40]}
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["nbody", "qm9"],
                        choices=sorted(inputs.CONFIGS))
    parser.add_argument("--function", choices=("train_step", "forward"), default="train_step")
    parser.add_argument("--steps", type=int, default=5, help="traced calls")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scan-layers", action="store_true",
                        help="one scanned layer body, as the QM9 configs (see throughput.py)")
    parser.add_argument("--by-scope", action="store_true",
                        help="also sum the operations by the module they came from")
    parser.add_argument("--scope-depth", type=int, default=4,
                        help="names of the module path kept by --by-scope")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    from segnn_jax.training import git_revision

    result = {
        "settings": {"configs": args.configs, "function": args.function, "steps": args.steps,
                     "warmup": args.warmup, "scan_layers": args.scan_layers,
                     "scope_depth": args.scope_depth if args.by_scope else None},
        "git_revision": git_revision(),
        "versions": common.versions(),
        "cpu": common.cpu_info(),
        "configs": {},
    }
    for name in args.configs:
        record = profile(name, args.steps, args.warmup, args.function,
                         args.scope_depth if args.by_scope else None, args.scan_layers)
        result["configs"][name] = record
        untraced = record[f"{args.function}_ms_untraced"]["median_ms"]
        print(f"{name}: {untraced:.1f} ms per {args.function} untraced; "
              f"operations {record['operations_ms_per_step']:.1f} ms per call traced")
        if record["coverage"] < 0.8:
            print(f"  warning: the trace holds operations for only {record['coverage']:.0%} of the "
                  "untraced step (its event buffer overflowed); the shares below are partial")
        for group, entry in sorted(record["groups"].items(), key=lambda kv: -kv[1]["ms"]):
            print(f"  {group:14s} {entry['ms']:8.1f} ms  {entry['share']:6.1%}  "
                  f"({entry['count']:.0f} operations)")
        for scope, entry in list(record.get("scopes", {}).items())[:15]:
            print(f"  {entry['ms']:8.1f} ms  {scope}")
    result["cpu_after"] = common.cpu_info()
    common.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
