"""OC20-style IS2RE data generated here with ASE's EMT calculator (NOT DFT).

Each sample is an adsorbate on a 3x3 fcc(111) slab of an EMT metal (Al, Cu,
Ag, Au, Ni, Pd, Pt), placed at an ontop / bridge / fcc / hcp site and relaxed
with BFGS to fmax 0.05 eV/A, following OC20's conventions (DATA.md §3):

* tags 0 = sub-surface (fixed), 1 = surface (free), 2 = adsorbate;
* periodic in all three directions, vacuum above and below the slab;
* target ``y_relaxed = E(adsorbate+slab, relaxed) - E(clean slab, relaxed) -
  sum of gas-phase references`` with mu_H = E(H2)/2, mu_O = E(H2O) - E(H2),
  mu_C = E(CO) - mu_O, mu_N = E(N2)/2, all energies computed with EMT
  (``y_init`` likewise with the initial structure).

``EMTConfig(catalysts="binary")`` makes the catalysts OC20-like bulk compositions
instead: the seven metals and the 42 binary substitutional alloys ``A2B`` and
``AB2`` of every pair of them (:func:`catalyst_compositions`). Every layer of an
alloy slab holds the catalyst's composition exactly (a third or two thirds of
its sites are B), on sites drawn per sample; the lattice constant follows
Vegard's law between the two metals' EMT lattice constants, and the clean slab
of the target is that sample's own arrangement, relaxed. Held-out catalysts
are then unseen compositions of seen elements, as OC20's OOD-cat split is,
rather than elements no training sample contains.

EMT's parameters for H, C, N and O are crude: results on this set must be
labelled EMT, never DFT. Every stored sample carries ``level_of_theory="EMT"``.

Output layout of :func:`generate_emt_dataset` (a directory)::

    emt_dataset.json           generation parameters (checked on resume)
    shard_00000.aselmdb        samples [0, shard_size)
    shard_00001.aselmdb        samples [shard_size, 2 * shard_size) ...

Each shard is written to a temporary name and renamed once complete, so a
shard file either holds all its samples or does not exist; an interrupted run
resumes by generating only the missing shards. Sample ``i`` depends only on
``(seed, i)``, so the set does not depend on the number of workers or on
interruptions. The shards are read by :func:`segnn_jax.datasets.oc20.read_oc20`
(``.aselmdb`` rows: the atoms are the INITIAL structure with its EMT energy and
forces; key-value pairs hold ``sid``, ``y_init``, ``y_relaxed`` and the labels;
``row.data`` holds ``pos_relaxed``, ``forces_relaxed`` and sub-sampled
relaxation frames).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import time
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "ADSORBATES",
    "CATALYST_SETS",
    "METALS",
    "SITES",
    "EMTConfig",
    "EMTDatasetError",
    "SampleSpec",
    "catalyst_compositions",
    "gas_references",
    "generate_emt_dataset",
    "generate_emt_sample",
    "sample_spec",
]

METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
# name -> (ASE g2 molecule name or element, index of the binding atom in that molecule)
ADSORBATES = {
    "O": ("O", 0),
    "H": ("H", 0),
    "N": ("N", 0),
    "C": ("C", 0),
    "CO": ("CO", 1),  # g2 order is O, C; bind through C
    "OH": ("OH", 0),
    "CH3": ("CH3", 0),
    "NO": ("NO", 0),
    "N2": ("N2", 0),
    "H2O": ("H2O", 0),
    "CH2": ("CH2_s1A1d", 0),
}
SITES = ("ontop", "bridge", "fcc", "hcp")
CATALYST_SETS = ("elements", "binary")
# Nominal height (A) of the binding atom above the surface layer; relaxation adjusts it.
_SITE_HEIGHT = {"ontop": 1.8, "bridge": 1.5, "fcc": 1.2, "hcp": 1.2}
_MANIFEST = "emt_dataset.json"
_FORMAT_VERSION = 1


class EMTDatasetError(ValueError):
    """Raised on invalid generation parameters or an inconsistent output directory."""


@dataclasses.dataclass(frozen=True)
class EMTConfig:
    """Physical set-up of the EMT data set.

    Attributes:
        size: (nx, ny) surface repetitions of the fcc(111) cell.
        layers: number of metal layers.
        free_layers: number of top layers that relax (tag 1); the others are
            fixed (tag 0).
        vacuum: vacuum (A) on each side of the slab.
        fmax: BFGS force convergence threshold (eV/A).
        max_steps: BFGS step limit; samples that hit it keep ``converged=False``.
        height_jitter: half-width (A) of the uniform jitter of the initial height.
        rattle: standard deviation (A) of the Gaussian displacement of the free
            surface atoms and the adsorbate atoms in the initial structure.
        stored_frames: number of relaxation frames (evenly spaced, first and
            last included) whose positions and forces are stored.
        catalysts: ``"elements"`` (the seven metals) or ``"binary"`` (the
            metals and their binary alloys, :func:`catalyst_compositions`).
    """

    size: tuple[int, int] = (3, 3)
    layers: int = 3
    free_layers: int = 1
    vacuum: float = 7.5
    fmax: float = 0.05
    max_steps: int = 300
    height_jitter: float = 0.15
    rattle: float = 0.03
    stored_frames: int = 5
    catalysts: str = "elements"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise EMTDatasetError(f"size must be two positive integers, got {self.size}")
        if not 1 <= self.free_layers < self.layers:
            raise EMTDatasetError(
                f"need 1 <= free_layers < layers, got {self.free_layers}, {self.layers}"
            )
        if self.vacuum <= 0 or self.fmax <= 0 or self.max_steps < 1 or self.stored_frames < 2:
            raise EMTDatasetError(f"invalid EMTConfig {self}")
        if self.catalysts not in CATALYST_SETS:
            raise EMTDatasetError(
                f"catalysts must be one of {CATALYST_SETS}, got {self.catalysts!r}"
            )
        if self.catalysts == "binary" and (self.size[0] * self.size[1]) % 3:
            raise EMTDatasetError(
                f"binary catalysts put a third or two thirds of a layer's sites on the second "
                f"metal: the layer's site count {self.size[0]} x {self.size[1]} must be a "
                f"multiple of 3"
            )
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "size": list(self.size)}


@functools.cache
def catalyst_compositions(
    catalysts: str = "elements",
) -> Mapping[str, tuple[tuple[str, float], ...]]:
    """Catalyst label -> ``((metal, fraction of the sites), ...)`` of a catalyst set.

    ``"elements"``: ``{"Cu": (("Cu", 1.0),), ...}`` for the seven metals.
    ``"binary"``: those, and for every pair A, B of them (in :data:`METALS` order) ``"A2B"``
    (``((A, 2/3), (B, 1/3))``) and ``"AB2"``: 49 catalysts.

    >>> catalyst_compositions("binary")["Cu2Au"]
    (('Cu', 0.6666666666666666), ('Au', 0.3333333333333333))
    """
    if catalysts not in CATALYST_SETS:
        raise EMTDatasetError(f"catalysts must be one of {CATALYST_SETS}, got {catalysts!r}")
    out = {metal: ((metal, 1.0),) for metal in METALS}
    if catalysts == "binary":
        for i, a in enumerate(METALS):
            for b in METALS[i + 1:]:
                out[f"{a}2{b}"] = ((a, 2 / 3), (b, 1 / 3))
                out[f"{a}{b}2"] = ((a, 1 / 3), (b, 2 / 3))
    return types.MappingProxyType(out)  # cached: read-only


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """Random choices defining sample ``index`` (a pure function of (seed, index)).

    ``metal`` is the catalyst's label (a metal, or an alloy such as ``"Cu2Pt"``);
    ``arrangement_seed`` places an alloy's metals on the slab's sites.
    """

    index: int
    metal: str
    adsorbate: str
    site: str
    offset: tuple[int, int]
    rotation_deg: float
    height: float
    rattle_seed: int
    arrangement_seed: int


def sample_spec(seed: int, index: int, config: EMTConfig = EMTConfig()) -> SampleSpec:
    """Parameters of sample ``index``, drawn from a generator seeded by (seed, index).

    The draws of the ``"elements"`` set come first and in their original order, so its samples
    are those of data sets generated before alloys existed.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    site = SITES[rng.integers(len(SITES))]
    catalysts = list(catalyst_compositions(config.catalysts))
    return SampleSpec(
        index=int(index),
        metal=catalysts[rng.integers(len(catalysts))],
        adsorbate=list(ADSORBATES)[rng.integers(len(ADSORBATES))],
        site=site,
        offset=(int(rng.integers(config.size[0])), int(rng.integers(config.size[1]))),
        rotation_deg=float(rng.uniform(0.0, 360.0)),
        height=float(_SITE_HEIGHT[site] + rng.uniform(-config.height_jitter, config.height_jitter)),
        rattle_seed=int(rng.integers(2**31)),
        arrangement_seed=int(rng.integers(2**31)),
    )


