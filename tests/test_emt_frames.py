"""Tests of the S2EF-style EMT frame generator (segnn_jax.datasets.emt_frames)."""

import json

import numpy as np
import pytest

pytest.importorskip("threadpoolctl", reason="threadpoolctl (segnn[oc20] extra) is not installed")

from segnn_jax.datasets.emt_frames import (
    FRAMES_FILE,
    EMTFramesError,
    FramesConfig,
    generate_emt_frames,
    main,
    selected_indices,
)
from segnn_jax.datasets.oc20 import read_oc20

CONFIG = FramesConfig(relaxation_frames=2, rattled_frames=2, metals=("Cu", "Pt"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("frames") / "a"
    summary = generate_emt_frames(out, 3, seed=5, config=CONFIG, progress=False)
    return out, summary


def test_frames_are_labelled_and_readable(generated):
    from ase.calculators.emt import EMT

    out, summary = generated
    records = read_oc20(out)
    assert summary["n_frames"] == len(records) == 3 * 4
    manifest = json.loads((out / "emt_frames.json").read_text())
    assert manifest["n_frames"] == len(records) and manifest["seed"] == 5
    kinds = [r.extras["frame_kind"] for r in records]
    assert kinds.count("relaxation") == 6 and kinds.count("rattled") == 6
    for record in records:
        assert record.extras["metal"] in ("Cu", "Pt") and record.extras["level_of_theory"] == "EMT"
        assert record.forces.shape == (record.natoms, 3) and np.isfinite(record.energy)
    # The labels are EMT's at the stored positions.
    from ase import Atoms

    record = records[-1]
    atoms = Atoms(numbers=record.atomic_numbers, positions=record.positions, cell=record.cell,
                  pbc=record.pbc)
    atoms.calc = EMT()
    assert atoms.get_potential_energy() == pytest.approx(record.energy, abs=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), record.forces, atol=1e-5)
    # Rattled frames sample forces around the minimum, the last relaxation frame sits at it.
    relaxed = [r for r in records if r.extras["frame_kind"] == "relaxation"][1]
    rattled = next(r for r in records if r.extras["frame_kind"] == "rattled")
    assert np.abs(rattled.forces).max() > np.abs(relaxed.forces[relaxed.tags > 0]).max()


def test_reproducible_from_the_seed(generated, tmp_path):
    out, _ = generated
    main([str(tmp_path / "b"), "--n-relaxations", "3", "--seed", "5", "--relaxation-frames", "2",
          "--rattled-frames", "2", "--metals", "Cu", "Pt", "--no-progress"])
    assert (tmp_path / "b" / FRAMES_FILE).read_text() == (out / FRAMES_FILE).read_text()


def test_filters_and_errors(tmp_path, generated):
    out, _ = generated
    indices = list(selected_indices(5, 4, FramesConfig(adsorbates=("CO",))))
    assert len(indices) == 4 and indices == sorted(set(indices))
    with pytest.raises(EMTFramesError, match="subset"):
        FramesConfig(metals=("Fe",))
    with pytest.raises(EMTFramesError, match="relaxation_frames"):
        FramesConfig(relaxation_frames=1)
    with pytest.raises(EMTFramesError, match="exists"):
        generate_emt_frames(out, 1, config=CONFIG, progress=False)
