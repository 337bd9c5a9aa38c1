"""Smoke tests of the benchmark code on tiny configurations (no timing assertions)."""

import io
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, inputs, throughput
from segnn_jax.training.config import ConfigError


def tiny_spec(name, **overrides):
    """A configuration's settings with a small model, so compilation takes seconds."""
    return dict(inputs.CONFIGS[name], name=name, **overrides)


def test_nbody_batch_has_reference_sizes():
    arrays = inputs.nbody_batch()
    assert arrays["positions"].shape == (500, 3)
    assert arrays["senders"].shape == arrays["receivers"].shape == (2000,)
    assert arrays["features"].shape == (500, 7)
    assert arrays["n_node"].tolist() == [5] * 100 and arrays["n_edge"].tolist() == [20] * 100
    # Every edge stays inside its own system (offsets applied per graph).
    assert np.array_equal(arrays["senders"] // 5, arrays["receivers"] // 5)
    assert not np.any(arrays["senders"] == arrays["receivers"])


def test_molecule_like_stand_ins_are_valid_radius_graphs():
    arrays, source = inputs.qm9_batch(n_graphs=6, use_data=False)
    assert source == "random molecule-like graphs"
    vectors = arrays["positions"][arrays["senders"]] - arrays["positions"][arrays["receivers"]]
    lengths = np.linalg.norm(vectors, axis=1)
    assert np.all(lengths < 2.0) and np.all(lengths > 0.9)
    assert arrays["n_node"].sum() == len(arrays["positions"]) == len(arrays["features"])
    assert arrays["n_edge"].sum() == len(arrays["senders"])
    np.testing.assert_array_equal(arrays["features"].sum(axis=1), 1.0)


def test_oc20_batch_edges_respect_the_cutoff_under_pbc():
    arrays = inputs.oc20_batch(n_graphs=2, cutoff=4.0)
    vectors = (
        arrays["positions"][arrays["senders"]]
        - arrays["positions"][arrays["receivers"]]
        + arrays["shifts"]
    )
    lengths = np.linalg.norm(vectors, axis=1)
    assert np.all(lengths < 4.0 + 1e-4) and np.all(lengths > 0.5)
    assert np.any(np.abs(arrays["shifts"]).sum(axis=1) > 0), (
        "a periodic slab has edges across the cell"
    )
    assert arrays["atomic_numbers"].shape == (arrays["n_node"].sum(),)
    assert arrays["targets"].shape == (2, 1)


def test_build_rejects_unknown_configuration():
    with pytest.raises(inputs.UnknownConfigError, match="nbody"):
        inputs.build("md17")


def test_save_load_round_trip(tmp_path):
    arrays = inputs.nbody_batch(n_graphs=2)
    spec = tiny_spec("nbody", source="test")
    inputs.save(tmp_path / "batch.npz", arrays, spec)
    loaded, loaded_spec = inputs.load(tmp_path / "batch.npz")
    assert loaded_spec == spec
    assert sorted(loaded) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].dtype == value.dtype



def test_saved_batches_are_read_back_for_the_same_configuration(tmp_path, capsys):
    inputs.main(["--save", str(tmp_path), "--configs", "nbody"])
    assert "nbody: 500 nodes, 2000 edges" in capsys.readouterr().out
    loaded, spec = inputs.build_or_load("nbody", tmp_path)
    built, built_spec = inputs.build("nbody")
    assert spec == built_spec
    for key, value in built.items():
        np.testing.assert_array_equal(loaded[key], value)
    # Only the configurations that were saved can be read; the error names the command.
    with pytest.raises(FileNotFoundError, match="--save"):
        inputs.build_or_load("qm9", tmp_path)


