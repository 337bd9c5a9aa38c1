"""The training loop of segnn_jax.training.loop: run directory, resume, NaN stop, config, compiles."""

import json

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import tiny_graphs

from segnn_jax.batching import BatchBudget, GraphLoader
from segnn_jax.graph import batch_graphs, graph_mask, node_graph_index, pad_graph
from segnn_jax.training import (CheckpointManager, ConfigError, NonFiniteLossError, fit,
                                read_metrics)


def _forward(graph):
    x = jnp.concatenate([graph.nodes["features"], graph.nodes["positions"]], axis=-1)
    h = hk.nets.MLP([8, 1], activation=jax.nn.silu)(x)  # [N, 1]
    return jax.ops.segment_sum(h, node_graph_index(graph), num_segments=graph.n_node.shape[0])


MODEL = hk.transform_with_state(_forward)


def loss_fn(params, model_state, graph, rng, is_training):
    pred, model_state = MODEL.apply(params, model_state, rng, graph)
    mask = graph_mask(graph)
    err = pred[:, 0] - graph.globals["targets"][:, 0]
    sums = {"count": jnp.sum(mask).astype(jnp.float32),
            "abs_error_sum": jnp.sum(jnp.where(mask, jnp.abs(err), 0.0))}
    return jnp.sum(jnp.where(mask, err ** 2, 0.0)), (sums, model_state)


GRAPHS = tiny_graphs(8, seed=0)
VAL = [pad_graph(batch_graphs(tiny_graphs(5, seed=1)), 32, 100, 6)]


def train_batches(epoch, seed=0, poison_epoch=None):
    """4 batches of 2 graphs; the order is a pure function of (seed, epoch), as resume needs."""
    order = np.random.default_rng([seed, epoch]).permutation(len(GRAPHS))
    batches = []
    for i in range(0, len(order), 2):
        batch = pad_graph(batch_graphs([GRAPHS[j] for j in order[i:i + 2]]), 16, 48, 3)
        if epoch == poison_epoch and i == 2:
            batch.globals["targets"][:] = np.nan
        batches.append(batch)
    return batches


def _config(**overrides):
    config = {"num_epochs": 3, "log_every": 2, "eval_every": 1, "progress_bar": False,
              "optimizer": {"optimizer": "adam", "learning_rate": 1e-2, "weight_decay": 1e-6,
                            "schedule": "multistep", "decay_fractions": [0.5]}}
    config.update(overrides)
    return config


