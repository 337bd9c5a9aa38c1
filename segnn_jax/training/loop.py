"""The training loop: epochs, evaluation, best-by-validation, checkpoints, exact resume, logging.

:func:`fit` drives any model that follows the contract of :mod:`segnn_jax.training.step`. It

* validates the ``train`` config section before anything is compiled;
* keeps the device busy: metrics stay on the device and are read to the host only every
  ``log_every`` steps (and at epoch ends), so dispatch runs ahead of compute;
* logs every compilation (every new batch shape of the train and eval steps) with its shapes and the
  time of the first call;
* evaluates the validation and test data every ``eval_every`` epochs, each item exactly once
  (the eval step returns sums; they are added over batches and divided once);
* writes the run directory (:class:`~segnn_jax.training.run.RunDirectory`) and checkpoints after
  every epoch (and every ``checkpoint_every_steps`` steps if set), keeping the latest and the best;
* resumes exactly: the data order must be a pure function of ``(seed, epoch)`` and the loop state
  (epoch, position in the epoch, step, best metric, metrics-file position) is in the checkpoint,
  so a killed run continues with the batches, PRNG keys and step count it would have had;
* stops at a wall-clock budget (``time_budget_s``, summed over resumed attempts, compilation
  and evaluations included): no step starts after it; the run then evaluates, checkpoints (a
  resume with a larger budget continues from there) and reports as usual. The learning-rate
  schedule still spans ``num_epochs``: size ``num_epochs`` to the budget when it matters;
* stops on a non-finite training loss with :class:`NonFiniteLossError`, never saving a state that
  has seen it, so the last good checkpoint remains.

Training data (``train_data``) may be

* an object with ``epoch_batches(epoch, start)`` (e.g. :class:`segnn_jax.batching.GraphLoader`),
* a callable ``epoch -> iterable of batches``,
* or a re-iterable (e.g. a list), the same batches every epoch.

Evaluation data may be an object with ``epoch_batches``, a zero-argument callable, or a re-iterable.
With a mesh, batches carry the leading device axis ``[D, ...]`` (the loader's ``n_devices=D``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from segnn_jax.batching import prefetch
from segnn_jax.training.checkpoint import CheckpointManager
from segnn_jax.training.config import validate_train_config
from segnn_jax.training.optim import make_optimizer
from segnn_jax.training.run import (RunDirectory, count_parameters, plot_learning_curves,
                                    read_metrics, summary_table)
from segnn_jax.training.step import (TrainState, init_train_state, make_eval_step, make_train_step,
                                     metrics_from_sums, shard_batch)

__all__ = ["FitResult", "NonFiniteLossError", "RunDirectoryError", "evaluate", "fit"]

_log = logging.getLogger(__name__)
Callback = Callable[[str, Dict[str, Any]], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; names the step and epoch."""

    def __init__(self, message: str, *, step: int, epoch: int):
        super().__init__(message)
        self.step = step
        self.epoch = epoch