def test_update_keeps_the_files_other_records(tmp_path, monkeypatch):
    """``--update`` replaces only the measured configurations' records: the other
    configurations, notes, commands and superseded runs of the file stay; each new record names
    its git revision."""
    monkeypatch.setattr(common, "matmul_gflops", lambda: {"n": 2048, "median_gflops": 1.0})
    out = tmp_path / "throughput.json"
    out.write_text(json.dumps({"configs": {"oc20": {"train_step_ms": 1.0}}, "note": "kept",
                               "superseded": {"qm9_before": {"train_step_ms": 2.0}}}))
    throughput.main(["--configs", "nbody", "--batches", str(tmp_path / "no_batches"),
                     "--in-process", "--update", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["note"] == "kept"
    assert result["superseded"] == {"qm9_before": {"train_step_ms": 2.0}}
    assert result["configs"]["oc20"] == {"train_step_ms": 1.0}
    assert "FileNotFoundError" in result["configs"]["nbody"]["error"]
    assert result["configs"]["nbody"]["git_revision"]


def test_summarise_reports_milliseconds():
    summary = common.summarise([0.001, 0.002, 0.003, 0.004, 0.005])
    assert summary["median_ms"] == pytest.approx(3.0)
    assert summary["iqr_ms"] == pytest.approx(2.0)
    assert summary["min_ms"] == pytest.approx(1.0)
    assert summary["runs"] == 5


def test_time_calls_stops_at_the_time_budget_after_three_calls():
    calls = []
    durations = common.time_calls(
        lambda: calls.append(1) or jnp.zeros(()), repeats=100, max_seconds=0.0
    )
    assert len(durations) == len(calls) == 3


def test_cost_flops_counts_a_matmul():
    x = jnp.ones((16, 32), jnp.float32)
    y = jnp.ones((32, 8), jnp.float32)
    compiled, seconds, flops = common.compile_timed(jnp.matmul, x, y)
    assert seconds > 0
    if flops is None:
        pytest.skip("this backend gives no cost analysis")
    assert flops == pytest.approx(2 * 16 * 32 * 8, rel=0.1)
    np.testing.assert_allclose(compiled(x, y), 32.0)


def test_train_step_rejects_unknown_loss():
    with pytest.raises(ValueError, match="loss"):
        common.make_train_step(lambda p, s, b: (p, s), "huber")


def test_contraction_order_is_the_configurations_on_the_e3nn_path_only():
    spec = tiny_spec("nbody")
    assert spec["contraction_order"] == "weights_first"
    assert throughput.resolve_contraction_order("config", spec) == "weights_first"
    # cuequivariance runs its own kernels: weights-first would be refused there.
    assert throughput.resolve_contraction_order("config", spec, "cuequivariance") == "couple_first"
    assert throughput.resolve_contraction_order(None, spec, "cuequivariance") == "couple_first"
    assert throughput.resolve_contraction_order("couple_first", spec) == "couple_first"
    assert throughput.resolve_contraction_order("hybrid", spec) == "hybrid"
    with pytest.raises(ConfigError, match="contraction_order"):
        throughput.resolve_contraction_order("fastest", spec)


def test_our_nbody_bench_compiles_trains_and_times():
    arrays = inputs.nbody_batch(n_graphs=3)
    # No message-passing layer: the embedding and heads exercise the same benchmark code and
    # compile in seconds.
    bench = throughput.build_ours(arrays, tiny_spec("nbody", hidden="2x0e+1x1o", layers=0))
    assert bench.n_params > 0
    forward = bench.compile("forward")
    step = bench.compile("train_step")
    assert forward["compile_s"] > 0 and step["compile_s"] > 0
    assert bench.call("forward").shape == (15, 3)
    new_params, _, _, loss = bench.call("train_step")
    assert np.isfinite(float(loss))
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), bench.params, new_params)
    assert any(jax.tree_util.tree_leaves(changed)), "an Adam step must move the parameters"
    assert len(bench.time("train_step", repeats=3, max_seconds=0.0, warmup=1)) == 3


def test_serve_protocol_on_a_graph_task():
    arrays, _ = inputs.qm9_batch(n_graphs=3, use_data=False)
    bench = throughput.build_ours(arrays, tiny_spec("qm9", hidden="2x0e+1x1o", layers=0, lmax=1))
    requests = io.StringIO("compile forward\ntime forward 3 0\ntime train_step 3 0\nbogus\nquit\n")
    replies = io.StringIO()
    common.serve(bench, requests, replies)
    lines = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert lines[0]["ready"] and lines[0]["params"] == bench.n_params
    assert lines[0]["versions"]["jax"] == jax.__version__
    assert lines[1]["compile_s"] > 0
    assert len(lines[2]["seconds"]) == 3
    assert "KeyError" in lines[3]["error"], "timing before compiling is reported, not fatal"
    assert "unknown request" in lines[4]["error"]
    assert lines[5] == {"bye": True}


