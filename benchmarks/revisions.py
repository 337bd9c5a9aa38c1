"""Interleaved A/B timing of two revisions of this repository on the same batch.

Every change to the hot path is kept or dropped on such a comparison. On a shared 2-core machine
two runs minutes apart differ by 5-10%, so the two revisions run at the same time as long-lived
workers (``throughput.py --serve`` of their own checkout, see :func:`common.serve`) and the driver
alternates them request by request, swapping who goes first every round, as ``peers.py`` does for
the earlier port. A revision other than the working tree is checked out into a temporary
detached git worktree, removed afterwards.

Both workers run under this checkout's host-memory policy (``segnn_jax/host_memory.py``), so
revisions from before that policy are compared on the same footing.

Usage::

    python benchmarks/revisions.py --base HEAD~1 --configs nbody --rounds 6 --repeats 6
    python benchmarks/revisions.py --base main --head working --configs qm9 \
        --serve-args="--scan-layers --row-tile 256" --out /tmp/ab.json

``--head working`` (the default) is the working tree with its uncommitted changes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np

from benchmarks import common, inputs
from benchmarks.peers import Worker, WorkerError, WorkerTimeout

REPO = HERE.parent
WORKING = "working"

# Run in the worker: this checkout's memory policy, then the revision's own throughput.py with
# the revision's segnn_jax first on the path (checked, so an installed copy cannot stand in).
_WORKER = """
import importlib.util, runpy, sys
policy, root, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
spec = importlib.util.spec_from_file_location("_segnn_host_memory", policy)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.retain_freed_memory_if_requested()
sys.path.insert(0, root)
import segnn_jax
if not segnn_jax.__file__.startswith(root):
    raise SystemExit(f"segnn_jax imported from {segnn_jax.__file__}, not from {root}")
sys.argv = [root + "/benchmarks/throughput.py"] + argv
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()


def checkout(revision: str, workdir: Path) -> tuple[Path, str]:
    """The folder holding ``revision`` and a label with its commit."""
    if revision == WORKING:
        dirty = "+uncommitted" if git("status", "--porcelain", "--untracked-files=no") else ""
        return REPO, f"working tree ({git('rev-parse', '--short', 'HEAD')}{dirty})"
    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    folder = workdir / f"rev-{commit[:10]}"
    if not folder.exists():
        git("worktree", "add", "--detach", "--force", str(folder), commit)
    return folder, f"{revision} ({commit[:10]})"


def time_revisions(name: str, folders: dict[str, Path], args, workdir: Path) -> dict:
    """Interleaved timing of the revisions in ``folders`` (label -> checkout) on config ``name``."""
    arrays, spec = inputs.build(name)
    batch_path = workdir / f"{name}.npz"
    inputs.save(batch_path, arrays, spec)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    policy = str(REPO / "segnn_jax" / "host_memory.py")
    workers, sides = {}, {}
    try:
        for index, (label, folder) in enumerate(folders.items()):
            command = [sys.executable, "-c", _WORKER, policy, str(folder), "--serve",
                       str(batch_path), *shlex.split(args.serve_args)]
            worker = Worker(label, command, env, workdir / f"{name}-{index}.log", start_limit_s=300)
            workers[label] = worker
            sides[label] = {"params": worker.hello["params"], "checkout": str(folder)}
            for which in args.which:
                reply = worker.request(f"compile {which}", args.compile_limit)
                sides[label][f"compile_{which}_s"] = reply["compile_s"]
                print(f"{name} {label}: compiled {which} in {reply['compile_s']:.1f} s", flush=True)
        if len({side["params"] for side in sides.values()}) != 1:
            print(f"{name}: the revisions differ in parameter count: "
                  f"{ {label: side['params'] for label, side in sides.items()} }", flush=True)
        rounds = {(label, which): [] for label in folders for which in args.which}
        for round_index in range(args.rounds):
            order = list(folders) if round_index % 2 == 0 else list(reversed(list(folders)))
            for which in args.which:
                for label in order:
                    reply = workers[label].request(
                        f"time {which} {args.repeats} {args.max_seconds}", args.time_limit)
                    rounds[(label, which)].append(1e3 * float(np.median(reply["seconds"])))
                    sides[label]["peak_rss_mb"] = reply["peak_rss_mb"]
            print(f"{name}: round {round_index + 1}/{args.rounds} done", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    base, head = list(folders)
    record = {"settings": spec, "serve_args": args.serve_args, "revisions": sides, "ratios": {}}
    for which in args.which:
        for label in folders:
            per_round = rounds[(label, which)]
            sides[label][f"{which}_round_medians_ms"] = per_round
            sides[label][f"{which}_ms"] = float(np.median(per_round))
        per_round_ratio = [b / h for b, h in zip(rounds[(base, which)], rounds[(head, which)])]
        record["ratios"][which] = {
            "base_over_head_of_medians": sides[base][f"{which}_ms"] / sides[head][f"{which}_ms"],
            "median_of_round_ratios": float(np.median(per_round_ratio)),
            "rounds_head_faster": sum(r > 1 for r in per_round_ratio),
            "rounds": len(per_round_ratio),
        }
    return record


def _print(name: str, record: dict) -> None:
    base, head = list(record["revisions"])
    for which, ratio in record["ratios"].items():
        b, h = (record["revisions"][label][f"{which}_ms"] for label in (base, head))
        speedup = ratio["base_over_head_of_medians"]
        print(f"{name} {which}: base {b:.2f} ms, head {h:.2f} ms -> head {speedup:.3f}x "
              f"(faster in {ratio['rounds_head_faster']}/{ratio['rounds']} rounds)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision, or 'working' (default HEAD)")
    parser.add_argument("--head", default=WORKING, help="git revision, or 'working' (default)")
    parser.add_argument("--configs", nargs="+", default=["nbody"], choices=sorted(inputs.CONFIGS))
    parser.add_argument("--which", nargs="+", default=["forward", "train_step"],
                        choices=["forward", "train_step"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=6, help="timed calls per request")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="time budget of one timing request")
    parser.add_argument("--serve-args", default="",
                        help="options of both workers' throughput.py --serve: '--scan-layers'")
    parser.add_argument("--compile-limit", type=float, default=900.0, help="seconds per compile")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="seconds per timing request")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")

    results = {"versions": common.versions(), "cpu": common.cpu_info(), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="segnn-revisions-") as tmp:
        workdir = Path(tmp)
        try:
            folders = {}
            for revision in (args.base, args.head):
                folder, label = checkout(revision, workdir)
                folders[label] = folder
            if len(folders) != 2:  # an A/A run names the same commit twice, in two spellings
                parser.error("--base and --head must be spelled differently")
            results["base"], results["head"] = list(folders)
            for name in args.configs:
                try:
                    record = time_revisions(name, folders, args, workdir)
                except (WorkerTimeout, WorkerError) as error:
                    record = {"error": str(error)}
                    print(f"{name}: {error}", flush=True)
                else:
                    _print(name, record)
                results["configs"][name] = record
        finally:
            for folder in workdir.glob("rev-*"):
                git("worktree", "remove", "--force", str(folder))
    if args.out:
        common.write_result(args.out, results)
    return results


if __name__ == "__main__":
    main()