def _relax(
    atoms: Any, fmax: float, max_steps: int
) -> tuple[bool, list[float], list[np.ndarray], list[np.ndarray]]:
    """BFGS relaxation recording every frame's energy, positions and raw forces."""
    from ase.optimize import BFGS

    energies: list[float] = []
    positions: list[np.ndarray] = []
    forces: list[np.ndarray] = []

    def record() -> None:
        energies.append(float(atoms.get_potential_energy()))
        positions.append(atoms.get_positions())
        # Unconstrained forces, as OC20's S2EF data stores them for fixed atoms too.
        forces.append(atoms.get_forces(apply_constraint=False))

    opt = BFGS(atoms, logfile=None)
    opt.attach(record, interval=1)
    converged = bool(opt.run(fmax=fmax, steps=max_steps))
    if not positions or not np.array_equal(positions[-1], atoms.get_positions()):
        record()
    return converged, energies, positions, forces


@functools.cache
def _lattice_constant(metal: str) -> float:
    """EMT equilibrium fcc lattice constant (A) from a parabolic fit of E(a)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.data import atomic_numbers, reference_states

    a0 = reference_states[atomic_numbers[metal]]["a"]
    grid = a0 * np.linspace(0.96, 1.04, 9)
    energies = []
    for a in grid:
        atoms = bulk(metal, "fcc", a=a)
        atoms.calc = EMT()
        energies.append(atoms.get_potential_energy())
    c2, c1, _ = np.polyfit(grid, energies, 2)
    return float(-c1 / (2 * c2))


def _slab(catalyst: str, config: EMTConfig, arrangement_seed: int = 0) -> Any:
    """The catalyst's slab: an alloy's second metal on a seeded choice of sites, the same
    number in every layer; lattice constant by Vegard's law."""
    from ase.build import fcc111
    from ase.constraints import FixAtoms

    composition = catalyst_compositions(config.catalysts)[catalyst]
    lattice = sum(fraction * _lattice_constant(metal) for metal, fraction in composition)
    slab = fcc111(
        composition[0][0], size=(*config.size, config.layers), a=lattice, vacuum=config.vacuum
    )
    slab.pbc = True  # OC20 systems are periodic in z as well, with vacuum in between
    layer = slab.get_tags()  # fcc111 tags layers 1 (top) .. layers (bottom)
    if len(composition) > 1:
        (_, _), (second, fraction) = composition
        rng = np.random.default_rng(arrangement_seed)
        symbols = slab.get_chemical_symbols()
        per_layer = round(fraction * config.size[0] * config.size[1])
        for tag in range(1, config.layers + 1):
            for i in rng.choice(np.flatnonzero(layer == tag), per_layer, replace=False):
                symbols[i] = second
        slab.set_chemical_symbols(symbols)
    free = layer <= config.free_layers
    slab.set_tags(free.astype(int))
    slab.set_constraint(FixAtoms(indices=np.flatnonzero(~free)))
    return slab