class RunDirectoryError(OSError):
    """The run directory cannot be created or written (permissions, full disk, a file in the way);
    raised before anything is compiled or trained."""


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        state: the final :class:`TrainState` (on the device).
        best: ``{"epoch", "step", "val": metrics, "test": metrics}`` at the best validation
            evaluation, or ``None`` without validation data.
        last_eval: metrics of the last evaluation, ``{split: metrics}``.
        compilations: one ``{"fn", "shapes", "seconds"}`` per compilation seen by this process.
        run_dir: the run directory.
        stopped_by_time_budget: the run ended at ``time_budget_s`` before ``num_epochs``.
        elapsed_s: wall-clock seconds of training, summed over resumed attempts.
    """

    state: TrainState
    best: Optional[Dict[str, Any]]
    last_eval: Dict[str, Dict[str, float]]
    compilations: List[Dict[str, Any]]
    run_dir: Path
    stopped_by_time_budget: bool = False
    elapsed_s: float = 0.0


def _epoch_iter(data: Any, epoch: int, start: int) -> Iterable[Any]:
    if hasattr(data, "epoch_batches"):
        return data.epoch_batches(epoch, start)
    items = data(epoch) if callable(data) else data
    return itertools.islice(iter(items), start, None)


def _eval_iter(data: Any) -> Iterable[Any]:
    if hasattr(data, "epoch_batches"):
        return data.epoch_batches(0)
    return iter(data() if callable(data) else data)


def _steps_per_epoch(data: Any) -> int:
    if hasattr(data, "num_steps"):
        return int(data.num_steps(0))
    if not callable(data) and hasattr(data, "__len__"):
        return len(data)
    return sum(1 for _ in _epoch_iter(data, 0, 0))


def _shape_signature(batch: Any) -> Tuple:
    return tuple(tuple(np.shape(x)) for x in jax.tree.leaves(batch))


def _describe_shapes(batch: Any) -> Dict[str, Any]:
    """Readable sizes of a (possibly device-stacked) padded GraphsTuple, else the leaf shapes."""
    if hasattr(batch, "n_node") and hasattr(batch, "senders"):
        n_node, senders = np.shape(batch.n_node), np.shape(batch.senders)
        nodes = jax.tree.leaves(batch.nodes)
        out = {"n_graph": n_node[-1], "n_edge": senders[-1],
               "n_node": np.shape(nodes[0])[len(n_node) - 1] if nodes else None}
        if len(n_node) > 1:
            out["devices"] = n_node[0]
        return out
    return {"leaf_shapes": [list(s) for s in _shape_signature(batch)]}


def _real_graphs(batch: Any) -> Optional[int]:
    globals_ = getattr(batch, "globals", None)
    if isinstance(globals_, Mapping) and "graph_mask" in globals_:
        return int(np.sum(np.asarray(globals_["graph_mask"])))
    return None


class _CompileLog:
    """Notices every new input shape of a jitted function, i.e. every compilation."""

    def __init__(self, run: RunDirectory, on_event: Callable[[str, Dict[str, Any]], None]):
        self.seen: Dict[Tuple[str, Tuple], Dict[str, Any]] = {}
        self._run = run
        self._on_event = on_event

    def call(self, name: str, fn: Callable, batch: Any, *args: Any) -> Any:
        key = (name, _shape_signature(batch))
        if key in self.seen:
            return fn(*args)
        start = time.perf_counter()
        out = fn(*args)
        # Dispatch of a new shape waits for the compilation, so this time is mostly compile time.
        jax.block_until_ready(out)
        record = {"fn": name, "shapes": _describe_shapes(batch),
                  "seconds": round(time.perf_counter() - start, 3)}
        self.seen[key] = record
        _log.info("compiled %s for %s in %.1f s", name, record["shapes"], record["seconds"])
        self._on_event("compile", record)
        return out


def _accumulate(total: Optional[Dict[str, Any]], sums: Dict[str, Any]) -> Dict[str, Any]:
    return dict(sums) if total is None else jax.tree.map(lambda a, b: a + b, total, sums)


def evaluate(eval_step: Callable, params: Any, model_state: Any, data: Any, *,
             compile_log: Optional[_CompileLog] = None) -> Dict[str, float]:
    """Evaluates every item of ``data`` once and returns the normalised metrics.

    Sums are accumulated on the device and fetched once, then divided by the counts
    (:func:`~segnn_jax.training.metrics_from_sums`), so the result does not depend on the batching.
    """
    total = None
    for batch in _eval_iter(data):
        if compile_log is not None:
            sums = compile_log.call("eval_step", eval_step, batch, params, model_state, batch)
        else:
            sums = eval_step(params, model_state, batch)
        total = _accumulate(total, sums)
    if total is None:
        raise ValueError("evaluation data yielded no batch")
    return metrics_from_sums(jax.device_get(total))


def _to_device(batch: Any, mesh: Optional[Mesh]) -> Any:
    return jax.device_put(batch) if mesh is None else shard_batch(batch, mesh)


def _replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
    if mesh is None:
        return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _is_better(value: float, best: Optional[float], mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _config_changes(before: Any, after: Any, prefix: str = "") -> List[str]:
    """Dotted names of the options that differ between two configs read from ``config.json``
    (added and removed options included); nothing when ``before`` is None (no earlier config)."""
    if before is None:
        return []
    if not isinstance(before, dict) or not isinstance(after, dict):
        return [prefix] if before != after else []
    out = []
    for key in sorted(set(before) | set(after)):
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in before or key not in after:
            out.append(name)
        else:
            out.extend(_config_changes(before[key], after[key], name))
    return out


def fit(init_fn: Callable, loss_fn: Callable, train_data: Any, *, config: Any,
        run_dir: Union[str, Path], val_data: Any = None, test_data: Any = None,
        full_config: Any = None, data_stats: Optional[Mapping[str, Any]] = None,
        mesh: Optional[Mesh] = None, resume: bool = True,
        callbacks: Sequence[Callback] = ()) -> FitResult:
    """Trains a model and writes its run directory.

    Args:
        init_fn: ``init(rng, batch) -> (params, model_state)``, e.g.
            ``hk.transform_with_state(forward).init``.
        loss_fn: ``loss_fn(params, model_state, batch, rng, is_training) -> (loss_sum, (sums,
            new_model_state))``, see :mod:`segnn_jax.training.step`.
        train_data: training batches, see the module docstring; with a mesh every leaf is
            ``[D, ...]``.
        config: the ``train`` section (dict or ConfigDict, see
            :func:`~segnn_jax.training.default_train_config`); validated before any compilation.
        run_dir: the run directory; if it holds checkpoints and ``resume``, training continues from
            the latest good one.
        val_data: validation batches (selects the best checkpoint by ``config.best_metric``).
        test_data: test batches, evaluated with the validation data; the test metrics at the best
            validation are reported.
        full_config: the whole operative config to write to ``config.json`` (default: ``config``).
        data_stats: anything JSON-able about the data, written to ``run_info.json``.
        mesh: ``None`` for one device, or :func:`~segnn_jax.training.data_mesh` for data
            parallelism.
        resume: continue from the latest checkpoint of ``run_dir`` if there is one.
        callbacks: ``callback(event, record)`` called for every logged event (``"train"``,
            ``"eval"``, ``"checkpoint"``, ``"compile"``, ...); an exception raised there stops
            the run (used to test kills).

    Returns:
        A :class:`FitResult`.

    Raises:
        ConfigError: invalid ``config`` (before anything is compiled).
        NonFiniteLossError: the training loss became NaN/inf; the last good checkpoint remains.
        CheckpointError: checkpoints exist but none can be used, or they belong to another model.
    """
    cfg = validate_train_config(config)
    opt_cfg = cfg["optimizer"]
    num_epochs, log_every = int(cfg["num_epochs"]), int(cfg["log_every"])
    steps_per_epoch = _steps_per_epoch(train_data)
    if steps_per_epoch == 0:
        raise ValueError("train_data yielded no batch for epoch 0")
    total_steps = steps_per_epoch * num_epochs
    optimizer, schedule = make_optimizer(opt_cfg, total_steps=total_steps,
                                         steps_per_epoch=steps_per_epoch)

    try:
        run = RunDirectory(run_dir, tensorboard=bool(cfg["tensorboard"]))
        previous_config = run.read_config()
        written_config = run.write_config(
            full_config if full_config is not None else {"train": cfg})
    except OSError as e:
        raise RunDirectoryError(
            f"cannot write the run directory {run_dir} ({e.strerror or type(e).__name__}: {e}); "
            f"nothing was trained") from e

    def emit(event: str, record: Dict[str, Any]) -> None:
        run.log(event, **record)
        for cb in callbacks:
            cb(event, record)

    compile_log = _CompileLog(run, emit)
    first = next(iter(_epoch_iter(train_data, 0, 0)))
    example = jax.tree.map(lambda x: np.asarray(x)[0], first) if mesh is not None else first
    ema = cfg["ema_decay"] is not None
    state = init_train_state(init_fn, optimizer, jax.random.PRNGKey(int(cfg["seed"])),
                             example, ema=ema)
    ckpt = CheckpointManager(run.checkpoint_dir, keep=int(cfg["keep_checkpoints"]))
    # A full disk or a read-only directory must stop the run here, not at the first checkpoint.
    ckpt.check_writable(state)
    start_epoch, start_batch, best, elapsed_before = 0, 0, None, 0.0
    restored = ckpt.restore_latest(state) if resume else None
    if restored is not None:
        state, loop_state, ckpt_step = restored
        start_epoch = int(loop_state["epoch"])
        start_batch = int(loop_state["batch_in_epoch"])
        best = loop_state.get("best")
        elapsed_before = float(loop_state.get("elapsed_s", 0.0))
        run.truncate_metrics(int(loop_state["metrics_lines"]))
        _log.info("resuming from step %d (epoch %d, batch %d)", ckpt_step, start_epoch, start_batch)
        changed = _config_changes(previous_config, written_config)
        if changed:
            # Allowed (e.g. more epochs at a constant learning rate continue the same run), but a
            # schedule spanning num_epochs, another optimizer or other data change the run.
            _log.warning("resuming %s with a changed config: %s", run_dir, ", ".join(changed))
        emit("resume", {"step": ckpt_step, "epoch": start_epoch, "batch_in_epoch": start_batch,
                        "config_changes": changed})
    else:
        # A fresh start: events left by an earlier attempt that never checkpointed are stale.
        run.truncate_metrics(0)
    state = _replicate(state, mesh)
    run.write_info(num_parameters=count_parameters(state.params), data_stats=data_stats,
                   steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                   mesh_devices=None if mesh is None else int(mesh.devices.size))

    train_step = make_train_step(loss_fn, optimizer, mesh=mesh, ema_decay=cfg["ema_decay"],
                                 compiler_options=cfg["compiler_options"])
    eval_step = make_eval_step(loss_fn, mesh=mesh, compiler_options=cfg["compiler_options"])
    step = int(jax.device_get(state.step))
    last_eval: Dict[str, Dict[str, float]] = {}

    bar = None
    if cfg["progress_bar"]:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
        except ImportError:
            bar = None

    budget = cfg["time_budget_s"]
    started = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    pending: List[Tuple[int, int, Any]] = []  # (step, epoch, device sums) not yet read
    window = {"graphs": 0, "start": time.perf_counter()}

    def flush(epoch: int) -> None:
        """Reads the pending sums to the host (one sync), checks them, logs a train event."""
        if not pending:
            return
        host = jax.device_get([s for _, _, s in pending])
        for (s, e, _), sums in zip(pending, host):
            if not np.isfinite(sums["loss_sum"]):
                good = ckpt.steps()
                where = (f"the last good checkpoint is step {good[-1]} in {ckpt.directory}"
                         if good else "no checkpoint was written yet")
                emit("nonfinite", {"step": s, "epoch": e, "loss_sum": float(sums["loss_sum"])})
                raise NonFiniteLossError(
                    f"non-finite training loss ({sums['loss_sum']}) at step {s} (epoch {e}); "
                    f"stopping; {where}", step=s, epoch=e)
        total = {k: sum(float(h[k]) for h in host) for k in host[0] if k != "grad_norm"}
        metrics = metrics_from_sums(total)
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        items = window["graphs"] if window["graphs"] else total.get("count", 0.0)
        record = {"step": pending[-1][0], "epoch": epoch, **metrics,
                  "grad_norm": float(np.mean([float(h["grad_norm"]) for h in host])),
                  "learning_rate": float(schedule(pending[-1][0] - 1)),
                  "graphs_per_s": items / elapsed}
        pending.clear()
        window["graphs"], window["start"] = 0, time.perf_counter()
        emit("train", record)
        if bar is not None:
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", graphs_s=f"{record['graphs_per_s']:.0f}",
                            epoch=epoch)

    def save(epoch: int, batch_in_epoch: int, best_metric: Optional[float]) -> None:
        loop_state = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
                      "best": best, "seed": int(cfg["seed"]), "elapsed_s": elapsed(),
                      # +1: the checkpoint event below is part of the history to keep.
                      "metrics_lines": run.num_metrics_lines() + 1}
        path = ckpt.save(state, step=step, loop_state=loop_state, best_metric=best_metric)
        emit("checkpoint", {"step": step, "epoch": epoch, "path": str(path),
                            "best": best_metric is not None})

    out_of_time = False
    try:
        for epoch in range(start_epoch, num_epochs):
            skip = start_batch if epoch == start_epoch else 0
            next_batch = skip
            # The host packs and transfers the next batches while the device computes.
            batches = prefetch(((_real_graphs(b), b) for b in _epoch_iter(train_data, epoch, skip)),
                               size=2, transfer=lambda item: (item[0], _to_device(item[1], mesh)))
            with batches:
                for i, (n_graphs, batch) in enumerate(batches, start=skip):
                    if budget is not None and elapsed() >= float(budget):
                        out_of_time = True
                        break
                    state, sums = compile_log.call("train_step", train_step, batch, state, batch)
                    step += 1
                    next_batch = i + 1
                    pending.append((step, epoch, sums))
                    window["graphs"] += n_graphs or 0
                    if bar is not None:
                        bar.update(1)
                    if step % log_every == 0:
                        flush(epoch)
                    every = int(cfg["checkpoint_every_steps"])
                    if every and step % every == 0:
                        flush(epoch)
                        save(epoch, i + 1, None)
            flush(epoch)
            epoch_done = not out_of_time
            trained_this_epoch = next_batch > skip
            if out_of_time:
                emit("time_budget", {"step": step, "epoch": epoch, "elapsed_s": elapsed(),
                                     "time_budget_s": float(budget)})
            best_metric = None
            is_eval = ((epoch + 1) % int(cfg["eval_every"]) == 0 or epoch + 1 == num_epochs
                       or (out_of_time and trained_this_epoch))
            if is_eval and (val_data is not None or test_data is not None):
                params = state.ema_params if ema and cfg["eval_with_ema"] else state.params
                last_eval = {}
                for split, data in (("val", val_data), ("test", test_data)):
                    if data is not None:
                        last_eval[split] = evaluate(eval_step, params, state.model_state, data,
                                                    compile_log=compile_log)
                        emit("eval", {"split": split, "step": step, "epoch": epoch,
                                      **last_eval[split]})
                if "val" in last_eval:
                    value = last_eval["val"].get(cfg["best_metric"])
                    if value is None:
                        raise KeyError(f"best_metric {cfg['best_metric']!r} is not among the "
                                       f"validation metrics {sorted(last_eval['val'])}")
                    if _is_better(value, None if best is None else best["metric"],
                                  cfg["best_mode"]):
                        best = {"metric": value, "epoch": epoch, "step": step, **last_eval}
                        best_metric = value
            if epoch_done:
                save(epoch + 1, 0, best_metric)
            elif trained_this_epoch:
                save(epoch, next_batch, best_metric)
            if out_of_time:
                break
    except BaseException:
        run.close()
        raise
    finally:
        if bar is not None:
            bar.close()

    events = read_metrics(run.metrics_path)
    plot_learning_curves(events, run.path / "learning_curves.png", metric="loss")
    rows = {}
    train_events = [e for e in events if e["event"] == "train"]
    if train_events:
        rows["train"] = {"loss": train_events[-1]["loss"]}
    if best is not None:
        rows.update({f"{k}@best": v for k, v in best.items() if isinstance(v, dict)})
    else:
        rows.update(last_eval)
    table = summary_table(rows)
    compiles = [e for e in events if e["event"] == "compile"]
    print(f"\nrun {run.path}: {step} steps, {len(compiles)} compilations"
          # Epochs counted from 1, as the tasks' results.json "best_epoch" (the record's own
          # "epoch" is the 0-based index of metrics.jsonl).
          + (f", best validation {cfg['best_metric']}={best['metric']:.5g} after epoch "
             f"{best['epoch'] + 1}" if best else "") + "\n" + table)
    emit("summary", {"step": step, "best": best, "last_eval": last_eval, "elapsed_s": elapsed(),
                     "stopped_by_time_budget": out_of_time})
    run.close()
    return FitResult(state=state, best=best, last_eval=last_eval,
                     compilations=list(compile_log.seen.values()), run_dir=run.path,
                     stopped_by_time_budget=out_of_time, elapsed_s=elapsed())
