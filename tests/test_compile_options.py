"""The XLA compile options the library compiles with (segnn_jax.compile_options)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segnn_jax import compile_options
from tests import model_fixtures as mf

OPTION = "xla_cpu_experimental_ynn_fusion_type"


@pytest.fixture
def supported():
    if jax.default_backend() != "cpu" or not compile_options._cpu_accepts_options():
        pytest.skip("the installed jaxlib has no YNNPACK fusion option (nothing to tune)")


def _gate_backward(x):
    """A reduction over 3 components times a sigmoid's derivative, as a gate's backward has."""
    vectors, gates = x[..., :3], x[..., 3]
    return jax.grad(lambda g: jnp.sum(jax.nn.sigmoid(g)[..., None] * vectors))(gates)


def _library_fusions(jitted, x) -> int:
    return jitted.lower(x).compile().as_text().count("__ynn_fusion")


def test_options_on_cpu_only(supported):
    assert compile_options.compiler_options() == compile_options.CPU_OPTIONS
    assert compile_options.compiler_options("cpu") == compile_options.CPU_OPTIONS
    assert compile_options.compiler_options("gpu") == {}
    assert compile_options.compiler_options("tpu") == {}


def test_switched_off_by_the_environment(supported, monkeypatch):
    monkeypatch.setenv(compile_options.DISABLE_VARIABLE, "1")
    assert compile_options.compiler_options() == {}
    monkeypatch.setenv(compile_options.DISABLE_VARIABLE, "0")
    assert compile_options.compiler_options() == compile_options.CPU_OPTIONS


def test_a_users_xla_flags_win(supported, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{OPTION}=dot,reduce")
    assert compile_options.compiler_options() == {}


def test_reductions_leave_the_library(supported):
    """XLA's default hands these reductions to YNNPACK; compiled by ``jit`` they stay with XLA,
    and a caller's own options override the library's."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2000, 32, 4)), jnp.float32)
    default = _library_fusions(jax.jit(_gate_backward), x)
    if default == 0:
        pytest.skip("this jaxlib keeps these reductions out of YNNPACK by default")
    assert _library_fusions(compile_options.jit(_gate_backward), x) == 0
    override = compile_options.jit(
        _gate_backward, compiler_options={OPTION: "LIBRARY_FUSION_TYPE_REDUCE"})
    assert _library_fusions(override, x) > 0
    np.testing.assert_allclose(compile_options.jit(_gate_backward)(x), jax.jit(_gate_backward)(x),
                               rtol=1e-6, atol=1e-7)


def test_options_given_to_jit_follow_the_librarys_rules(monkeypatch):
    """A caller's options update the library's; ``xla_cpu_*`` ones apply on CPU only; an option
    that ``XLA_FLAGS`` sets is left to it."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    legacy = {"xla_cpu_use_fusion_emitters": False}
    library = compile_options.compiler_options("cpu")
    assert compile_options.resolve_options(legacy, "cpu") == {**library, **legacy}
    assert compile_options.resolve_options(legacy, "gpu") == {}
    assert compile_options.resolve_options({"xla_gpu_autotune_level": 0}, "gpu") == {
        "xla_gpu_autotune_level": 0}
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                    "--xla_cpu_use_fusion_emitters=true")
    assert compile_options.resolve_options(legacy, "cpu") == library


@pytest.mark.parametrize("bad, message", [
    ({"cpu_use_fusion_emitters": False}, "XLA option names start with 'xla_'"),
    ({"xla_no_such_option": 1}, "xla_no_such_option=1: XLA refuses it"),
    ({"xla_cpu_use_fusion_emitters": "sometimes"}, "XLA refuses it"),
    ({"xla_cpu_use_fusion_emitters": [False]}, "expected a bool, number or string"),
])
def test_check_options_names_the_bad_option(bad, message):
    with pytest.raises(ValueError, match=message):
        compile_options.check_options(bad)
    compile_options.check_options({"xla_cpu_use_fusion_emitters": False})
    compile_options.check_options(None)


def _value_and_grad_through_both(model, graph, options=None):
    """(loss, gradients) of ``model`` compiled by ``jit`` with ``options`` and by plain
    ``jax.jit``, and the two compiled programs."""
    params, state = model.init(jax.random.PRNGKey(0), graph, graph.nodes["positions"],
                               graph.nodes["velocities"])

    def loss(params):
        out, _ = model.apply(params, state, graph, graph.nodes["positions"],
                             graph.nodes["velocities"], True)
        return jnp.sum(out ** 2)

    tuned = compile_options.jit(jax.value_and_grad(loss),
                                compiler_options=options).lower(params).compile()
    plain = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return tuned, plain, tuned(params), plain(params)


def test_legacy_fusion_emitters_give_the_same_gradients():
    """The QM9 configs' option (XLA's legacy fusion emitters) on a model with scanned layers, as
    QM9's: loss and gradients equal plain ``jax.jit``'s to 1e-5. (The QM9 configs' own model
    trains with it in tests/test_qm9_task.py.)"""
    rng = np.random.default_rng(4)
    graph = mf.to_device(mf.pad([mf.random_graph(rng, 5) for _ in range(4)], 24, 84, 5))
    model = mf.make_model(task="graph", contraction_order="weights_first", scan_layers=True)
    *_, tuned, plain = _value_and_grad_through_both(
        model, graph, {"xla_cpu_use_fusion_emitters": False})
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_gradients_match_xla_defaults():
    """Loss and gradients of a SEGNN through ``jit`` and through plain ``jax.jit`` agree to 1e-5
    (the options change which library runs a fusion, not the function). The channels are wide
    enough that XLA's defaults hand the gates' reductions to YNNPACK."""
    rng = np.random.default_rng(3)
    graphs = [mf.random_graph(rng, 5) for _ in range(20)]  # 400 edges
    graph = mf.to_device(mf.pad(graphs, 104, 404, 21))
    model = mf.make_model(layers=2, contraction_order="weights_first", hidden="8x0e+8x1o")
    tuned_program, plain_program, tuned, plain = _value_and_grad_through_both(model, graph)
    if compile_options.compiler_options():
        assert (tuned_program.as_text().count("__ynn_fusion")
                < plain_program.as_text().count("__ynn_fusion"))
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_inside_another_trace_it_runs_as_plain_jit():
    """JAX refuses compile options on a nested jit; the library's jitted functions (a training
    step) still compose with a user's own jit and scan."""
    double = compile_options.jit(lambda x: 2.0 * x)
    x = jnp.arange(3.0)

    @jax.jit
    def outer(x):
        return jax.lax.scan(lambda carry, _: (double(carry), None), x, None, length=3)[0]

    np.testing.assert_allclose(outer(x), 8.0 * x)
    np.testing.assert_allclose(double(x), 2.0 * x)
    assert double.lower(x).compile() is not None
