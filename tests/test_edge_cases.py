"""Numerical edge cases through a whole task model (the tiny QM9 test config): raw molecules ->
graphs -> padded batch -> SEGNN -> loss and gradients.

Each case either works (finite values, finite gradients with respect to the parameters AND the
positions; conftest turns on jax.debug_nans, so any NaN fails) or fails before the model with a
clear message. Complements tests/test_segnn.py (isolated nodes, empty graphs, coincident points on
the fixture model) and tests/test_batching.py (budgets).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import segnn_jax as sj
from segnn_jax.batching import BatchBudget, GraphLoader
from segnn_jax.configs import load_config
from segnn_jax.datasets import qm9 as qm9_data
from segnn_jax.tasks import qm9 as qm9_task
from segnn_jax.tasks.common import batch_budget
from segnn_jax.training import ConfigError

METHANE = [[0, 0, 0], [1.09, 0, 0], [-0.36, 1.03, 0], [-0.36, -0.51, 0.89], [-0.36, -0.51, -0.89]]
CUTOFF = 2.0
PAD = (48, 96, 9)  # one padded shape for every batch: one compilation per function


def _graph(numbers, positions):
    molecules = qm9_data.QM9Molecules(np.array(numbers), np.array(positions, np.float64),
                                      [len(numbers)], [1], np.zeros((1, 15)))
    graph = qm9_data.molecules_to_graphs(molecules, "U0", cutoff=CUTOFF)[0]
    graph.globals["targets"] = np.zeros((1, 1), np.float32)
    return graph


def _empty_graph():
    return sj.make_graph(np.zeros((0, 3), np.float32), np.zeros(0, np.int32),
                         np.zeros(0, np.int32),
                         nodes={"atomic_numbers": np.zeros(0, np.int32),
                                "features": np.zeros((0, 5), np.float32)},
                         globals={"targets": np.zeros((1, 1), np.float32)})


CASES = {
    "coincident_atoms": lambda: _graph([6, 1, 1], [[0, 0, 0], [0, 0, 0], [1.0, 0, 0]]),
    "atoms_exactly_at_the_cutoff": lambda: _graph([6, 1, 8], [[0, 0, 0], [CUTOFF, 0, 0],
                                                               [0, CUTOFF, 0]]),
    "isolated_atom_beside_a_molecule": lambda: _graph([6, 1, 1], [[0, 0, 0], [1, 0, 0],
                                                                  [50, 0, 0]]),
    "one_atom": lambda: _graph([1], [[0, 0, 0]]),
    "empty_graph": _empty_graph,
    "far_from_origin_1e4": lambda: _graph([6, 1, 1, 1, 1], np.array(METHANE) + 1e4),
}


@functools.cache
def _model():
    cfg = qm9_task.validate_config(load_config("test_qm9"))
    model = qm9_task.make_model(cfg)
    loss_fn = qm9_task.make_loss_fn(model, mad=1.0)
    params, state = model.init(jax.random.PRNGKey(0), _batch([]))

    @jax.jit
    def value_and_grads(params, batch):
        def loss(params, positions):
            batch_ = batch._replace(nodes={**batch.nodes, "positions": positions})
            return loss_fn(params, state, batch_, None, False)[0]

        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, batch.nodes["positions"])
        predictions = model.apply(params, state, None, batch)[0]
        return value, grads, predictions

    forward = jax.jit(lambda params, batch: model.apply(params, state, None, batch)[0])
    return params, value_and_grads, forward


def _batch(graphs, dtype=np.float32):
    """Methane followed by ``graphs``, padded to one shape; floating arrays cast to ``dtype``."""
    batch = sj.pad_graph(sj.batch_graphs([_graph([6, 1, 1, 1, 1], METHANE), *graphs]), *PAD)
    cast = lambda x: jnp.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) \
        else jnp.asarray(x)
    return jax.tree.map(cast, batch)


@functools.cache
def _all_cases():
    """Values, gradients and predictions of one batch holding every case (one compilation)."""
    params, value_and_grads, _ = _model()
    value, (grad_params, grad_positions), predictions = value_and_grads(
        params, _batch([CASES[name]() for name in sorted(CASES)]))
    return (np.asarray(value), [np.asarray(g) for g in jax.tree.leaves(grad_params)],
            np.asarray(grad_positions), np.asarray(predictions))


def test_every_edge_case_gives_finite_values_and_gradients():
    value, grad_params, grad_positions, predictions = _all_cases()
    assert np.isfinite(value) and np.isfinite(grad_positions).all()
    assert all(np.isfinite(g).all() for g in grad_params)
    assert np.isfinite(predictions[: 1 + len(CASES)]).all()
    # Graphs of a batch do not interact: methane beside the cases predicts what it does alone.
    params, value_and_grads, _ = _model()
    alone = np.asarray(value_and_grads(params, _batch([]))[2])
    assert predictions[0] == alone[0]
    # Methane moved 1e4 Angstrom away (within float32 precision) predicts the same.
    far = 1 + sorted(CASES).index("far_from_origin_1e4")
    np.testing.assert_allclose(predictions[far], predictions[0], rtol=1e-4, atol=1e-6)


def test_cutoff_is_strict_and_exact():
    at = CASES["atoms_exactly_at_the_cutoff"]()
    assert at.n_edge.tolist() == [0]  # |r| == cutoff: no edge, the atoms are isolated
    inside = _graph([6, 1], [[0, 0, 0], [np.nextafter(CUTOFF, 0), 0, 0]])
    assert inside.n_edge.tolist() == [2]


@pytest.mark.parametrize("offset", [1e6, 1e12])
def test_coordinates_beyond_float32_precision_fail_early(offset):
    """Regression: at 1e12 Angstrom the float32 positions collapsed the molecule onto one point
    and the model predicted something else, silently."""
    with pytest.raises(sj.InvalidPositionsError, match="from the origin.*centre the molecule"):
        _graph([6, 1, 1, 1, 1], np.array(METHANE) + offset)


def test_coordinates_beyond_float32_range_fail_early():
    with pytest.raises(sj.InvalidPositionsError, match="non-finite"):
        _graph([6, 1], [[0, 0, 0], [1e39, 0, 0]])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_inputs_work_and_agree_with_float32(dtype):
    """Half-precision batches run (the float32 parameters promote the computation) and agree with
    float32 inputs to the inputs' precision."""
    params, _, forward = _model()
    cases = [CASES[name]() for name in sorted(CASES)]
    half = np.asarray(forward(params, _batch(cases, dtype)))
    full = _all_cases()[3]
    assert half.dtype == np.float32 and np.isfinite(half).all()
    # Every real graph but the one 1e4 Angstrom from the origin: half precision cannot hold its
    # positions (float16 spacing 8 Angstrom there), a hazard of casting positions, not of the model.
    far = 1 + sorted(CASES).index("far_from_origin_1e4")
    real = [k for k in range(1 + len(CASES)) if k != far]
    np.testing.assert_allclose(half[real], full[real], atol=5e-3 * max(1.0, np.abs(full).max()))


def test_batch_budget_smaller_than_a_molecule_fails_before_training():
    graphs = [_graph([6, 1, 1, 1, 1], METHANE)]
    with pytest.raises(ConfigError, match="max_nodes"):
        batch_budget({"max_nodes": 4, "max_edges": None}, graphs, 4)
    with pytest.raises(ConfigError, match="max_edges"):
        batch_budget({"max_nodes": None, "max_edges": 10}, graphs, 4)
    with pytest.raises(sj.PaddingBudgetError, match=r"graph 0 \(5 nodes, 20 edges\)"):
        GraphLoader(graphs, 1, budget=BatchBudget(5, 64, 2))
