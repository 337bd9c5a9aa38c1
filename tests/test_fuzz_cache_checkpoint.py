"""Fuzzing the files the project writes and reads back: N-body caches and training checkpoints.

A damaged cache must be regenerated (never read back wrong); a damaged checkpoint must raise
CorruptCheckpointError / CheckpointError naming it (restore_latest then falls back to the previous
good one), or restore exactly what was saved.
"""

import functools
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from fuzz_support import budget, check_reader, mutated_bytes, no_hang, record
from hypothesis import given
from hypothesis import strategies as st

from segnn_jax.datasets import nbody
from segnn_jax.training import CheckpointError, CheckpointManager, CorruptCheckpointError

TINY = nbody.NBodyConfig(name="charged", n_bodies=3, seed=1, split_sizes=(6, 2, 2), n_steps=300,
                         record_every=100)


def _fake_split(config, split, start=0, stop=None, *, progress=False):
    """Deterministic stand-in for the simulator: the cache layer does not care about physics."""
    shapes = nbody.planned_shapes(config, split, stop - start)
    out = {}
    for key, shape in shapes.items():
        if key == "frames":
            out[key] = np.asarray(config.frames, np.int32)
        else:
            grid = np.arange(start, stop, dtype=np.float32).reshape((-1,) + (1,) * (len(shape) - 1))
            out[key] = (grid + np.linspace(0, 1, int(np.prod(shape[1:])), dtype=np.float32)
                        .reshape(shape[1:])).astype(np.float32)
    return out


@budget(1.0)
@given(data=st.data(), n_first=st.integers(1, 6), n_second=st.integers(1, 6))
def test_nbody_cache_damaged_is_regenerated_never_wrong(tmp_path_factory, monkeypatch_module, data,
                                                        n_first, n_second):
    folder = tmp_path_factory.mktemp("nbody")
    load = functools.partial(nbody.load_nbody, TINY, "train", data_dir=folder, input_frame=0,
                             target_frame=1, progress=False)
    load(n_systems=n_first)
    (cache,) = folder.glob("nbody_*.npz")
    cache.write_bytes(data.draw(mutated_bytes(cache.read_bytes(), max_ops=3)))
    with no_hang():
        got = load(n_systems=n_second)
    want = _fake_split(TINY, "train", 0, n_second)
    np.testing.assert_array_equal(got.positions, want["positions"][:, 0])
    np.testing.assert_array_equal(got.targets, want["positions"][:, 1])
    np.testing.assert_array_equal(got.charges, want["charges"])
    # What is on disk now is a valid cache again.
    assert nbody._read_cache(cache, TINY, "train")["positions"].shape[0] >= n_second
    record("nbody.load_nbody (damaged cache)", "regenerated or identical")


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    patch.setattr(nbody, "generate_split", _fake_split)
    yield patch
    patch.undo()


def _tree(value):
    return {"params": {"w": np.full((3, 2), value, np.float32), "b": np.arange(4) * value},
            "step": np.int32(value), "rng": np.asarray(jax.random.PRNGKey(int(value)))}


@functools.cache
def _saved_checkpoints() -> Path:
    """Two checkpoints (steps 1 and 2, step 1 the best) written once per session."""
    folder = Path(tempfile.mkdtemp(prefix="segnn_fuzz_ckpt_"))
    manager = CheckpointManager(folder / "checkpoints", keep=2)
    manager.save(_tree(1.0), step=1, loop_state={"epoch": 1}, best_metric=0.5)
    manager.save(_tree(2.0), step=2, loop_state={"epoch": 2})
    return folder / "checkpoints"


def _same_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@budget(1.0)
@given(data=st.data())
def test_checkpoint_damaged_file_is_detected_or_harmless(tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    shutil.copytree(_saved_checkpoints(), directory)
    step_dir = directory / "step_000000002"
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    victim = data.draw(st.sampled_from(files + [directory / "best.json"]))
    victim.write_bytes(data.draw(mutated_bytes(victim.read_bytes(), max_ops=3)))
    manager = CheckpointManager(directory, keep=2)
    if victim.name == "best.json":
        def valid_pointer(best):
            assert isinstance(best, dict) and isinstance(best.get("step"), int)
            assert isinstance(best.get("metric"), float)

        check_reader("checkpoint.best (best.json)", manager.best, (CheckpointError,),
                     [str(victim)], valid_pointer)
        return

    def validate(restored):
        state, loop_state = restored
        _same_tree(state, _tree(2.0))
        assert loop_state == {"epoch": 2}

    check_reader("checkpoint.restore", lambda: manager.restore(_tree(0.0), 2),
                 (CorruptCheckpointError, CheckpointError), [str(step_dir)], validate)
    # Whatever happened to step 2, restore_latest gives a checkpoint exactly as it was saved.
    with no_hang():
        state, loop_state, step = manager.restore_latest(_tree(0.0))
    _same_tree(state, _tree(float(step)))
    assert loop_state == {"epoch": step}


@budget(0.5)
@given(shapes=st.sampled_from(["extra_leaf", "other_shape", "other_dtype"]))
def test_checkpoint_of_another_model_is_refused_by_name(tmp_path_factory, shapes):
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    shutil.copytree(_saved_checkpoints(), directory)
    template = _tree(0.0)
    if shapes == "extra_leaf":
        template["params"]["v"] = np.zeros(2, np.float32)
    elif shapes == "other_shape":
        template["params"]["w"] = np.zeros((2, 3), np.float32)
    else:
        template["params"]["w"] = np.zeros((3, 2), np.float64)
    manager = CheckpointManager(directory, keep=2)
    with pytest.raises(CheckpointError, match="does not match the model"):
        manager.restore(template, 2)
    record("checkpoint.restore (other model)", "CheckpointError")


@pytest.mark.parametrize("manifest", ['[]', '{"files": [], "leaves": []}',
                                      '{"gormat": "segnn_jax.checkpoint/1", "files": {}, '
                                      '"leaves": []}',
                                      '{"files": {"a": 1}, "leaves": []}',
                                      '{"files": {}, "leaves": [1, 2]}',
                                      '{"files": {}, "leaves": [], "loop_state": 3}'])
def test_checkpoint_manifest_of_the_wrong_layout_is_corrupt(tmp_path, manifest):
    """Regression: a manifest that parsed as JSON of another layout leaked AttributeError."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(_saved_checkpoints(), directory)
    (directory / "step_000000002" / "segnn_manifest.json").write_text(manifest)
    manager = CheckpointManager(directory, keep=2)
    with pytest.raises(CorruptCheckpointError, match=r"step_000000002.*manifest"):
        manager.restore(_tree(0.0), 2)
    state, _, step = manager.restore_latest(_tree(0.0))
    assert step == 1
    _same_tree(state, _tree(1.0))


@pytest.mark.parametrize("pointer", ['1', '[1]', '{"step": "2", "metric": 0.5}', '{"step": 2}'])
def test_best_pointer_of_the_wrong_layout_is_corrupt(tmp_path, pointer):
    directory = tmp_path / "checkpoints"
    shutil.copytree(_saved_checkpoints(), directory)
    (directory / "best.json").write_text(pointer)
    with pytest.raises(CorruptCheckpointError, match="best.json: malformed"):
        CheckpointManager(directory, keep=2).best()
