"""Train/eval steps of segnn_jax.training.step: padding invariance, data parallelism, EMA, metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import tiny_graphs

from segnn_jax.graph import batch_graphs, graph_mask, node_graph_index, pad_graph
from segnn_jax.training import (data_mesh, init_train_state, make_eval_step,
                                make_optimizer, make_train_step, metrics_from_sums, stack_batches)

REPO = Path(__file__).resolve().parents[1]


# The tiny model and task; the multi-device subprocess imports them from this file.
def _forward(graph):
    x = jnp.concatenate([graph.nodes["features"], graph.nodes["positions"]], axis=-1)
    h = hk.nets.MLP([8, 4], activation=jax.nn.silu)(x)  # [N, 4]
    n_nodes, n_graphs = x.shape[0], graph.n_node.shape[0]
    messages = jax.ops.segment_sum(h[graph.senders], graph.receivers, num_segments=n_nodes)
    h = hk.Linear(1)(jnp.concatenate([h, messages], axis=-1))  # [N, 1]
    return jax.ops.segment_sum(h, node_graph_index(graph), num_segments=n_graphs)  # [G, 1]


MODEL = hk.transform_with_state(_forward)


def loss_fn(params, model_state, graph, rng, is_training):
    pred, model_state = MODEL.apply(params, model_state, rng, graph)
    mask = graph_mask(graph)
    err = pred[:, 0] - graph.globals["targets"][:, 0]
    sums = {"count": jnp.sum(mask).astype(jnp.float32),
            "abs_error_sum": jnp.sum(jnp.where(mask, jnp.abs(err), 0.0))}
    return jnp.sum(jnp.where(mask, err ** 2, 0.0)), (sums, model_state)


def _opt():
    return make_optimizer({"optimizer": "adam", "learning_rate": 1e-2, "weight_decay": 1e-3},
                          total_steps=10)[0]


def _fresh_state(opt, batch, seed=0, ema=False):
    return init_train_state(MODEL.init, opt, jax.random.PRNGKey(seed), batch, ema=ema)


def test_padding_does_not_change_any_number():
    graphs = batch_graphs(tiny_graphs(5, seed=1))
    small = pad_graph(graphs, 40, 120, 7)
    large = pad_graph(graphs, 96, 300, 16)
    opt = _opt()
    eval_step = make_eval_step(loss_fn)
    state = _fresh_state(opt, small)
    a = metrics_from_sums(jax.device_get(eval_step(state.params, state.model_state, small)))
    b = metrics_from_sums(jax.device_get(eval_step(state.params, state.model_state, large)))
    assert a["count"] == b["count"] == 5
    for key in ("loss", "abs_error"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6)
    step = make_train_step(loss_fn, opt)
    sa, ma = step(_fresh_state(opt, small), small)
    sb, mb = step(_fresh_state(opt, small), large)
    np.testing.assert_allclose(ma["loss_sum"] / ma["count"], mb["loss_sum"] / mb["count"], rtol=1e-6)
    np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_train_step_traces_hybrid_products_weights_first_only(monkeypatch):
    """Everything the training step's loss computes is differentiated, so its hybrid products are
    traced weights-first only (``differentiated_hybrid``); the evaluation step's stay hybrid and
    run couple-first. Counted by the couple-first coupling's calls while each step is traced."""
    import e3nn_jax as e3nn

    from segnn_jax import tensor_product as tp

    spec = tp.make_spec(["2x0e+1x1o"], "0e+1o", "2x0e+1x1o")
    weights = tp.init_weights(jax.random.PRNGKey(0), spec)
    features = e3nn.normal("2x0e+1x1o", jax.random.PRNGKey(1), (4,))
    attr = e3nn.normal("0e+1o", jax.random.PRNGKey(2), (4,))
    couplings = []
    couple = tp._couple_components
    monkeypatch.setattr(tp, "_couple_components", lambda *a: couplings.append(1) or couple(*a))

    def product(scale):
        scaled = [w * scale for w in weights]
        return tp.tensor_product(spec, scaled, [features], attr, order="hybrid").array

    def hybrid_loss(params, model_state, graph, rng, is_training):
        loss_sum, (sums, model_state) = loss_fn(params, model_state, graph, rng, is_training)
        scale = jnp.mean(jax.tree.leaves(params)[0])
        # Traced to a jaxpr before differentiation, as in SEGNN's scanned layers; a new function
        # each time, since jit would reuse a trace made with the other setting.
        out = jax.jit(lambda s: product(s))(scale)
        return loss_sum + jnp.sum(out ** 2), (sums, model_state)

    graphs = pad_graph(batch_graphs(tiny_graphs(3, seed=2)), 24, 80, 4)
    opt = _opt()
    state = _fresh_state(opt, graphs)
    jax.clear_caches()  # JAX keeps the traces of a custom_vjp's primal
    make_train_step(hybrid_loss, opt, donate=False).trace(state, graphs)
    assert couplings == []
    make_eval_step(hybrid_loss).trace(state.params, state.model_state, graphs)
    assert couplings


