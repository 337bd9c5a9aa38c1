"""Shared fixtures: a fresh PRNG key per draw, NaN checking, and the shared data folder."""

from pathlib import Path

from segnn_jax.host_memory import retain_freed_memory

retain_freed_memory()  # as the segnn command does: training steps reuse their scratch memory

import jax  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


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
