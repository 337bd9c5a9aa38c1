"""Measurement helpers shared by our benchmark and the peer worker (needs only jax and NumPy).

This file must not import ``segnn_jax``: the peer worker runs it inside another virtual environment
where ``segnn_jax`` is the earlier port (version 0.7), not this project.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PACKAGES = (
    "jax",
    "jaxlib",
    "e3nn-jax",
    "dm-haiku",
    "optax",
    "jraph",
    "numpy",
    "segnn-jax",
    "segnn",
    "cuequivariance-jax",
)


def write_result(path, result: dict) -> None:
    """Writes a benchmark's JSON result to ``path`` (creating its folder); nothing for None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def retain_freed_host_memory() -> str:
    """Applies this project's host-memory policy (``segnn_jax/host_memory.py``) to this process.

    The module is loaded from its file, not imported as ``segnn_jax.host_memory``: in the peer
    worker's environment ``segnn_jax`` is the earlier port. Both sides of a comparison run under
    the same policy: glibc's default unless ``SEGNN_RETAIN_FREED_MEMORY=1`` is in the
    environment.

    Returns:
        ``"retained"`` (freed memory kept for reuse) or ``"returned"`` (glibc's default).
    """
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "segnn_jax" / "host_memory.py"
    spec = importlib.util.spec_from_file_location("_segnn_host_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return "retained" if module.retain_freed_memory_if_requested() else "returned"


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that matter for speed (None when not installed)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def cpu_info() -> dict[str, object]:
    """CPU model, logical core count, and the 1/5/15-minute load averages at call time."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "load_average_1_5_15": load,
        "platform": platform.platform(),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def device_memory_mb() -> dict[str, float] | None:
    """JAX's allocator statistics of the first device, in MiB, when the backend reports them."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return {
        k: v / 2**20
        for k, v in stats.items()
        if k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    }


def block(tree):
    """Waits for every array in ``tree`` (asynchronous dispatch would otherwise hide the work)."""
    import jax

    return jax.block_until_ready(tree)


