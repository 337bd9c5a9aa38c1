"""Fuzzing model artifacts (segnn_jax.artifact): a damaged ``.segnn`` file raises ArtifactError
naming the file, or loads exactly the parameters that were saved (tests/fuzz_support.py)."""

import functools
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from fuzz_support import budget, check_reader, mutated_bytes
from hypothesis import given
from hypothesis import strategies as st

from segnn_jax.artifact import ArtifactError, TrainedModel, load_artifact, save_artifact
from segnn_jax.configs import load_config

PARAMS = {"layer": {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                    "b": np.linspace(-1, 1, 4).astype(np.float32)}}


@functools.cache
def _artifact_bytes() -> bytes:
    """A small valid artifact (the test N-body config; the parameters need not fit the model,
    loading does not build it)."""
    model = TrainedModel("nbody", load_config("test_nbody"), PARAMS, {})
    with tempfile.TemporaryDirectory() as folder:
        path = save_artifact(model, Path(folder) / "model.segnn")
        return path.read_bytes()


@budget(1.0)
@given(data=st.data())
def test_artifact_damaged_is_refused_or_identical(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("artifact") / "model.segnn"
    path.write_bytes(data.draw(mutated_bytes(_artifact_bytes(), max_ops=4)))

    def validate(model):
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(PARAMS)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)

    check_reader("artifact.load_artifact", lambda: load_artifact(path),
                 (ArtifactError, FileNotFoundError), [str(path)], validate)


def test_artifact_missing_first_byte_is_an_artifact_error(tmp_path):
    path = tmp_path / "model.segnn"
    path.write_bytes(_artifact_bytes()[1:])
    with pytest.raises(ArtifactError, match="model.segnn"):
        load_artifact(path)
