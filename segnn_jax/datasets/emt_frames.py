"""S2EF-style frames (structure, total energy, forces) from EMT relaxations, generated here.

EMT (ASE's effective medium theory), NOT DFT: every frame carries ``level_of_theory="EMT"``.

Relaxation ``r`` is sample ``r`` of the OC20-style EMT set (:func:`segnn_jax.datasets.emt.
generate_emt_sample`: an adsorbate on an fcc(111) slab, relaxed with BFGS), built with this
module's :class:`FramesConfig` (by default a smaller 2x2x3 slab, to keep training cheap). From each
relaxation we keep

* ``relaxation_frames`` frames of the BFGS trajectory, evenly spaced, first and last included
  (positions as the generator stores them: float32), and
* ``rattled_frames`` copies of the relaxed structure with every atom displaced by a Gaussian of
  standard deviation drawn uniformly in ``rattle_std`` (A), recomputed with EMT: these sample the
  forces around the minimum that molecular dynamics visits and relaxations do not.

Energies are total EMT energies (eV) and forces the unconstrained EMT forces (eV/A), also on the
fixed sub-surface atoms. Frame sets depend only on ``(seed, config)``: relaxation ``r`` uses
``generate_emt_sample(seed, index)`` with the ``r``-th index whose metal and adsorbate pass the
``metals`` / ``adsorbates`` filters, and its rattles a generator seeded by ``(seed, index)``.

Output (a directory, readable by :func:`segnn_jax.datasets.oc20.read_oc20`)::

    emt_frames.json     generation parameters and counts
    frames.extxyz       all frames; info: sid (the relaxation), frame_kind ("relaxation" or
                        "rattled"), frame (BFGS step or rattle number), metal, adsorbate, site,
                        level_of_theory; arrays: tags; energy and forces as calculator results

Command line::

    python -m segnn_jax.datasets.emt_frames OUT_DIR --n-relaxations 400 [--seed 0]
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segnn_jax.datasets.emt import ADSORBATES, METALS, EMTConfig, generate_emt_sample, sample_spec

__all__ = [
    "FRAMES_FILE",
    "EMTFramesError",
    "FramesConfig",
    "generate_emt_frames",
    "relaxation_frames",
    "selected_indices",
]

FRAMES_FILE = "frames.extxyz"
_MANIFEST = "emt_frames.json"
_FORMAT_VERSION = 1


class EMTFramesError(ValueError):
    """Invalid generation parameters."""


@dataclasses.dataclass(frozen=True)
class FramesConfig:
    """What to generate.

    Attributes:
        size: (nx, ny) surface repetitions of the fcc(111) slab.
        layers: metal layers (the bottom ``layers - 1`` are fixed in the relaxation).
        relaxation_frames: BFGS frames kept per relaxation (>= 2: first and last at least).
        rattled_frames: rattled copies of the relaxed structure per relaxation (>= 0).
        rattle_std: (low, high) range of the per-frame Gaussian displacement scale (A).
        metals: metals to draw from (subset of :data:`segnn_jax.datasets.emt.METALS`).
        adsorbates: adsorbates to draw from (subset of :data:`segnn_jax.datasets.emt.ADSORBATES`).
    """

    size: tuple = (2, 2)
    layers: int = 3
    relaxation_frames: int = 4
    rattled_frames: int = 4
    rattle_std: tuple = (0.01, 0.08)
    metals: tuple = METALS
    adsorbates: tuple = tuple(ADSORBATES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "rattle_std", tuple(float(s) for s in self.rattle_std))
        object.__setattr__(self, "metals", tuple(self.metals))
        object.__setattr__(self, "adsorbates", tuple(self.adsorbates))
        if self.relaxation_frames < 2 or self.rattled_frames < 0:
            raise EMTFramesError(f"need relaxation_frames >= 2 and rattled_frames >= 0, got "
                                 f"{self.relaxation_frames}, {self.rattled_frames}")
        low, high = self.rattle_std
        if not 0 <= low <= high:
            raise EMTFramesError(f"rattle_std must be (low, high) with 0 <= low <= high, got "
                                 f"{self.rattle_std}")
        for name, chosen, known in (("metals", self.metals, METALS),
                                    ("adsorbates", self.adsorbates, tuple(ADSORBATES))):
            unknown = sorted(set(chosen) - set(known))
            if not chosen or unknown:
                raise EMTFramesError(f"{name} must be a non-empty subset of {known}, got "
                                     f"{chosen} (unknown: {unknown})")

    def emt_config(self) -> EMTConfig:
        """The relaxation set-up handed to the EMT generator."""
        return EMTConfig(size=self.size, layers=self.layers, stored_frames=self.relaxation_frames)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def selected_indices(seed: int, n_relaxations: int, config: FramesConfig) -> Iterator[int]:
    """The first ``n_relaxations`` sample indices whose metal and adsorbate pass the filters."""
    emt_config = config.emt_config()
    found, index = 0, 0
    while found < n_relaxations:
        spec = sample_spec(seed, index, emt_config)
        if spec.metal in config.metals and spec.adsorbate in config.adsorbates:
            yield index
            found += 1
        index += 1
        if index > 1000 * (found + 1):
            raise EMTFramesError(f"the filters {config.metals} / {config.adsorbates} select "
                                 f"(almost) no samples")


def _with_results(atoms: Any, energy: float, forces: np.ndarray, info: dict) -> Any:
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = atoms.copy()
    atoms.set_constraint()  # frames are plain labelled structures; extxyz keeps no constraints
    atoms.info = dict(info)  # ase.build's adsorbate_info is a dict that extxyz cannot store
    atoms.calc = SinglePointCalculator(atoms, energy=float(energy),
                                       forces=np.asarray(forces, np.float64))
    return atoms


def relaxation_frames(seed: int, index: int, config: FramesConfig = FramesConfig()) -> list[Any]:
    """The labelled frames (``ase.Atoms`` with energy and forces) of relaxation ``index``."""
    from ase.calculators.emt import EMT

    sample = generate_emt_sample(seed, index, config.emt_config())
    kv, data = sample["key_value_pairs"], sample["data"]
    common = {"sid": int(index), "metal": kv["metal"], "adsorbate": kv["adsorbate"],
              "site": kv["site"], "level_of_theory": "EMT"}
    frames = []
    template = sample["atoms"]
    for k, step in enumerate(data["traj_frame_index"]):
        atoms = template.copy()
        atoms.positions = np.asarray(data["traj_positions"][k], np.float64)
        # Recompute with EMT at the stored (float32-rounded) positions, so that the labels belong
        # exactly to the stored structure.
        atoms.set_constraint()
        atoms.calc = EMT()
        frames.append(_with_results(atoms, atoms.get_potential_energy(), atoms.get_forces(),
                                    dict(common, frame_kind="relaxation", frame=int(step))))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 1]))
    relaxed = template.copy()
    relaxed.set_constraint()
    relaxed.positions = np.asarray(data["pos_relaxed"], np.float64)
    low, high = config.rattle_std
    for k in range(config.rattled_frames):
        atoms = relaxed.copy()
        atoms.positions += rng.normal(scale=rng.uniform(low, high), size=atoms.positions.shape)
        atoms.calc = EMT()
        frames.append(_with_results(atoms, atoms.get_potential_energy(), atoms.get_forces(),
                                    dict(common, frame_kind="rattled", frame=k)))
    return frames


def generate_emt_frames(out_path: str | os.PathLike, n_relaxations: int, seed: int = 0,
                        config: FramesConfig = FramesConfig(),
                        progress: bool = True) -> dict:
    """Generates the frames of ``n_relaxations`` EMT relaxations into directory ``out_path``.

    The frames file is written under a temporary name and renamed when complete.

    Returns:
        Summary: ``out_path``, ``n_relaxations``, ``n_frames``, ``seconds``.

    Raises:
        EMTFramesError: invalid parameters, or ``out_path`` already holds a frames file.
    """
    import ase.io

    if n_relaxations < 1:
        raise EMTFramesError(f"n_relaxations must be >= 1, got {n_relaxations}")
    out_dir = Path(out_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / FRAMES_FILE
    if final.exists():
        raise EMTFramesError(f"{final} exists; use a new directory")
    start = time.perf_counter()
    indices = list(selected_indices(seed, n_relaxations, config))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc="EMT relaxations", unit="relaxation")
    tmp = final.with_name(final.name + ".tmp")
    n_frames = 0
    from threadpoolctl import threadpool_limits

    # ~100x100 BFGS matrices: a multi-threaded BLAS only synchronises (see datasets.emt).
    with threadpool_limits(limits=1), open(tmp, "w") as f:
        for index in indices:
            frames = relaxation_frames(seed, index, config)
            ase.io.write(f, frames, format="extxyz")
            n_frames += len(frames)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    os.replace(tmp, final)
    seconds = time.perf_counter() - start
    manifest = {"format_version": _FORMAT_VERSION,
                "calculator": "EMT (ASE effective medium theory; NOT DFT)",
                "seed": int(seed), "n_relaxations": int(n_relaxations), "n_frames": n_frames,
                "config": config.to_json(), "seconds": round(seconds, 1)}
    (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"out_path": str(out_dir), "n_relaxations": n_relaxations, "n_frames": n_frames,
            "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m segnn_jax.datasets.emt_frames OUT_DIR --n-relaxations N [--seed S]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m segnn_jax.datasets.emt_frames",
        description="Generate S2EF-style frames (energy + forces) of EMT relaxations (EMT, not DFT).")
    parser.add_argument("out_path", help="output directory (must not hold a frames file yet)")
    parser.add_argument("--n-relaxations", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=FramesConfig.size)
    parser.add_argument("--layers", type=int, default=FramesConfig.layers)
    parser.add_argument("--relaxation-frames", type=int, default=FramesConfig.relaxation_frames)
    parser.add_argument("--rattled-frames", type=int, default=FramesConfig.rattled_frames)
    parser.add_argument("--metals", nargs="+", default=list(METALS))
    parser.add_argument("--adsorbates", nargs="+", default=list(ADSORBATES))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = FramesConfig(size=tuple(args.size), layers=args.layers,
                          relaxation_frames=args.relaxation_frames,
                          rattled_frames=args.rattled_frames, metals=tuple(args.metals),
                          adsorbates=tuple(args.adsorbates))
    summary = generate_emt_frames(args.out_path, args.n_relaxations, args.seed, config,
                                  progress=not args.no_progress)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