def _relaxed_clean_energy(slab: Any, config: EMTConfig) -> float:
    from ase.calculators.emt import EMT

    slab.calc = EMT()
    _relax(slab, config.fmax / 5, 1000)
    return float(slab.get_potential_energy())


@functools.cache
def _clean_slab_energy(metal: str, config: EMTConfig) -> float:
    """A pure metal's relaxed clean slab, shared by all its samples (an alloy's depends on the
    arrangement of each sample and is relaxed per sample)."""
    return _relaxed_clean_energy(_slab(metal, config), config)


@functools.cache
def gas_references() -> dict[str, float]:
    """EMT gas-phase references mu_H, mu_O, mu_C, mu_N (eV) from relaxed H2, H2O, CO, N2."""
    from ase.build import molecule
    from ase.calculators.emt import EMT

    energies = {}
    for name in ("H2", "H2O", "CO", "N2"):
        mol = molecule(name)
        mol.center(vacuum=6.0)
        mol.calc = EMT()
        _relax(mol, 0.005, 1000)
        energies[name] = float(mol.get_potential_energy())
    mu_h = energies["H2"] / 2
    mu_o = energies["H2O"] - energies["H2"]
    return {"H": mu_h, "O": mu_o, "C": energies["CO"] - mu_o, "N": energies["N2"] / 2}


