"""Interrupted work: training killed with SIGKILL (also inside a checkpoint write) resumes to the
same parameters, bit for bit; cache builds killed midway rebuild; a full disk or an unwritable run
directory stops a run before anything is trained.

Bitwise: the resumed run replays exactly the computation of the uninterrupted one (same batches,
PRNG keys, step counts, float32 state restored bit for bit from the checkpoint, same XLA program on
the same CPU), so equality is exact, not to a tolerance. The randomised campaign (kills at random
times) is marked slow; the default suite runs fixed kill points (tests/kill_driver.py).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fuzz_support import record

DRIVER = Path(__file__).with_name("kill_driver.py")
ROOT = Path(__file__).resolve().parents[1]


def _driver(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(DRIVER), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


def _reference(tmp_path_factory):
    """The uninterrupted run's final parameters and optimiser state (in a subprocess as well,
    so that both sides run the same program)."""
    folder = tmp_path_factory.mktemp("reference")
    start = time.perf_counter()
    done = _driver("train", folder / "run", folder / "out.npz", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    (folder / "seconds").write_text(str(time.perf_counter() - start))
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory)


def _same_result(a: Path, b: Path):
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)  # bitwise


def _history(run_dir: Path):
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(e["event"], e["step"], e.get("loss")) for e in events
            if e["event"] in ("train", "eval")]


def test_killed_in_a_checkpoint_write_and_mid_epoch_resumes_bit_for_bit(reference, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out.npz"
    # 1: dies with half of step 6's manifest written (payload complete, not committed).
    first = _driver("train", run, out, "manifest-tmp:6")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert "step_000000006" in steps  # the uncommitted directory is there ...
    # 2: resumes from step 4 (the step-6 directory has no manifest), dies after step 10.
    second = _driver("train", run, out, "step:10")
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    # 3: resumes from step 9 and finishes.
    third = _driver("train", run, out, "none")
    assert third.returncode == 0, third.stderr[-3000:]
    _same_result(reference / "out.npz", out)
    assert _history(run) == _history(reference / "run")  # nothing doubled, nothing lost
    leftovers = [p.name for p in (run / "checkpoints").iterdir()
                 if "tmp" in p.name or (p.is_dir() and not (p / "segnn_manifest.json").exists())]
    assert leftovers == []
    record("training: SIGKILL in manifest write + mid-epoch", "resumed bit-identical")


def _cache_is_whole(data_dir: Path, pattern: str):
    (final,) = data_dir.glob(pattern)
    return final


def test_qm9_cache_build_killed_midway_rebuilds(tmp_path, shared_data):
    from segnn_jax.datasets import qm9

    source = shared_data / "qm9" / "original_format"
    data_dir = tmp_path / "data"
    killed = _driver("qm9-cache", source, data_dir, "cache-write")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not list(data_dir.glob("qm9_*.npz"))  # only the half temporary file exists
    assert list(data_dir.glob("qm9_*.npz.*.tmp"))
    molecules = qm9.load_qm9(source, data_dir=data_dir)
    expected = qm9.read_original(source)
    np.testing.assert_array_equal(molecules.positions, expected.positions)
    cache = _cache_is_whole(data_dir, "qm9_*.npz")
    assert qm9.load_cache(cache) is not None
    record("qm9 cache: SIGKILL in the cache write", "rebuilt")


def test_nbody_cache_build_killed_midway_rebuilds(tmp_path, monkeypatch):
    from test_fuzz_cache_checkpoint import TINY, _fake_split

    from segnn_jax.datasets import nbody

    monkeypatch.setattr(nbody, "generate_split", _fake_split)  # the same stand-in as the driver
    data_dir = tmp_path / "data"
    load = lambda n: nbody.load_nbody(TINY, "train", n, data_dir, input_frame=0, target_frame=1,
                                      progress=False)
    load(3)
    # Extending the cache from 3 to 5 systems dies half way through the write.
    killed = _driver("nbody-cache", data_dir, 5, "cache-write")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    cache = _cache_is_whole(data_dir, "nbody_*.npz")
    assert nbody._read_cache(cache, TINY, "train")["positions"].shape[0] == 3  # old one intact
    load(5)
    arrays = nbody._read_cache(cache, TINY, "train")
    np.testing.assert_array_equal(arrays["positions"], _fake_split(TINY, "train", 0, 5)["positions"])
    record("nbody cache: SIGKILL in the cache write", "old cache intact, then extended")


# ------------------------------------------------------------------------------------------------
# Full disk and unwritable run directories: reported before training starts


def _fit_that_must_not_train(run_dir):
    from model_fixtures import tiny_graphs

    from segnn_jax.graph import batch_graphs, pad_graph
    from segnn_jax.training import fit

    batches = [pad_graph(batch_graphs(tiny_graphs(2, seed=0)), 16, 48, 3)]

    def init_fn(rng, batch):
        return {"w": np.zeros((1000, 100), np.float32)}, {}

    def loss_fn(*args):
        pytest.fail("training started although the run cannot be saved")

    config = {"num_epochs": 1, "progress_bar": False, "tensorboard": False,
              "optimizer": {"optimizer": "adam", "learning_rate": 1e-3}}
    return fit(init_fn, loss_fn, batches, config=config, run_dir=run_dir)


def test_full_disk_for_checkpoints_is_reported_before_training(tmp_path, monkeypatch):
    from segnn_jax.training import CheckpointError, checkpoint

    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: type("Usage", (), {"free": 1_000_000})())
    with pytest.raises(CheckpointError, match=r"1\.0 MB free, but the checkpoints of this "
                                              r"[\d.]+ MB state need about [\d.]+ MB"):
        _fit_that_must_not_train(tmp_path / "run")
    record("fit: full disk (checkpoint space)", "CheckpointError before training")


def test_no_space_left_on_device_is_reported_before_training(tmp_path, monkeypatch):
    from segnn_jax.training.loop import RunDirectoryError

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(RunDirectoryError, match=r"run.*No space left on device.*nothing was trained"):
        _fit_that_must_not_train(tmp_path / "run")
    record("fit: ENOSPC on write", "RunDirectoryError before training")


def test_enospc_only_in_the_checkpoint_directory_is_reported_before_training(tmp_path, monkeypatch):
    from segnn_jax.training import CheckpointError, checkpoint

    real = checkpoint.atomic_write_text

    def write(path, text):
        if "checkpoints" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write_text", write)
    with pytest.raises(CheckpointError, match=r"checkpoints: cannot write checkpoints here "
                                              r"\(No space left on device"):
        _fit_that_must_not_train(tmp_path / "run")
    record("fit: ENOSPC in checkpoints/", "CheckpointError before training")


@pytest.mark.parametrize("obstacle", ["file_in_the_way", "read_only"])
def test_unwritable_run_directory_is_reported_before_training(tmp_path, monkeypatch, obstacle):
    from segnn_jax.training.loop import RunDirectoryError

    if obstacle == "file_in_the_way":
        (tmp_path / "runs").write_text("not a directory")
        run_dir = tmp_path / "runs" / "run"
    else:
        # chmod cannot stop root (these tests may run as root): refuse the writes instead.
        run_dir = tmp_path / "run"

        def read_only(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(run_dir))

        monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(RunDirectoryError, match=f"{run_dir}.*nothing was trained"):
        _fit_that_must_not_train(run_dir)
    record(f"fit: unwritable run directory ({obstacle})", "RunDirectoryError before training")


# ------------------------------------------------------------------------------------------------
# Randomised campaign


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_killed_at_random_times_resumes_bit_for_bit(reference, tmp_path, seed):
    """Kills the run at random moments (compilation, steps, evaluation, checkpoint writes) until
    one attempt finishes; the result equals the uninterrupted run's."""
    rng = np.random.default_rng(seed)
    duration = float((reference / "seconds").read_text())  # of a whole uninterrupted run
    run, out = tmp_path / "run", tmp_path / "out.npz"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    kills = 0
    for attempt in range(5):  # up to 4 kills, then the run may finish
        process = subprocess.Popen([sys.executable, str(DRIVER), "train", str(run), str(out),
                                    "none"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env=env)
        try:
            process.wait(timeout=None if attempt == 4
                         else float(rng.uniform(0.15, 0.9)) * duration)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            continue
        assert process.returncode == 0, process.stderr.read()[-3000:]
        break
    assert kills >= 1
    _same_result(reference / "out.npz", out)
    assert _history(run) == _history(reference / "run")
    record("training: SIGKILL at random times", f"{kills} kills, resumed bit-identical")
