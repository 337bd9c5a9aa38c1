"""Checkpoints of segnn_jax.training.checkpoint: round trip, retention, corruption and fallback."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from segnn_jax.training import CheckpointError, CheckpointManager, CorruptCheckpointError


def _tree(value):
    return {"params": {"w": np.full((3, 2), value, np.float32),
                       "b": np.full((2,), value, ml_dtypes.bfloat16)},
            "step": np.int32(value), "rng": np.asarray(jax.random.PRNGKey(int(value)))}


def _payload_files(path):
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != "segnn_manifest.json")


def test_round_trip_keeps_values_dtypes_and_loop_state(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(_tree(1.0), step=10, loop_state={"epoch": 3, "best": {"metric": 0.5}})
    state, loop_state, step = manager.restore_latest(_tree(0.0))
    assert step == 10 and loop_state == {"epoch": 3, "best": {"metric": 0.5}}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_tree(1.0))):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_retention_keeps_latest_two_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for s in range(1, 6):
        manager.save(_tree(float(s)), step=s, best_metric=0.1 if s == 2 else None)
    assert manager.steps() == [2, 4, 5]
    assert manager.best() == {"step": 2, "metric": 0.1}
    state, _, step = manager.restore_best(_tree(0.0))
    assert step == 2 and float(state["params"]["w"][0, 0]) == 2.0


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, caplog):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(_tree(1.0), step=1)
    path = manager.save(_tree(2.0), step=2)
    victim = max(_payload_files(path), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        victim.unlink()
    else:
        (path / "segnn_manifest.json").write_text('{"format": ')
    with pytest.raises(CorruptCheckpointError, match="step_000000002"):
        manager.restore(_tree(0.0), 2)
    # An unreadable manifest makes the directory an interrupted save: it is not even listed.
    state, _, step = manager.restore_latest(_tree(0.0))
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0


@pytest.mark.parametrize("edit", [("float32", "gloat32"), ("[\n    3,", "[\n    4,"),
                                  ('"epoch": 2', '"epoch": 7')])
def test_altered_manifest_is_corrupt_and_falls_back(tmp_path, edit):
    """Regression (large fuzz campaign): one damaged byte of a dtype in the manifest read as a
    checkpoint of another model, so restore_latest stopped instead of using the previous one."""
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(_tree(1.0), step=1, loop_state={"epoch": 1})
    path = manager.save(_tree(2.0), step=2, loop_state={"epoch": 2})
    manifest = path / "segnn_manifest.json"
    text = manifest.read_text()
    assert edit[0] in text
    manifest.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(CorruptCheckpointError, match="manifest is altered"):
        manager.restore(_tree(0.0), 2)
    state, loop_state, step = manager.restore_latest(_tree(0.0))
    assert step == 1 and loop_state == {"epoch": 1}
    assert float(state["params"]["w"][0, 0]) == 1.0


def test_format_1_manifest_without_its_own_digest_still_restores(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    path = manager.save(_tree(2.0), step=2, loop_state={"epoch": 2})
    manifest = path / "segnn_manifest.json"
    saved = json.loads(manifest.read_text())
    del saved["manifest_sha256"]
    saved["format"] = "segnn_jax.checkpoint/1"
    manifest.write_text(json.dumps(saved))
    state, loop_state = manager.restore(_tree(0.0), 2)
    assert loop_state == {"epoch": 2} and float(state["params"]["w"][0, 0]) == 2.0


def test_all_corrupt_is_a_clear_error(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for s in (1, 2):
        path = manager.save(_tree(float(s)), step=s)
        for f in _payload_files(path):
            f.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="no usable checkpoint"):
        manager.restore_latest(_tree(0.0))


def test_other_model_is_rejected_with_the_leaf(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(_tree(1.0), step=1)
    other = _tree(0.0)
    other["params"]["w"] = np.zeros((4, 2), np.float32)
    with pytest.raises(CheckpointError, match=r"\['w'\].*\(3, 2\)"):
        manager.restore_latest(other)


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(_tree(1.0), step=1)
    (tmp_path / "step_000000002").mkdir()  # killed before the manifest was written
    assert manager.steps() == [1]
    assert manager.restore_latest(_tree(0.0))[2] == 1
    manager.save(_tree(3.0), step=3)
    assert not (tmp_path / "step_000000002").exists()


def test_typed_keys_and_keep_below_two_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=1)
    with pytest.raises(TypeError, match="typed PRNG keys"):
        CheckpointManager(tmp_path).save({"k": jax.random.key(0)}, step=0)
    assert CheckpointManager(tmp_path).steps() == []
