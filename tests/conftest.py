"""Shared fixtures: a fresh PRNG key per draw, NaN checking, and the shared data folder; one XLA
compilation cache per test session, and LLVM code generation without optimisation."""

import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
_CACHE_VARIABLE = "SEGNN_TEST_COMPILATION_CACHE"
# XLA's CPU backend hands its kernels to LLVM at this level (default 2). The suite's programs are
# small and run a few times, so optimising their machine code costs more than it saves: level 0
# cut a compilation-bound test from 60 s to 41 s. XLA's own graph optimisations are unchanged.
_TEST_XLA_FLAG = "--xla_backend_optimization_level=0"


def pytest_configure(config):
    """XLA_FLAGS gets the test optimisation level unless it sets its own; the backend starts
    after this hook, and the pytest-xdist workers and the tests' subprocesses inherit it.

    Compiled programs are cached on disk for this session, in a fresh folder shared by the
    pytest-xdist workers (who inherit its path), so a program that several tests build alike
    (the training step of a test config trained by many tests, a resumed run) compiles once.
    Compilation dominates the suite's time on a CPU. Nothing outlives the session."""
    if _CACHE_VARIABLE not in os.environ:
        os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="segnn-test-xla-")
        config._segnn_owns_compilation_cache = True
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_TEST_XLA_FLAG}".strip()
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
    # Programs that compile in under a second are cheaper to recompile than to store and read.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_unconfigure(config):
    if getattr(config, "_segnn_owns_compilation_cache", False):
        shutil.rmtree(os.environ.pop(_CACHE_VARIABLE), ignore_errors=True)


@pytest.fixture
def keys():
    """An endless supply of independent PRNG keys: ``next(keys)`` for every random draw."""

    def generate(seed=0):
        key = jax.random.PRNGKey(seed)
        while True:
            key, sub = jax.random.split(key)
            yield sub

    return generate()


@pytest.fixture(autouse=True)
def debug_nans():
    """Every test runs with NaN checking on, so a NaN anywhere (values or gradients) fails it."""
    with jax.debug_nans(True):
        yield


@pytest.fixture
def shared_data():
    """The folder of shared test data; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (only present beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_nbody_runs(tmp_path_factory):
    """Two runs of the test N-body config (seeds 0 and 1, one epoch each) on the same data: for the
    scripts that read trained runs (ensembles, error profiles)."""
    from segnn_jax import cli

    root = tmp_path_factory.mktemp("tiny_nbody_runs")
    runs = []
    for seed in (0, 1):
        run_dir = root / f"seed{seed}"
        assert cli.main(["train", "test_nbody", f"--config.data.data_dir={root / 'data'}",
                         "--config.train.num_epochs=1", f"--config.train.seed={seed}",
                         "--run-dir", str(run_dir)]) == 0
        runs.append(run_dir)
    return runs
