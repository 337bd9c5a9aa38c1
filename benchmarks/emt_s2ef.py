"""EMT S2EF potential: held-out energy/force errors next to the baseline, and NVE energy drift of
the trained model in ASE (VelocityVerlet) and in JAX-MD (neighbour list, jitted loop).

Reproduce (EMT, not DFT)::

    python -m segnn_jax.datasets.emt_frames data/emt_frames --n-relaxations 1000 --seed 0
    nice -n 10 segnn train emt_s2ef --config.data.path=data/emt_frames --run-dir runs/emt_s2ef
    nice -n 10 python -m benchmarks.emt_s2ef runs/emt_s2ef

The last command reads the run's ``results.json``, runs the MD checks on structures of the test
split and writes ``benchmarks/results/emt_s2ef.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import cpu_info, versions
from segnn_jax import md, training
from segnn_jax.ase_calculator import SEGNNCalculator
from segnn_jax.tasks import potential as task

RESULTS = Path(__file__).resolve().parent / "results" / "emt_s2ef.json"


def _drift_summary(times_fs, totals, n_atoms, dt_fs, extra):
    totals = np.asarray(totals, np.float64)
    slope = np.polyfit(np.asarray(times_fs), totals, 1)[0] if len(totals) > 2 else float("nan")
    return {"timestep_fs": dt_fs, "steps": round(times_fs[-1] / dt_fs), "n_atoms": n_atoms,
            "total_energy_start_ev": float(totals[0]),
            "drift_ev": float(totals[-1] - totals[0]),
            "drift_per_atom_ev": float((totals[-1] - totals[0]) / n_atoms),
            "drift_rate_per_atom_ev_per_ps": float(slope * 1000 / n_atoms),
            "fluctuation_std_ev": float(np.std(totals)),
            "max_deviation_per_atom_ev": float(np.abs(totals - totals[0]).max() / n_atoms),
            **extra}


def ase_nve(calculator, atoms, *, dt_fs, steps, temperature_k, seed=0):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calculator
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k,
                                 rng=np.random.default_rng(seed))
    Stationary(atoms)
    times, totals, temperatures = [], [], []
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs, logfile=None)

    def record():
        times.append(len(times) * dt_fs * 10)
        totals.append(atoms.get_total_energy())
        temperatures.append(atoms.get_temperature())

    dyn.attach(record, interval=10)
    start = time.perf_counter()
    dyn.run(steps)
    return _drift_summary(times, totals, len(atoms), dt_fs, {
        "engine": "ASE VelocityVerlet + SEGNNCalculator", "initial_temperature_k": temperature_k,
        "mean_temperature_k": float(np.mean(temperatures)),
        "compilations": calculator.compilations,
        "wall_s": round(time.perf_counter() - start, 1), "formula": atoms.get_chemical_formula()})


def jax_md_nve(loaded, metal, *, dt_fs, steps, temperature_k, seed=0):
    from ase import units
    from ase.build import fcc111
    from jax_md import quantity, simulate, space

    # JAX-MD's periodic space is orthorhombic with minimum images: an orthogonal fcc(111) slab
    # whose every side exceeds two cutoffs.
    slab = fcc111(metal, size=(4, 4, 3), orthogonal=True, vacuum=6.0)
    slab.pbc = True
    box = np.diag(slab.cell.array).astype(np.float32)
    spec = loaded.spec
    displacement, shift = space.periodic(jnp.asarray(box))
    neighbor_fn = md.jax_md_neighbor_list(displacement, jnp.asarray(box), spec, dr_threshold=0.5)
    energy = md.energy_fn(loaded.model, loaded.params, loaded.model_state, slab.numbers,
                          displacement)
    init, apply = simulate.nve(energy, shift, dt_fs * units.fs)
    positions = jnp.asarray(np.mod(slab.positions, box), jnp.float32)
    masses = jnp.asarray(slab.get_masses(), jnp.float32)[:, None]
    nbrs = neighbor_fn.allocate(positions)
    state = init(jax.random.PRNGKey(seed), positions, kT=temperature_k * units.kB, mass=masses,
                 neighbor=nbrs)

    def total(state, nbrs):
        return energy(state.position, nbrs) + quantity.kinetic_energy(momentum=state.momentum,
                                                                      mass=state.mass)

    chunk = 10

    @jax.jit
    def advance(state, nbrs):
        def step(_, carry):
            state, nbrs = carry
            state = apply(state, neighbor=nbrs)
            return state, nbrs.update(state.position)

        state, nbrs = jax.lax.fori_loop(0, chunk, step, (state, nbrs))
        return state, nbrs, total(state, nbrs)

    start = time.perf_counter()
    times, totals = [0.0], [float(jax.jit(total)(state, nbrs))]
    for k in range(steps // chunk):
        state, nbrs, value = advance(state, nbrs)
        if bool(nbrs.did_buffer_overflow):
            nbrs = neighbor_fn.allocate(state.position)  # reallocate (recompiles) and go on
        times.append((k + 1) * chunk * dt_fs)
        totals.append(float(value))
    kinetic = float(quantity.kinetic_energy(momentum=state.momentum, mass=state.mass))
    return _drift_summary(times, totals, len(slab), dt_fs, {
        "engine": "JAX-MD simulate.nve + segnn_jax.md.energy_fn (sparse neighbour list, "
                  f"{chunk} steps per jitted fori_loop)",
        "initial_temperature_k": temperature_k,
        "final_temperature_k": float(2 * kinetic / (3 * len(slab) * units.kB)),
        "wall_s": round(time.perf_counter() - start, 1),
        "formula": slab.get_chemical_formula()})


def _jax_md_or_skip(loaded, frame, args) -> dict:
    from ase.data import chemical_symbols

    numbers = frame.atomic_numbers.tolist()
    metal = chemical_symbols[max(set(numbers), key=numbers.count)]
    try:
        return jax_md_nve(loaded, metal, dt_fs=args.dt_fs, steps=args.steps,
                          temperature_k=args.temperature_k)
    except ImportError:
        return {"skipped": "jax-md is not installed (pip install 'segnn[md]')"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.emt_s2ef", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dt-fs", type=float, default=1.0)
    parser.add_argument("--temperature-k", type=float, default=300.0)
    parser.add_argument("--train-command", default=None,
                        help="the command that trained the run (default: from results.json)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    loaded = task.load_run(run_dir)
    frames, _ = task.load_frames(loaded.config["data"]["path"])
    test = task.split_frames(loaded.config, frames)["test"]
    # The test frame nearest a minimum (smallest largest force): MD starts near equilibrium.
    from ase import Atoms

    frame = min(test, key=lambda f: float(np.linalg.norm(f.forces, axis=1).max()))
    atoms = Atoms(numbers=frame.atomic_numbers, positions=frame.positions, cell=frame.cell,
                  pbc=frame.pbc)
    calculator = SEGNNCalculator.from_run(run_dir)
    nve = {"ase": ase_nve(calculator, atoms, dt_fs=args.dt_fs, steps=args.steps,
                          temperature_k=args.temperature_k)}
    if loaded.spec.head != "conservative":
        nve["jax_md"] = {"skipped": "JAX-MD integrates the gradient of the energy; the direct "
                                    "force head's forces are not that gradient"}
    else:
        nve["jax_md"] = _jax_md_or_skip(loaded, frame, args)
    out = {
        "task": "potential (S2EF-style) on EMT relaxation frames",
        "level_of_theory": results["level_of_theory"],
        "train": results,
        "test": results["test"],
        "baseline_test": results["baseline"]["test"],
        "nve": nve,
        "train_command": args.train_command or results["command"],
        "command": shlex.join(["python", "-m", "benchmarks.emt_s2ef", *(argv or sys.argv[1:])]),
        "git_revision": training.git_revision(),
        "versions": versions(),
        "cpu": cpu_info(),
    }
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(json.dumps({"test": out["test"], "baseline_test": out["baseline_test"],
                      "nve": nve}, indent=2))
    return out


if __name__ == "__main__":
    main()