def test_eval_sums_add_up_over_batches():
    graphs = tiny_graphs(6, seed=2)
    whole = pad_graph(batch_graphs(graphs), 64, 200, 8)
    parts = [pad_graph(batch_graphs(graphs[:2]), 32, 100, 4),
             pad_graph(batch_graphs(graphs[2:]), 32, 100, 6)]
    opt = _opt()
    state = _fresh_state(opt, whole)
    eval_step = make_eval_step(loss_fn)
    one = metrics_from_sums(jax.device_get(eval_step(state.params, state.model_state, whole)))
    sums = [jax.device_get(eval_step(state.params, state.model_state, p)) for p in parts]
    two = metrics_from_sums({k: sum(s[k] for s in sums) for k in sums[0]})
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-6)
    np.testing.assert_allclose(one["abs_error"], two["abs_error"], rtol=1e-6)


def test_one_device_mesh_equals_plain_jit():
    graphs = pad_graph(batch_graphs(tiny_graphs(4, seed=3)), 32, 100, 6)
    opt = _opt()
    plain = make_train_step(loss_fn, opt)(_fresh_state(opt, graphs), graphs)
    meshed = make_train_step(loss_fn, opt, mesh=data_mesh(jax.devices()[:1]))(
        _fresh_state(opt, graphs), stack_batches([graphs]))
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(meshed)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mesh", [False, True], ids=["one_device", "mesh"])
def test_compiler_options_reach_both_steps(mesh):
    """The steps compile with the options they are given: legacy fusion emitters give the same
    numbers, and an option XLA refuses fails the first call, naming the option."""
    graphs = pad_graph(batch_graphs(tiny_graphs(4, seed=3)), 32, 100, 6)
    mesh = data_mesh(jax.devices()[:1]) if mesh else None
    batch = stack_batches([graphs]) if mesh is not None else graphs
    opt = _opt()
    legacy = {"xla_cpu_use_fusion_emitters": False}
    plain = make_train_step(loss_fn, opt, mesh=mesh)(_fresh_state(opt, graphs), batch)
    tuned = make_train_step(loss_fn, opt, mesh=mesh, compiler_options=legacy)(
        _fresh_state(opt, graphs), batch)
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(tuned)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    state = _fresh_state(opt, graphs)
    np.testing.assert_allclose(
        make_eval_step(loss_fn, mesh=mesh, compiler_options=legacy)(
            state.params, state.model_state, batch)["loss_sum"],
        make_eval_step(loss_fn, mesh=mesh)(state.params, state.model_state, batch)["loss_sum"],
        rtol=1e-6)
    refused = {"xla_cpu_use_fusion_emitters": "sometimes"}
    with pytest.raises(Exception, match="xla_cpu_use_fusion_emitters"):
        make_train_step(loss_fn, opt, mesh=mesh, compiler_options=refused)(
            _fresh_state(opt, graphs), batch)
    with pytest.raises(Exception, match="xla_cpu_use_fusion_emitters"):
        make_eval_step(loss_fn, mesh=mesh, compiler_options=refused)(
            state.params, state.model_state, batch)