def summarise(seconds: list[float]) -> dict[str, float]:
    """Median, interquartile range, min and count of a list of durations, in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {
        "median_ms": float(med),
        "iqr_ms": float(q3 - q1),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "min_ms": float(ms.min()),
        "runs": int(ms.size),
    }


def time_calls(call: Callable[[], object], repeats: int, max_seconds: float) -> list[float]:
    """Durations of ``repeats`` calls of ``call`` (each blocked until ready), stopping early once
    ``max_seconds`` have been spent (at least 3 calls are always made)."""
    durations = []
    start_all = time.perf_counter()
    for index in range(repeats):
        start = time.perf_counter()
        block(call())
        durations.append(time.perf_counter() - start)
        if index >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return durations


def compile_timed(fn, *args, compiler_options=None):
    """``jax.jit(fn, compiler_options=...).lower(*args).compile()`` with the lowering+compilation
    wall time.

    Returns:
        ``(compiled, seconds, flops)``; ``flops`` is XLA's cost-analysis estimate of one call, or None
        when the backend gives none.
    """
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn, compiler_options=compiler_options or None).lower(*args).compile()
    seconds = time.perf_counter() - start
    return compiled, seconds, cost_flops(compiled)


def cost_flops(compiled) -> float | None:
    """FLOPs of one call from ``compiled.cost_analysis()`` (a dict, or a list of one in older jax)."""
    try:
        analysis = compiled.cost_analysis()
    # Backends without a cost model raise various errors; the figure is optional.
    except Exception:  # noqa: BLE001
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def matmul_gflops(n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Measured float32 ``n x n`` matrix-multiply rate (GFLOP/s, ``2 n^3`` per product): the
    machine's practical peak against which a model's achieved rate is compared."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    block(matmul(a, b))
    durations = time_calls(lambda: matmul(a, b), repeats, max_seconds=10.0)
    flops = 2.0 * n**3
    return {
        "n": n,
        "median_gflops": flops / float(np.median(durations)) / 1e9,
        "best_gflops": flops / float(np.min(durations)) / 1e9,
    }


def make_train_step(apply, loss: str, learning_rate: float = 5e-4,
                    trace_context=contextlib.nullcontext):
    """A real training step: Adam update on an MSE or L1 loss, through ``jax.value_and_grad``.

    Args:
        apply: ``apply(params, state, batch) -> (predictions, new_state)``; predictions are reshaped
            to ``batch["targets"]``'s shape (the earlier port squeezes its outputs).
        loss: ``"mse"`` or ``"l1"``.
        learning_rate: Adam's step size.
        trace_context: a context manager factory entered while the loss and its gradient are
            traced (ours: ``segnn_jax.tensor_product.differentiated_hybrid``, as the training
            engine does).

    Returns:
        ``(optimizer, step)`` with ``step(params, state, opt_state, batch) -> (params, state,
        opt_state, loss)``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    if loss not in ("mse", "l1"):
        raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
    optimizer = optax.adam(learning_rate)

    def loss_fn(params, state, batch):
        predictions, new_state = apply(params, state, batch)
        error = (
            jnp.reshape(predictions, batch["targets"].shape).astype(jnp.float32) - batch["targets"]
        )
        value = jnp.mean(error**2) if loss == "mse" else jnp.mean(jnp.abs(error))
        return value, new_state

    def step(params, state, opt_state, batch):
        with trace_context():
            (value, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, value

    return optimizer, step


class ModelBench:
    """A compiled forward and training step of one model on one batch, ready to be timed.

    Args:
        apply: ``apply(params, state, batch) -> (predictions, new_state)`` (pure, jit-able).
        params, state: the model's initial parameters and state.
        batch: dict of device arrays (``batch["targets"]`` is the regression target).
        loss: ``"mse"`` or ``"l1"``.
        compiler_options: XLA options both functions are compiled with (our library's own, see
            ``segnn_jax.compile_options``; none for the earlier port unless asked for).
        step_context: ``trace_context`` of :func:`make_train_step`.
    """

    def __init__(self, apply, params, state, batch, loss: str, compiler_options=None,
                 step_context=contextlib.nullcontext):
        import jax

        self.params, self.state, self.batch = params, state, batch
        self.n_params = int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
        optimizer, step = make_train_step(apply, loss, trace_context=step_context)
        self.opt_state = optimizer.init(params)
        self.forward_fn = lambda p, s, b: apply(p, s, b)[0]
        self.step_fn = step
        self.compiler_options = dict(compiler_options or {})
        self.compiled = {}

    def compile(self, which: str) -> dict[str, float | None]:
        """Lowers and compiles ``"forward"`` or ``"train_step"``; returns its time and FLOP estimate."""
        if which == "forward":
            compiled, seconds, flops = compile_timed(
                self.forward_fn, self.params, self.state, self.batch,
                compiler_options=self.compiler_options,
            )
        elif which == "train_step":
            compiled, seconds, flops = compile_timed(
                self.step_fn, self.params, self.state, self.opt_state, self.batch,
                compiler_options=self.compiler_options,
            )
        else:
            raise ValueError(f"which must be 'forward' or 'train_step', got {which!r}")
        self.compiled[which] = compiled
        return {"compile_s": seconds, "flops": flops}

    def call(self, which: str):
        """One call of a compiled function (not blocked)."""
        if which == "forward":
            return self.compiled["forward"](self.params, self.state, self.batch)
        return self.compiled["train_step"](self.params, self.state, self.opt_state, self.batch)

    def time(self, which: str, repeats: int, max_seconds: float, warmup: int = 2) -> list[float]:
        """Durations (s) of ``repeats`` blocked calls after ``warmup`` untimed ones."""
        for _ in range(warmup):
            block(self.call(which))
        return time_calls(lambda: self.call(which), repeats, max_seconds)


def serve(bench: ModelBench, stream_in=None, stream_out=None) -> None:
    """Answers timing requests on stdin with one JSON line each on stdout, until ``quit``.

    Requests: ``compile forward|train_step``; ``time forward|train_step REPEATS MAX_SECONDS``;
    ``info``; ``quit``. Used by ``benchmarks/peers.py`` to interleave two processes that each keep
    their compiled functions between rounds.
    """
    import json

    stream_in = stream_in or sys.stdin
    stream_out = stream_out or sys.stdout

    def reply(payload):
        stream_out.write(json.dumps(payload) + "\n")
        stream_out.flush()

    reply(
        {
            "ready": True,
            "params": bench.n_params,
            "versions": versions(),
            "compiler_options": bench.compiler_options,
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    for line in stream_in:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "quit":
                reply({"bye": True})
                return
            if words[0] == "compile":
                reply(dict(bench.compile(words[1]), peak_rss_mb=peak_rss_mb()))
            elif words[0] == "time":
                seconds = bench.time(words[1], int(words[2]), float(words[3]))
                reply({"seconds": seconds, "peak_rss_mb": peak_rss_mb()})
            elif words[0] == "info":
                reply({"params": bench.n_params, "peak_rss_mb": peak_rss_mb(), "cpu": cpu_info()})
            else:
                reply({"error": f"unknown request {line.strip()!r}"})
        # Reported to the driver, which records it for this model.
        except Exception as error:  # noqa: BLE001
            reply({"error": f"{type(error).__name__}: {error}"})