@pytest.mark.slow
def test_one_layer_instance_norm_bench_lowers_its_loss():
    arrays, _ = inputs.qm9_batch(n_graphs=4, use_data=False)
    bench = throughput.build_ours(arrays, tiny_spec("qm9", hidden="4x0e+2x1o+1x2e", layers=1))
    bench.compile("train_step")
    losses = []
    for _ in range(5):
        bench.params, bench.state, bench.opt_state, loss = bench.call("train_step")
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_profile_ops_groups_operation_kinds():
    from benchmarks import profile_ops

    assert profile_ops.kind_of("concatenate.155") == "concatenate"
    assert profile_ops.group_of("ynn_fusion") == profile_ops.group_of("dot") == "matmul"
    for kind in ("concatenate", "copy_bitcast_fusion", "bitcast_pad_fusion", "wrapped_scatter"):
        assert profile_ops.group_of(kind) == "data_movement", kind
    for kind in ("multiply_add_fusion", "add_divide_fusion", "add_bitcast_fusion"):
        assert profile_ops.group_of(kind) == "elementwise", kind


def test_profile_ops_sums_operations_per_step_and_skips_runtime_and_loop_events(tmp_path):
    import gzip

    from benchmarks import profile_ops

    events = [
        {"ph": "X", "name": "dot.1", "dur": 3000}, {"ph": "X", "name": "dot.2", "dur": 1000},
        {"ph": "X", "name": "concatenate.7", "dur": 2000},
        {"ph": "X", "name": "end: dot.1", "dur": 5},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
        {"ph": "X", "name": "$api.py:1 block_until_ready", "dur": 9000},
        {"ph": "X", "name": "while.3", "dur": 4000},  # spans its body's dot.2 and concatenate.7
        {"ph": "i", "name": "dot.3"},
    ]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    kinds = profile_ops.operation_times(path, steps=2)
    assert kinds == {"dot": {"ms": 2.0, "count": 1.0}, "concatenate": {"ms": 1.0, "count": 0.5}}


def test_profile_ops_scopes_strip_control_flow_and_mark_the_backward_pass():
    from benchmarks import profile_ops

    stack = "jit(step)/transpose(jvp(segnn))/while/body/closed_call/layer/update_1/tensor_product"
    assert profile_ops.scope_of(stack + "/dot_general", 4) == (
        "backward: segnn/layer/update_1/tensor_product")
    assert profile_ops.scope_of(stack + "/dot_general", 2) == "backward: segnn/layer"
    assert profile_ops.scope_of("jit(f)/segnn/jit(_where)/to_frame/mul", 4) == "segnn/to_frame"
    assert profile_ops.scope_of("jit(f)/transpose(jvp())/add", 4) == "backward: (top level)"


def test_profile_ops_maps_instructions_and_fusions_to_their_op_names():
    from benchmarks import profile_ops

    hlo = "\n".join([
        "%fused_computation.3 (param_0: f32[4]) -> f32[4] {",
        '  %param_0 = f32[4]{0} parameter(0)',
        '  ROOT %mul.1 = f32[4]{0} multiply(%param_0, %param_0), metadata={op_name="jit(f)/a/mul"}',
        "}",
        "",
        "ENTRY %main.9 (p: f32[4]) -> f32[4] {",
        '  %p = f32[4]{0} parameter(0)',
        '  %dot.2 = f32[4]{0} dot(%p, %p), metadata={op_name="jit(f)/b/dot_general" stack=1}',
        "  ROOT %multiply_fusion = f32[4]{0} fusion(%dot.2), kind=kLoop, "
        "calls=%fused_computation.3",
        "}",
    ])
    assert profile_ops.instruction_op_names(hlo) == {
        "mul.1": "jit(f)/a/mul", "dot.2": "jit(f)/b/dot_general",
        "multiply_fusion": "jit(f)/a/mul"}


def test_revisions_checks_out_a_commit_beside_the_working_tree(tmp_path):
    from benchmarks import revisions

    try:
        head = revisions.git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    folder, label = revisions.checkout("working", tmp_path)
    assert folder == revisions.REPO and label.startswith("working tree (")
    folder, label = revisions.checkout("HEAD", tmp_path)
    try:
        assert label == f"HEAD ({head[:10]})"
        assert (folder / "segnn_jax" / "__init__.py").is_file()
        assert (folder / "benchmarks" / "throughput.py").is_file()
    finally:
        revisions.git("worktree", "remove", "--force", str(folder))
    with pytest.raises(subprocess.CalledProcessError):
        revisions.checkout("no-such-revision", tmp_path)


def test_revisions_worker_refuses_a_segnn_jax_from_another_checkout(tmp_path):
    """A revision's worker must time that revision's code, not the installed package."""
    from benchmarks import revisions

    policy = revisions.REPO / "segnn_jax" / "host_memory.py"
    result = subprocess.run([sys.executable, "-c", revisions._WORKER, str(policy), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not from" in result.stderr
