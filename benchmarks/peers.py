"""Side-by-side timing of our SEGNN against the earlier JAX port, ``segnn-jax`` 0.7 from PyPI.

The earlier port is also imported as ``segnn_jax``, and it needs e3nn-jax 0.20.6 (0.20.7 removed an
argument it uses) while this project needs a later one, so it runs in its own virtual environment,
``benchmarks/.peers-venv`` (git-ignored), created on first use with::

    pip install --no-deps segnn-jax==0.7
    pip install jax==0.10.2 jaxlib==0.10.2 e3nn-jax==0.20.6 dm-haiku==0.0.17 optax==0.2.8 flax jraph

(its fastest working stack; ``--no-deps`` because its metadata pins the much slower e3nn-jax 0.19.3).

For each configuration both models get the same batch (built once here, passed as ``.npz``). Each
side is a long-lived worker process that compiles its forward and training step once (the earlier
port under a compile time limit; a timeout is recorded as such) and then answers timing requests;
the driver alternates the two, swapping who goes first every round, so that the noise of a shared
machine falls on both. Speed-ups are reported as the ratio of medians over all rounds and as the
median of the per-round ratios.

Ours compiles with this library's XLA options (``segnn_jax.compile_options``: on CPU, YNNPACK
library fusions for dots only); the earlier port with XLA's defaults, or with the same options
under ``--peer-compiler-options``, which shows how much of the ratio the options alone make.

Usage::

    python benchmarks/peers.py --configs nbody qm9 --rounds 3 --out benchmarks/results/peers_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np

from benchmarks import common, inputs

DEFAULT_VENV = HERE / ".peers-venv"
PEER_PACKAGE = "segnn-jax==0.7"
PEER_STACK = (
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "e3nn-jax==0.20.6",
    "dm-haiku==0.0.17",
    "optax==0.2.8",
    "flax",
    "jraph",
)
PEER_CONFIGS = ("nbody", "qm9")


class WorkerTimeout(RuntimeError):
    """A worker did not answer within its time limit (it is killed)."""


class WorkerError(RuntimeError):
    """A worker reported an error or exited."""


def ensure_venv(venv: Path) -> Path:
    """Creates the earlier port's virtual environment if needed; returns its Python.

    Raises:
        subprocess.CalledProcessError: when venv creation or pip fails (no network, no wheel).
    """
    python = venv / "bin" / "python"
    check = [
        str(python),
        "-c",
        ("import segnn_jax, e3nn_jax, haiku, optax, jraph; assert segnn_jax.__version__ == '0.7'"),
    ]
    probe = (
        subprocess.run(check, capture_output=True, cwd=HERE, check=False)
        if python.exists()
        else None
    )
    if probe is not None and probe.returncode == 0:
        return python
    print(f"creating {venv} with {PEER_PACKAGE} (--no-deps) and {' '.join(PEER_STACK)}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + ["--no-deps", PEER_PACKAGE], check=True)
    subprocess.run(pip + list(PEER_STACK), check=True)
    subprocess.run(check, check=True, cwd=HERE)
    return python


class Worker:
    """A timing server subprocess (:func:`common.serve`) with request time limits."""

    def __init__(self, name: str, command: list, env: dict, log_path: Path, start_limit_s: float):
        self.name = name
        # Held for the worker's lifetime (its stderr), closed in close().
        self.log = open(log_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=HERE,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.hello = self._answer(start_limit_s)

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _answer(self, limit_s: float) -> dict:
        deadline = time.monotonic() + limit_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.kill()
                raise WorkerTimeout(f"{self.name} gave no answer within {limit_s:.0f} s") from None
            if line is None:
                self.log.flush()
                tail = Path(self.log.name).read_text()[-1500:]
                raise WorkerError(f"{self.name} exited with code {self.process.wait()}: {tail}")
            if line.startswith("{"):
                reply = json.loads(line)
                if "error" in reply:
                    raise WorkerError(f"{self.name}: {reply['error']}")
                return reply

    def request(self, text: str, limit_s: float) -> dict:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self._answer(limit_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.request("quit", 30)
            except (WorkerTimeout, WorkerError, BrokenPipeError):
                pass
            self.kill()
        self.log.close()


def _ratio(theirs: dict, ours: dict, key: str):
    if not theirs.get(key) or not ours.get(key):
        return None
    return float(np.median(theirs[key])) / float(np.median(ours[key]))


def _our_compiler_options(spec: dict) -> dict:
    from segnn_jax.compile_options import resolve_options

    return resolve_options(spec.get("compiler_options"))


def compare(name: str, peer_python: Path, args, workdir: Path) -> dict:
    """Interleaved timing of ours and the earlier port on configuration ``name``."""
    arrays, spec = inputs.build(name)
    batch_path = workdir / f"{name}.npz"
    inputs.save(batch_path, arrays, spec)
    record = {
        "settings": spec,
        "nodes": len(arrays["positions"]),
        "edges": len(arrays["senders"]),
        "graphs": len(arrays["n_node"]),
        "load_average_before": common.cpu_info()["load_average_1_5_15"],
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    commands = {
        "ours": [sys.executable, str(HERE / "throughput.py"), "--serve", str(batch_path),
                 "--row-tile", args.row_tile, *(["--scan-layers"] if args.scan_layers else [])],
        "segnn-jax-0.7": [str(peer_python), str(HERE / "peer_worker.py"), str(batch_path),
                          *([json.dumps(_our_compiler_options(spec))] if args.peer_compiler_options
                            else [])],
    }
    limits = {"ours": args.compile_limit_ours, "segnn-jax-0.7": args.compile_limit}
    workers, sides = {}, {}
    try:
        for side, command in commands.items():
            sides[side] = {"status": "ok", "forward_s": [], "train_step_s": []}
            try:
                worker = Worker(
                    side, command, env, workdir / f"{name}-{side}.log", start_limit_s=300
                )
                sides[side]["params"] = worker.hello["params"]
                sides[side]["versions"] = worker.hello["versions"]
                sides[side]["compiler_options"] = worker.hello.get("compiler_options")
                for which in ("forward", "train_step"):
                    reply = worker.request(f"compile {which}", limits[side])
                    sides[side][f"compile_{which}_s"] = reply["compile_s"]
                    sides[side][f"gflops_{which}"] = (
                        reply["flops"] / 1e9 if reply["flops"] else None
                    )
                    print(
                        f"{name} {side}: compiled {which} in {reply['compile_s']:.1f} s", flush=True
                    )
                workers[side] = worker
            except WorkerTimeout as error:
                sides[side].update(
                    status="compile timeout", detail=str(error), compile_limit_s=limits[side]
                )
                print(f"{name} {side}: {error}", flush=True)
            except WorkerError as error:
                sides[side].update(status="error", detail=str(error))
                print(f"{name} {side}: {error}", flush=True)
        for round_index in range(args.rounds):
            order = list(workers) if round_index % 2 == 0 else list(reversed(list(workers)))
            for which in ("forward", "train_step"):
                for side in order:
                    if sides[side]["status"] != "ok":
                        continue
                    try:
                        reply = workers[side].request(
                            f"time {which} {args.repeats} {args.max_seconds}", args.time_limit
                        )
                    except (WorkerTimeout, WorkerError) as error:
                        sides[side].update(status="error while timing", detail=str(error))
                        continue
                    sides[side][f"{which}_s"].append(reply["seconds"])
                    sides[side]["peak_rss_mb"] = reply["peak_rss_mb"]
            print(f"{name}: round {round_index + 1}/{args.rounds} done", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    for side in sides.values():
        for which in ("forward", "train_step"):
            rounds = side.pop(f"{which}_s")
            if rounds:
                flat = [t for per_round in rounds for t in per_round]
                side[which] = common.summarise(flat)
                side[f"{which}_ms"] = side[which]["median_ms"]
                side[f"{which}_round_medians_ms"] = [float(np.median(r)) * 1e3 for r in rounds]
        if side.get("train_step_ms"):
            side["graphs_per_s"] = record["graphs"] / (side["train_step_ms"] / 1e3)
    record["implementations"] = sides
    ours, theirs = sides["ours"], sides["segnn-jax-0.7"]
    speedups = {}
    for which in ("forward", "train_step"):
        if ours.get(f"{which}_ms") and theirs.get(f"{which}_ms"):
            per_round = [
                t / o
                for t, o in zip(
                    theirs[f"{which}_round_medians_ms"], ours[f"{which}_round_medians_ms"]
                )
            ]
            speedups[which] = {
                "ratio_of_medians": theirs[f"{which}_ms"] / ours[f"{which}_ms"],
                "median_of_round_ratios": float(np.median(per_round)),
                "round_ratios": per_round,
            }
    for key in ("compile_forward_s", "compile_train_step_s"):
        if ours.get(key) and theirs.get(key):
            speedups[key] = theirs[key] / ours[key]
    record["speedup_ours_vs_segnn_jax_0_7"] = speedups
    record["load_average_after"] = common.cpu_info()["load_average_1_5_15"]
    return record


def _print(name: str, record: dict) -> None:
    for side, r in record["implementations"].items():
        if r["status"] != "ok":
            print(f"{name} {side}: {r['status']} ({r.get('detail', '')})")
            continue
        print(
            f"{name} {side}: {r['params']:,} params; compile forward {r['compile_forward_s']:.1f} s, "
            f"train step {r['compile_train_step_s']:.1f} s; forward {r['forward_ms']:.1f} ms, "
            f"train step {r['train_step_ms']:.1f} ms; peak RSS {r['peak_rss_mb']:.0f} MiB"
        )
    for which, s in record["speedup_ours_vs_segnn_jax_0_7"].items():
        if isinstance(s, dict):
            print(
                f"{name} speed-up {which}: {s['ratio_of_medians']:.2f}x (median of per-round ratios "
                f"{s['median_of_round_ratios']:.2f}x)"
            )
        else:
            print(f"{name} speed-up {which}: {s:.2f}x")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(PEER_CONFIGS), choices=PEER_CONFIGS)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of ours and theirs")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side per round")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="per side and round, stop timing after this long (at least 3 calls)",
    )
    parser.add_argument(
        "--compile-limit",
        type=float,
        default=300.0,
        help="seconds allowed for each compilation of the earlier port",
    )
    parser.add_argument("--compile-limit-ours", type=float, default=300.0)
    parser.add_argument(
        "--time-limit", type=float, default=600.0, help="seconds allowed per timing request"
    )
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument(
        "--row-tile", default="none", help="our tensor-product tile (see throughput.py --row-tile)"
    )
    parser.add_argument(
        "--scan-layers", action="store_true", help="our layers as one scanned body (QM9 config default)"
    )
    parser.add_argument(
        "--peer-compiler-options", action="store_true",
        help="compile the earlier port with our XLA options too (segnn_jax.compile_options): "
             "how much of the ratio the options alone make",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    peer_python = ensure_venv(args.venv)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    # Both workers apply the same policy from the same environment as this process.
    settings["host_memory"] = common.retain_freed_host_memory()
    result = {
        "settings": settings,
        "versions_ours_driver": common.versions(),
        "cpu": common.cpu_info(),
        "peer": {"package": PEER_PACKAGE, "stack": list(PEER_STACK), "installed_with": "--no-deps"},
        "note": (
            "Each side is a long-lived process; rounds alternate the two (first side swapped "
            "every round) so machine noise falls on both. Ratios > 1 mean ours is faster."
        ),
        "configs": {},
    }
    print("settings:", json.dumps(result["settings"]))
    print("cpu:", json.dumps(result["cpu"]))
    with tempfile.TemporaryDirectory(prefix="segnn-peers-") as tmp:
        for name in args.configs:
            record = compare(name, peer_python, args, Path(tmp))
            result["configs"][name] = record
            _print(name, record)
            if args.out is not None:  # written after every configuration: a later crash keeps these
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2) + "\n")
    result["cpu_after"] = common.cpu_info()
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