def test_ema_tracks_parameters_and_step_counts():
    graphs = pad_graph(batch_graphs(tiny_graphs(3, seed=4)), 32, 100, 4)
    opt = _opt()
    state = _fresh_state(opt, graphs, ema=True)
    p0 = jax.tree.map(np.asarray, state.params)
    step = make_train_step(loss_fn, opt, ema_decay=0.9, donate=False)
    new, _ = step(state, graphs)
    assert int(new.step) == 1
    # Warm-up: the first update averages with weight (1 + 0) / (10 + 0) = 0.1 on the old average.
    for e, p, q in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(p0),
                       jax.tree.leaves(new.params)):
        np.testing.assert_allclose(e, 0.1 * p + 0.9 * np.asarray(q), rtol=1e-5, atol=1e-7)
    # Late in training the decay is ema_decay itself.
    late = state._replace(step=jnp.asarray(1000, state.step.dtype))
    later, _ = step(late, graphs)
    for e, p, q in zip(jax.tree.leaves(later.ema_params), jax.tree.leaves(p0),
                       jax.tree.leaves(later.params)):
        np.testing.assert_allclose(e, 0.9 * p + 0.1 * np.asarray(q), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="ema_params"):
        make_train_step(loss_fn, opt, ema_decay=0.9)(_fresh_state(opt, graphs), graphs)


def test_missing_count_is_a_clear_error():
    graphs = pad_graph(batch_graphs(tiny_graphs(2, seed=5)), 16, 40, 3)
    opt = _opt()

    def bad_loss(params, model_state, graph, rng, is_training):
        loss_sum, (sums, st) = loss_fn(params, model_state, graph, rng, is_training)
        return loss_sum, ({"abs_error_sum": sums["abs_error_sum"]}, st)

    with pytest.raises(KeyError, match="count"):
        make_train_step(bad_loss, opt)(_fresh_state(opt, graphs), graphs)


def test_metrics_from_sums_uses_own_counts():
    out = metrics_from_sums({"loss_sum": 8.0, "count": 4.0, "force_sum": 9.0, "force_count": 3.0})
    assert out == {"loss": 2.0, "force": 3.0, "count": 4.0, "force_count": 3.0}


MULTI_DEVICE_SCRIPT = '''
import json
import sys

import jax
import numpy as np

sys.path.insert(0, "tests")
from test_training_step import MODEL, loss_fn, tiny_graphs
from segnn_jax.graph import batch_graphs, pad_graph
from segnn_jax.training import (data_mesh, init_train_state, make_optimizer, make_train_step,
                                make_eval_step, metrics_from_sums, stack_batches)

assert jax.device_count() == 4, jax.devices()
# Unequal numbers of graphs per device: a mean of per-device means would differ from the true mean.
sizes = [1, 2, 3, 6]
graphs = tiny_graphs(sum(sizes), seed=7)
groups, start = [], 0
for n in sizes:
    groups.append(graphs[start:start + n])
    start += n
per_device = stack_batches([pad_graph(batch_graphs(g), 40, 160, 8) for g in groups])
single = pad_graph(batch_graphs(graphs), 64, 400, 16)
opt = make_optimizer({"optimizer": "adam", "learning_rate": 1e-2, "weight_decay": 1e-3},
                     total_steps=10)[0]
mesh = data_mesh()
results = {}
for name, step, batch in (("multi", make_train_step(loss_fn, opt, mesh=mesh), per_device),
                          ("single", make_train_step(loss_fn, opt), single)):
    state = init_train_state(MODEL.init, opt, jax.random.PRNGKey(0), single)
    losses, norms = [], []
    for _ in range(3):
        state, sums = step(state, batch)
        losses.append(float(sums["loss_sum"] / sums["count"]))
        norms.append(float(sums["grad_norm"]))
    ev = make_eval_step(loss_fn, mesh=mesh if name == "multi" else None)
    results[name] = {"loss": losses, "grad_norm": norms,
                     "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
                     "eval": metrics_from_sums(jax.device_get(ev(state.params, state.model_state, batch)))}
print("RESULT" + json.dumps(results))
'''


def test_four_devices_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], env=env, cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    multi, single = res["multi"], res["single"]
    np.testing.assert_allclose(multi["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(multi["grad_norm"], single["grad_norm"], rtol=1e-5)
    for a, b in zip(multi["params"], single["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert multi["eval"]["count"] == single["eval"]["count"] == 12
    np.testing.assert_allclose(multi["eval"]["loss"], single["eval"]["loss"], rtol=1e-5)