def _adsorbate_atoms(name: str, rotation_deg: float) -> tuple[Any, int]:
    """Adsorbate with its binding atom at the origin, the rest pointing up, rotated about z."""
    from ase import Atoms
    from ase.build import molecule

    g2_name, binding = ADSORBATES[name]
    mol = Atoms(g2_name) if len(g2_name) == 1 else molecule(g2_name)
    mol.translate(-mol.positions[binding])
    if len(mol) > 1:
        others = np.delete(mol.positions, binding, axis=0).mean(axis=0)
        if np.linalg.norm(others) > 1e-8:
            mol.rotate(others, "z")
        mol.rotate(rotation_deg, "z")
    return mol, binding


def generate_emt_sample(seed: int, index: int, config: EMTConfig = EMTConfig()) -> dict[str, Any]:
    """Build and relax sample ``index`` of the data set defined by ``seed`` and ``config``.

    Returns:
        Dict with ``atoms`` (initial structure, ase.Atoms, EMT energy and raw
        forces attached), ``key_value_pairs`` (scalars and labels) and ``data``
        (arrays: ``pos_relaxed`` [n, 3], ``forces_relaxed`` [n, 3],
        ``traj_energies`` [n_steps], ``traj_frame_index`` [k],
        ``traj_positions`` / ``traj_forces`` [k, n, 3] float32).
    """
    from ase.build import add_adsorbate
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    spec = sample_spec(seed, index, config)
    atoms = _slab(spec.metal, config, spec.arrangement_seed)  # a pure metal ignores the seed
    alloy = len(catalyst_compositions(config.catalysts)[spec.metal]) > 1
    clean = atoms.copy() if alloy else None  # the reference slab of this very arrangement
    n_slab = len(atoms)
    mol, binding = _adsorbate_atoms(spec.adsorbate, spec.rotation_deg)
    add_adsorbate(
        atoms, mol, spec.height, position=spec.site, offset=spec.offset, mol_index=binding
    )
    atoms.set_tags(np.concatenate([atoms.get_tags()[:n_slab], np.full(len(mol), 2)]))
    atoms.wrap()
    rng = np.random.default_rng(spec.rattle_seed)
    movable = atoms.get_tags() > 0
    atoms.positions[movable] += rng.normal(scale=config.rattle, size=(int(movable.sum()), 3))
    initial = atoms.copy()
    atoms.calc = EMT()
    converged, energies, positions, forces = _relax(atoms, config.fmax, config.max_steps)

    refs = gas_references()
    if clean is not None:
        e_clean = _relaxed_clean_energy(clean, config)
    else:
        e_clean = _clean_slab_energy(spec.metal, config)
    e_gas = float(sum(refs[s] for s in mol.get_chemical_symbols()))
    top = atoms.positions[:n_slab][atoms.get_tags()[:n_slab] == 1, 2].mean()
    frames = np.unique(
        np.linspace(0, len(energies) - 1, min(config.stored_frames, len(energies)))
        .round()
        .astype(int)
    )
    initial.calc = SinglePointCalculator(initial, energy=energies[0], forces=forces[0])
    return {
        "atoms": initial,
        "key_value_pairs": {
            "sid": spec.index,
            "y_init": energies[0] - e_clean - e_gas,
            "y_relaxed": energies[-1] - e_clean - e_gas,
            "metal": spec.metal,
            "adsorbate": spec.adsorbate,
            "site": spec.site,
            "level_of_theory": "EMT",
            "converged": converged,
            "n_steps": len(energies) - 1,
            "e_total_relaxed": energies[-1],
            "e_clean_slab": e_clean,
            "e_gas_reference": e_gas,
            "binding_height_relaxed": float(atoms.positions[n_slab + binding, 2] - top),
        },
        "data": {
            "pos_relaxed": positions[-1],
            "forces_relaxed": forces[-1],
            "traj_energies": np.asarray(energies),
            "traj_frame_index": frames,
            "traj_positions": np.asarray([positions[k] for k in frames], dtype=np.float32),
            "traj_forces": np.asarray([forces[k] for k in frames], dtype=np.float32),
        },
    }