def test_fit_writes_a_complete_run_directory(tmp_path, capsys):
    result = fit(MODEL.init, loss_fn, train_batches, config=_config(), run_dir=tmp_path,
                 val_data=VAL, test_data=VAL, data_stats={"n_train": 8})
    for name in ("config.json", "run_info.json", "metrics.jsonl", "learning_curves.png"):
        assert (tmp_path / name).is_file(), name
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["num_parameters"] == sum(np.size(x) for x in jax.tree.leaves(result.state.params))
    assert info["data_stats"] == {"n_train": 8} and info["versions"]["jax"] == jax.__version__
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_epochs"] == 3
    events = read_metrics(tmp_path)
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [2, 4, 6, 8, 10, 12]
    assert train[0]["learning_rate"] == pytest.approx(1e-2) and train[-1]["learning_rate"] == pytest.approx(1e-3)
    evals = [e for e in events if e["event"] == "eval" and e["split"] == "val"]
    assert len(evals) == 3 and all(e["count"] == 5 for e in evals)
    assert result.best["metric"] == min(e["loss"] for e in evals)
    # One shape for training, one for evaluation.
    assert [c["fn"] for c in result.compilations] == ["train_step", "eval_step"]
    assert result.compilations[0]["shapes"] == {"n_graph": 3, "n_edge": 48, "n_node": 16}
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.steps()[-1] == 12 and manager.best()["step"] == result.best["step"]
    printed = capsys.readouterr().out
    assert "val@best" in printed
    assert f"after epoch {result.best['epoch'] + 1}\n" in printed  # counted from 1


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_kill_and_resume_gives_the_same_parameters(tmp_path):
    config = _config(checkpoint_every_steps=3)
    straight = fit(MODEL.init, loss_fn, train_batches, config=config, run_dir=tmp_path / "a",
                   val_data=VAL)

    class Killed(Exception):
        pass

    def kill(event, record):
        # Dies mid-epoch 1, one step after the step-6 checkpoint: step 7 is recomputed on resume.
        if event == "train" and record["step"] == 8:
            raise Killed

    with pytest.raises(Killed):
        fit(MODEL.init, loss_fn, train_batches, config=config, run_dir=tmp_path / "b",
            val_data=VAL, callbacks=[kill])
    assert CheckpointManager(tmp_path / "b" / "checkpoints").steps()[-1] == 6
    resumed = fit(MODEL.init, loss_fn, train_batches, config=config, run_dir=tmp_path / "b",
                  val_data=VAL)
    assert int(resumed.state.step) == int(straight.state.step) == 12
    for a, b in zip(_params(straight.state), _params(resumed.state)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(straight.state.opt_state), jax.tree.leaves(resumed.state.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def history(run):
        return [(e["event"], e["step"], e.get("loss")) for e in read_metrics(tmp_path / run)
                if e["event"] in ("train", "eval")]

    assert history("a") == history("b")  # events after the checkpoint were dropped, not doubled


def test_resume_reports_a_changed_config(tmp_path, caplog):
    """A resume with other options is allowed (more epochs at a constant learning rate continue
    the same run) but named: in the log and in the resume event."""
    config = _config(num_epochs=2)
    fit(MODEL.init, loss_fn, train_batches, config=config, run_dir=tmp_path, val_data=VAL)
    fit(MODEL.init, loss_fn, train_batches, config=config, run_dir=tmp_path, val_data=VAL)
    assert [e["config_changes"] for e in read_metrics(tmp_path) if e["event"] == "resume"] == [[]]
    caplog.set_level("WARNING", logger="segnn_jax.training.loop")
    longer = _config(num_epochs=3, log_every=4)
    result = fit(MODEL.init, loss_fn, train_batches, config=longer, run_dir=tmp_path,
                 val_data=VAL)
    resumes = [e for e in read_metrics(tmp_path) if e["event"] == "resume"]
    assert resumes[-1]["config_changes"] == ["train.log_every", "train.num_epochs"]
    assert "changed config: train.log_every, train.num_epochs" in caplog.text
    assert int(result.state.step) == 12  # it continued to the new number of epochs


class _Clock:
    """A fake ``time`` module for the loop: 10 s pass at every logged training step."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def tick(self, event, record):
        if event == "train":
            self.now += 10.0


def test_time_budget_stops_mid_epoch_evaluates_and_resumes_exactly(tmp_path, monkeypatch):
    from segnn_jax.training import loop

    clock = _Clock()
    monkeypatch.setattr(loop, "time", clock)
    config = _config(log_every=1, time_budget_s=25.0)
    stopped = fit(MODEL.init, loss_fn, train_batches, config=config, run_dir=tmp_path / "b",
                  val_data=VAL, callbacks=[clock.tick])
    # Steps start at 0, 10 and 20 s; the fourth would start at 30 s > 25 s: mid-epoch 0.
    assert int(stopped.state.step) == 3 and stopped.best["step"] == 3
    assert stopped.stopped_by_time_budget and stopped.elapsed_s == 30.0
    events = read_metrics(tmp_path / "b")
    assert [e["step"] for e in events if e["event"] == "time_budget"] == [3]
    assert events[-1]["stopped_by_time_budget"] and events[-1]["elapsed_s"] == 30.0
    # The elapsed time is in the checkpoint: resuming with the same budget trains nothing more.
    again = fit(MODEL.init, loss_fn, train_batches, config=config, run_dir=tmp_path / "b",
                val_data=VAL, callbacks=[clock.tick])
    assert int(again.state.step) == 3
    # A larger budget continues from batch 3 of epoch 0 to the same parameters as a straight run.
    monkeypatch.setattr(loop, "time", __import__("time"))
    resumed = fit(MODEL.init, loss_fn, train_batches, config=_config(log_every=1),
                  run_dir=tmp_path / "b", val_data=VAL)
    straight = fit(MODEL.init, loss_fn, train_batches, config=_config(log_every=1),
                   run_dir=tmp_path / "a", val_data=VAL)
    assert int(resumed.state.step) == 12
    for a, b in zip(_params(straight.state), _params(resumed.state)):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poisoned(epoch):
        return train_batches(epoch, poison_epoch=1)

    with jax.debug_nans(False), pytest.raises(NonFiniteLossError, match=r"step 6 \(epoch 1\)") as info:
        fit(MODEL.init, loss_fn, poisoned, config=_config(), run_dir=tmp_path, val_data=VAL)
    assert info.value.step == 6 and info.value.epoch == 1
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.steps() == [4]
    events = read_metrics(tmp_path)
    assert events[-1]["event"] == "nonfinite" and events[-1]["step"] == 6
    # Resuming with clean data continues from the good checkpoint.
    resumed = fit(MODEL.init, loss_fn, train_batches, config=_config(), run_dir=tmp_path,
                  val_data=VAL)
    assert all(np.isfinite(p).all() for p in _params(resumed.state))


@pytest.mark.parametrize("train, message", [
    ({"num_epoch": 3}, r"config\.train\.num_epoch: unknown option; did you mean config\.train\.num_epochs"),
    ({"optimizer": {"learning_rate": 0.0}}, r"config\.train\.optimizer\.learning_rate: must be > 0"),
    ({"optimizer": {"learning_rat": 1e-3}}, r"config\.train\.optimizer\.learning_rat: unknown option"),
    ({"log_every": -5}, r"config\.train\.log_every: must be > 0"),
    ({"optimizer": {"schedule": "multistep"}}, r"decay_fractions"),
])
def test_bad_config_fails_before_compilation(tmp_path, train, message):
    def init_fn(*args):
        pytest.fail("the model was initialised (and compiled) before the config was checked")

    def data(epoch):
        pytest.fail("data was read before the config was checked")

    with pytest.raises(ConfigError, match=message):
        fit(init_fn, loss_fn, data, config=train, run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_real_loader_compiles_a_bounded_number_of_shapes(tmp_path):
    graphs = tiny_graphs(40, seed=3)
    loader = GraphLoader(graphs, 6, budget=BatchBudget(32, 128, 7), shuffle=True, seed=0)
    val = GraphLoader(tiny_graphs(9, seed=4), 6, budget=BatchBudget(32, 128, 7))
    result = fit(MODEL.init, loss_fn, loader, config=_config(num_epochs=2, log_every=3),
                 run_dir=tmp_path, val_data=val)
    train_shapes = [c for c in result.compilations if c["fn"] == "train_step"]
    assert 1 <= len(train_shapes) <= 4
    evals = [e for e in read_metrics(tmp_path) if e["event"] == "eval"]
    assert all(e["count"] == 9 for e in evals)  # every validation graph exactly once