def _shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard_{shard:05d}.aselmdb"


def _write_shard(out_dir: Path, shard: int, samples: list[dict[str, Any]]) -> None:
    """Write a complete shard atomically (temporary file, then rename)."""
    import ase.db

    final = _shard_path(out_dir, shard)
    tmp = final.with_name(final.name + ".tmp")
    for stale in (tmp, Path(f"{tmp}-lock")):
        stale.unlink(missing_ok=True)
    # Leaving the context commits the transaction (LMDB syncs on commit) and closes the file.
    with ase.db.connect(str(tmp), type="aselmdb", use_lock_file=False) as db:
        for sample in samples:
            db.write(
                sample["atoms"], key_value_pairs=sample["key_value_pairs"], data=sample["data"]
            )
    Path(f"{tmp}-lock").unlink(missing_ok=True)
    os.replace(tmp, final)


def _limit_blas_threads() -> Any:
    """Restrict BLAS / OpenMP to one thread in this process.

    Each relaxation works on ~100x100 matrices, where a multi-threaded BLAS
    spends its time synchronising: measured here, one thread is ~6x faster per
    CPU second, and parallelism comes from the worker processes instead.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError as err:
        raise ImportError(
            "EMT generation needs 'threadpoolctl': pip install 'segnn[experiments]'"
        ) from err
    return threadpool_limits(limits=1)


# Keeps the worker's thread limit alive for the life of the worker process.
_WORKER_LIMITS: Any = None


def _worker_init() -> None:
    global _WORKER_LIMITS
    _WORKER_LIMITS = _limit_blas_threads()


def _generate_indexed(args: tuple[int, int, EMTConfig]) -> tuple[int, dict[str, Any]]:
    seed, index, config = args
    return index, generate_emt_sample(seed, index, config)


def _check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    path = out_dir / _MANIFEST
    if path.exists():
        existing = json.loads(path.read_text())
        if isinstance(existing.get("config"), dict):
            # Options added after a set was generated take their defaults, which reproduce it.
            existing["config"] = {**EMTConfig().to_json(), **existing["config"]}
        if existing != manifest:
            raise EMTDatasetError(
                f"{out_dir} holds a data set generated with different parameters "
                f"({existing} != {manifest}); use a new directory"
            )
    else:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, path)


def generate_emt_dataset(
    out_path: str | os.PathLike,
    n_samples: int,
    seed: int = 0,
    n_workers: int = 1,
    config: EMTConfig = EMTConfig(),
    shard_size: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate (or resume generating) ``n_samples`` EMT samples into directory ``out_path``.

    Args:
        out_path: output directory (created if needed).
        n_samples: number of samples; sample ``i`` is a pure function of (seed, i).
        seed: data set seed.
        n_workers: worker processes (``spawn`` start method); 1 runs in-process.
        config: physical set-up; must match the manifest when resuming.
        shard_size: samples per shard file (the unit of atomic writes / resumption).
        progress: show a tqdm progress bar.

    Returns:
        Summary dict: ``n_samples``, ``generated`` (this call), ``skipped``
        (samples already present), ``seconds``, ``samples_per_minute`` (this
        call), ``out_path``.

    Raises:
        EMTDatasetError: invalid parameters, or ``out_path`` holds a data set
            generated with other parameters.
    """
    if n_samples < 1 or shard_size < 1 or n_workers < 1:
        raise EMTDatasetError(
            f"need n_samples, shard_size, n_workers >= 1, got {n_samples}, {shard_size}, {n_workers}"
        )
    out_dir = Path(out_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(
        out_dir,
        {
            "format_version": _FORMAT_VERSION,
            "calculator": "EMT (ASE effective medium theory; NOT DFT)",
            "n_samples": int(n_samples),
            "seed": int(seed),
            "shard_size": int(shard_size),
            "config": config.to_json(),
        },
    )
    n_shards = -(-n_samples // shard_size)
    todo_shards = [k for k in range(n_shards) if not _shard_path(out_dir, k).exists()]
    todo = [
        (seed, i, config)
        for k in todo_shards
        for i in range(k * shard_size, min((k + 1) * shard_size, n_samples))
    ]
    skipped = n_samples - len(todo)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_samples, initial=skipped, desc="EMT samples", unit="sample")
    start = time.perf_counter()
    pending: dict[int, dict[int, dict[str, Any]]] = {k: {} for k in todo_shards}

    def collect(index: int, sample: dict[str, Any]) -> None:
        shard = index // shard_size
        pending[shard][index] = sample
        expected = min((shard + 1) * shard_size, n_samples) - shard * shard_size
        if len(pending[shard]) == expected:
            _write_shard(out_dir, shard, [pending[shard][i] for i in sorted(pending[shard])])
            del pending[shard]
        if bar is not None:
            bar.update(1)

    try:
        if n_workers == 1 or len(todo) <= 1:
            with _limit_blas_threads():
                for args in todo:
                    collect(*_generate_indexed(args))
        else:
            # spawn, not fork: the parent may hold JAX / BLAS threads that a forked child would inherit broken.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(n_workers, len(todo)), initializer=_worker_init) as pool:
                for index, sample in pool.imap_unordered(_generate_indexed, todo, chunksize=1):
                    collect(index, sample)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    return {
        "out_path": str(out_dir),
        "n_samples": n_samples,
        "generated": len(todo),
        "skipped": skipped,
        "seconds": seconds,
        "samples_per_minute": 60.0 * len(todo) / seconds if todo else 0.0,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m segnn_jax.datasets.emt OUT_DIR --n-samples N [--seed S]
    [--workers W] [--catalysts binary]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m segnn_jax.datasets.emt",
        description="Generate (or resume) the OC20-style EMT data set (EMT, not DFT).",
    )
    parser.add_argument("out_path", help="output directory (re-run the same command to resume)")
    parser.add_argument("--n-samples", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--layers", type=int, default=EMTConfig.layers)
    parser.add_argument("--catalysts", choices=CATALYST_SETS, default=EMTConfig.catalysts,
                        help="the seven metals, or those and their binary alloys A2B / AB2")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = generate_emt_dataset(
        args.out_path,
        n_samples=args.n_samples,
        seed=args.seed,
        n_workers=args.workers,
        config=EMTConfig(layers=args.layers, catalysts=args.catalysts),
        shard_size=args.shard_size,
        progress=not args.no_progress,
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
