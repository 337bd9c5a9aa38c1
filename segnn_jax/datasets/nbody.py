"""N-body data sets: charged particles and gravity, simulated, cached on disk, turned into graphs.

The two simulators follow ``DATA.md`` section 1 to the letter (the reference generator of EGNN/SEGNN):

* **charged** ("nbody_small"): 5 unit-mass particles with charges +-1, positions N(0, 1), velocities
  Gaussian rescaled to norm 0.5, a one-off reflection of the initial state into the box [-5, 5]^3, the
  Coulomb force ``F_i = sum_j q_i q_j (x_i - x_j) / |x_i - x_j|^3`` clipped per Cartesian component to
  [-100, 100], and the reference's integrator: ``v += dt F(x0)``, then for s = 1 .. 4999:
  ``x += dt v``; record (x, v) if s % 100 == 0; ``v += dt F(x)``. 49 frames, frame k is the state after
  step 100 (k + 1). Splits: 10,000 train, 2,000 valid, 2,000 test from one ``np.random.seed(43)``
  stream in that order, drawing per simulation exactly what the reference draws (charges, positions,
  velocities, then its two zero-variance "noise" arrays), so the initial conditions are those of the
  reference's data set.
* **gravity**: 100 unit masses, G = 1, softening 0.1, velocity Verlet with dt = 0.001, positions and
  velocities N(0, 1) with the mean velocity removed, a frame recorded before the update every 100
  steps (frame k = after 100 k steps); the run stops at step 4000 because frame 40 is the last one
  used. The reference's gravity pipeline cannot be reproduced (its generator and loader disagree), so
  its stream is our own: ``np.random.default_rng(seed)`` draws, per simulation in split order
  train/valid/test, the [100, 3] positions then the [100, 3] velocities.

The integration runs in float64 (JAX ``lax.scan`` under a local ``jax.enable_x64`` context; the rest of
the process keeps its float32 default), vectorised over simulations with the batch axis innermost.
Distances are computed from coordinate differences (the reference expands ``|a|^2 + |b|^2 - 2 a.b``,
which loses digits); on a chaotic system this changes trajectories at the level of rounding only.

**Cache.** Each split lives in ``<data_dir>/nbody_<name>_<split>_seed<seed>.npz`` (``data_dir`` is the
argument, else ``$SEGNN_DATA_DIR``, else ``~/.cache/segnn_jax``). A file holds the first ``n``
simulations of its split, the generation parameters as JSON and a SHA-256 of both; it is written to a
temporary file and moved into place with ``os.replace``, so readers never see a partial file. On load
the parameters, the shapes and the checksum are verified; a file that fails any check is reported with
a warning and regenerated, never used. Asking for more simulations than a file holds simulates the
missing ones only (a split's simulations do not depend on how many are generated).

What is stored: charged keeps all 49 recorded frames (5.9 kB per simulation in float32, 59 MB for the
whole train split); gravity keeps frames 30 and 40 only (a full gravity trajectory is 100 kB per
simulation). Positions and velocities are stored as float32, the precision the models use.

Equivariance caveat: the box reflection of the initial state and the per-component force clipping are
not rotation-equivariant, so the data set as a whole is E(3)-equivariant only in distribution. The
integrator core (:func:`simulate_charged` on unclipped states, :func:`simulate_gravity`) is equivariant
to rotations, reflections and translations of its initial state; the tests check exactly that.

Shape letters: S simulations (systems), T frames, N bodies.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CHARGED",
    "DATA_DIR_ENV",
    "GRAVITY",
    "NBodyConfig",
    "NBodyData",
    "NBodyError",
    "charged_initial_conditions",
    "concatenate",
    "default_data_dir",
    "generate_split",
    "gravity_energy",
    "gravity_initial_conditions",
    "load_nbody",
    "nbody_graphs",
    "planned_shapes",
    "simulate_charged",
    "simulate_gravity",
    "trivial_baselines",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "SEGNN_DATA_DIR"
# Bump when the simulator or the file layout changes: old caches then fail the parameter check.
_FORMAT_VERSION = 1
_SPLITS = ("train", "valid", "test")
# Simulations integrated together: the fastest chunk sizes measured on a 2-core CPU (larger chunks
# fall out of cache). Fixed, so that every generation runs the same compiled code.
_CHARGED_CHUNK = 128
_GRAVITY_CHUNK = 32


class NBodyError(ValueError):
    """Bad request to the N-body data layer: unknown data set or split, or an impossible frame/size."""


class _CacheInvalid(Exception):
    """A cache file that must not be used (unreadable, truncated, tampered with, other parameters)."""


@dataclasses.dataclass(frozen=True)
class NBodyConfig:
    """Everything that determines a generated N-body data set (stored in, and checked against, the cache).

    Attributes:
        name: "charged" or "gravity".
        n_bodies: particles per system.
        seed: seed of the one random stream the splits are drawn from, in the order of ``split_sizes``.
        split_sizes: ``(n_train, n_valid, n_test)`` simulations.
        n_steps: integration steps of the reference run (charged: 5000, i.e. steps 1..4999 after the
            initial half kick; gravity: 4000).
        record_every: steps between recorded frames.
        dt: time step.
        stored_frames: recorded frames kept in the cache; None keeps all of them.
        box_size: charged only, half-width of the box of the initial reflection.
        vel_norm: charged only, norm of every initial velocity.
        max_force: charged only, bound of each force component.
        softening: gravity only, Plummer softening length.
    """

    name: str
    n_bodies: int
    seed: int
    split_sizes: Tuple[int, int, int]
    n_steps: int
    record_every: int = 100
    dt: float = 1e-3
    stored_frames: Optional[Tuple[int, ...]] = None
    box_size: float = 5.0
    vel_norm: float = 0.5
    max_force: float = 100.0
    softening: float = 0.1

    def __post_init__(self):
        if self.name not in ("charged", "gravity"):
            raise NBodyError(f"name must be 'charged' or 'gravity', got {self.name!r}")
        if len(self.split_sizes) != 3 or min(self.split_sizes) < 0:
            raise NBodyError(f"split_sizes must be three non-negative counts, got {self.split_sizes}")
        if self.n_bodies < 2 or self.record_every < 1 or self.n_recorded_frames < 1:
            raise NBodyError(f"need >= 2 bodies and >= 1 recorded frame, got n_bodies={self.n_bodies}, "
                             f"n_steps={self.n_steps}, record_every={self.record_every}")
        bad = [f for f in self.stored_frames or () if not 0 <= f < self.n_recorded_frames]
        if bad:
            raise NBodyError(f"stored frames {bad} are outside the {self.n_recorded_frames} recorded frames")

    @property
    def n_recorded_frames(self) -> int:
        """Frames the simulator records (charged: 49, gravity: 41)."""
        if self.name == "charged":
            # Records at steps s = record_every, 2 record_every, ... < n_steps.
            return (self.n_steps - 1) // self.record_every
        # Frame 0 is the initial state, then one frame every record_every steps up to n_steps.
        return self.n_steps // self.record_every + 1

    @property
    def frames(self) -> Tuple[int, ...]:
        """Indices of the recorded frames the cache keeps, ``[T]``."""
        if self.stored_frames is None:
            return tuple(range(self.n_recorded_frames))
        return tuple(self.stored_frames)

    def frame_step(self, frame: int) -> int:
        """The integration step after which ``frame`` is recorded."""
        return self.record_every * (frame + 1 if self.name == "charged" else frame)

    def split_range(self, split: str) -> Tuple[int, int]:
        """``(start, stop)`` of ``split`` in the random stream."""
        if split not in _SPLITS:
            raise NBodyError(f"split must be one of {_SPLITS}, got {split!r}")
        i = _SPLITS.index(split)
        start = int(sum(self.split_sizes[:i]))
        return start, start + int(self.split_sizes[i])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["split_sizes"] = list(self.split_sizes)
        d["stored_frames"] = None if self.stored_frames is None else list(self.stored_frames)
        return d


CHARGED = NBodyConfig(name="charged", n_bodies=5, seed=43, split_sizes=(10_000, 2_000, 2_000),
                      n_steps=5000)
GRAVITY = NBodyConfig(name="gravity", n_bodies=100, seed=43, split_sizes=(10_000, 2_000, 2_000),
                      n_steps=4000, stored_frames=(30, 40))
_CONFIGS = {"charged": CHARGED, "gravity": GRAVITY}


class NBodyData(NamedTuple):
    """One split of an N-body data set, as NumPy arrays (float32).

    Attributes:
        positions: ``[S, N, 3]`` positions at the input frame.
        velocities: ``[S, N, 3]`` velocities at the input frame.
        charges: ``[S, N]`` charges (+-1) for "charged"; None for "gravity".
        masses: ``[S, N]`` masses (all ones in both data sets).
        targets: ``[S, N, 3]`` positions at the target frame.
        horizon: time between the input and the target frame (1.0 by default).
        name: "charged" or "gravity".
    """

    positions: np.ndarray
    velocities: np.ndarray
    charges: Optional[np.ndarray]
    masses: np.ndarray
    targets: np.ndarray
    horizon: float
    name: str


def default_data_dir() -> Path:
    """``$SEGNN_DATA_DIR`` if set, else ``~/.cache/segnn_jax``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/segnn_jax").expanduser()


def _resolve_config(name: Union[str, NBodyConfig]) -> NBodyConfig:
    if isinstance(name, NBodyConfig):
        return name
    if name not in _CONFIGS:
        raise NBodyError(f"unknown N-body data set {name!r}; choose one of {sorted(_CONFIGS)}")
    return _CONFIGS[name]


def planned_shapes(name: Union[str, NBodyConfig], split: str,
                   n_systems: Optional[int] = None) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the arrays a split's cache holds, without generating anything.

    >>> planned_shapes("charged", "train")["positions"]
    (10000, 49, 5, 3)
    """
    config = _resolve_config(name)
    start, stop = config.split_range(split)
    s = stop - start if n_systems is None else n_systems
    shapes = {
        "positions": (s, len(config.frames), config.n_bodies, 3),
        "velocities": (s, len(config.frames), config.n_bodies, 3),
        "masses": (s, config.n_bodies),
        "frames": (len(config.frames),),
    }
    if config.name == "charged":
        shapes["charges"] = (s, config.n_bodies)
    return shapes


# --------------------------------------------------------------------------------------------------
# Initial conditions


def charged_initial_conditions(config: NBodyConfig, start: int, stop: int
                               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Initial states of simulations ``[start, stop)`` of the charged stream, box reflection applied.

    Per simulation the legacy ``RandomState(seed)`` stream is consumed exactly as by the reference
    generator: ``choice([-1, 0, 1], p=[.5, 0, .5])`` for the 5 charges, ``randn(3, 5)`` positions,
    ``randn(3, 5)`` velocities, then two ``randn(n_frames, 3, 5)`` arrays the reference draws as
    zero-variance observation noise (drawn here only to stay in step with its stream).

    Returns:
        positions ``[S, N, 3]``, velocities ``[S, N, 3]`` (float64), charges ``[S, N]`` (float64).
    """
    if not 0 <= start <= stop:
        raise NBodyError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    n, rs = config.n_bodies, np.random.RandomState(config.seed)
    t_save = config.n_recorded_frames
    pos = np.empty((stop - start, 3, n))
    vel = np.empty((stop - start, 3, n))
    charges = np.empty((stop - start, n))
    for i in range(stop):
        q = rs.choice(np.array([-1.0, 0.0, 1.0]), size=(n, 1), p=[0.5, 0.0, 0.5])
        x = rs.randn(3, n)
        v = rs.randn(3, n)
        rs.randn(t_save, 3, n)
        rs.randn(t_save, 3, n)
        if i >= start:
            pos[i - start], vel[i - start], charges[i - start] = x, v, q[:, 0]
    vel = vel * config.vel_norm / np.sqrt((vel ** 2).sum(axis=1, keepdims=True))
    # The reference's one-off reflection, in its order: first the upper wall, then the lower one.
    b = config.box_size
    over = pos > b
    pos = np.where(over, 2 * b - pos, pos)
    vel = np.where(over, -np.abs(vel), vel)
    under = pos < -b
    pos = np.where(under, -2 * b - pos, pos)
    vel = np.where(under, np.abs(vel), vel)
    return pos.transpose(0, 2, 1), vel.transpose(0, 2, 1), charges


def gravity_initial_conditions(config: NBodyConfig, start: int, stop: int
                               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Initial states of simulations ``[start, stop)`` of the gravity stream (mean velocity removed).

    Returns:
        positions ``[S, N, 3]``, velocities ``[S, N, 3]`` and masses ``[S, N]`` (ones), float64.
    """
    if not 0 <= start <= stop:
        raise NBodyError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    draws = np.random.default_rng(config.seed).standard_normal((stop, 2, config.n_bodies, 3))[start:]
    pos, vel = draws[:, 0], draws[:, 1]
    vel = vel - vel.mean(axis=1, keepdims=True)  # unit masses: the centre-of-mass velocity
    return pos, vel, np.ones(pos.shape[:2])


# --------------------------------------------------------------------------------------------------
# Integrators (float64, batch axis innermost: arrays are [3, N, S] inside)


def _charged_forces(x, qq, off_diagonal, max_force):
    """``[3, N, S]`` clipped Coulomb forces; ``qq`` is ``[N, N, S]`` q_i q_j, zero on the diagonal."""
    d = x[:, :, None, :] - x[:, None, :, :]  # [3, N(i), N(j), S] x_i - x_j
    r2 = jnp.where(off_diagonal, jnp.sum(d * d, axis=0), 1.0)
    f = jnp.sum((qq / (r2 * jnp.sqrt(r2)))[None] * d, axis=2)
    return jnp.clip(f, -max_force, max_force)


@functools.partial(jax.jit, static_argnames=("n_frames", "record_every"))
def _charged_run(x, v, q, dt, max_force, *, n_frames, record_every):
    n = x.shape[1]
    off_diagonal = ~jnp.eye(n, dtype=bool)[:, :, None]
    qq = jnp.where(off_diagonal, q[:, None, :] * q[None, :, :], 0.0)
    forces = functools.partial(_charged_forces, qq=qq, off_diagonal=off_diagonal,
                               max_force=max_force)

    def step(_, state):
        x, v = state
        x = x + dt * v
        return x, v + dt * forces(x)

    def frame(state, _):
        x, v = jax.lax.fori_loop(0, record_every - 1, step, state)
        x = x + dt * v
        # The reference records after the drift and before the kick of every 100th step.
        return (x, v + dt * forces(x)), (x, v)

    v = v + dt * forces(x)
    _, (xs, vs) = jax.lax.scan(frame, (x, v), None, length=n_frames)
    return xs, vs  # [T, 3, N, S]


def _gravity_acceleration(x, m, softening):
    """``[3, N, S]`` softened accelerations ``sum_j m_j (x_j - x_i) / (|x_j - x_i|^2 + eps^2)^1.5``."""
    d = x[:, None, :, :] - x[:, :, None, :]  # [3, N(i), N(j), S] x_j - x_i; zero for j = i
    r2 = jnp.sum(d * d, axis=0) + softening ** 2
    return jnp.sum((m[None, :, :] / (r2 * jnp.sqrt(r2)))[None] * d, axis=2)


@functools.partial(jax.jit, static_argnames=("n_frames", "record_every"))
def _gravity_run(x, v, m, dt, softening, *, n_frames, record_every):
    acceleration = functools.partial(_gravity_acceleration, m=m, softening=softening)

    def step(_, state):
        x, v, a = state
        v = v + 0.5 * dt * a
        x = x + dt * v
        a = acceleration(x)
        return x, v + 0.5 * dt * a, a

    def frame(state, _):
        state = jax.lax.fori_loop(0, record_every, step, state)
        return state, state[:2]

    _, (xs, vs) = jax.lax.scan(frame, (x, v, acceleration(x)), None, length=n_frames - 1)
    return (jnp.concatenate([x[None], xs]), jnp.concatenate([v[None], vs]))  # [T, 3, N, S]


def _batched(run, arrays, batch_size, progress, desc):
    """Runs ``run`` over chunks of exactly ``batch_size`` simulations.

    Every chunk has the same shape (the last one is padded with copies of its first simulation), so
    the function compiles once and, bit for bit, a simulation's result does not depend on how many
    others run: XLA's generated code (vectorisation, fusion) differs between batch shapes, and these
    systems are chaotic enough that a last-bit difference can grow to O(1) over 5000 steps.
    """
    if batch_size < 1:
        raise NBodyError(f"batch_size must be >= 1, got {batch_size}")
    n = len(arrays[0])
    size = batch_size
    bar = _progress_bar(n, desc) if progress else None
    outputs = []
    try:
        for lo in range(0, n, size):
            chunk = [a[lo:lo + size] for a in arrays]
            real = len(chunk[0])
            if real < size:
                chunk = [np.concatenate([c, np.repeat(c[:1], size - real, axis=0)]) for c in chunk]
            outputs.append([o[:real] for o in run(*chunk)])
            if bar is not None:
                bar.update(real)
    finally:
        if bar is not None:
            bar.close()
    return [np.concatenate(parts) for parts in zip(*outputs)]


def _progress_bar(total, desc):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: generation then runs silently
        return None
    return tqdm(total=total, desc=desc, unit="sim")


def _check_state(positions, velocities, per_body, per_body_name):
    positions = np.asarray(positions, dtype=np.float64)
    velocities = np.asarray(velocities, dtype=np.float64)
    per_body = np.asarray(per_body, dtype=np.float64)
    if positions.ndim != 3 or positions.shape[-1] != 3 or velocities.shape != positions.shape:
        raise NBodyError(f"positions and velocities must both be [S, N, 3], got {positions.shape} "
                         f"and {velocities.shape}")
    if per_body.shape != positions.shape[:2]:
        raise NBodyError(f"{per_body_name} must be [S, N] = {list(positions.shape[:2])}, "
                         f"got {list(per_body.shape)}")
    if len(positions) == 0:
        raise NBodyError("need at least one system to simulate")
    if not (np.isfinite(positions).all() and np.isfinite(velocities).all()):
        raise NBodyError("initial positions and velocities must be finite")
    return positions, velocities, per_body


def simulate_charged(positions: np.ndarray, velocities: np.ndarray, charges: np.ndarray, *,
                     n_frames: int = 49, record_every: int = 100, dt: float = 1e-3,
                     max_force: float = 100.0, batch_size: int = _CHARGED_CHUNK,
                     progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Integrates charged-particle systems from given initial states (no box reflection here).

    Args:
        positions: ``[S, N, 3]`` initial positions.
        velocities: ``[S, N, 3]`` initial velocities.
        charges: ``[S, N]``.
        n_frames: recorded frames; frame k is the state after step ``record_every (k + 1)``.
        record_every: steps between frames.
        dt: time step.
        max_force: bound of each force component (``np.inf`` for none).
        batch_size: simulations integrated together (the last chunk is padded to this size).
        progress: show a tqdm bar.

    Returns:
        positions and velocities ``[S, T, N, 3]``, float64.
    """
    positions, velocities, charges = _check_state(positions, velocities, charges, "charges")
    if n_frames < 1 or record_every < 1:
        raise NBodyError(f"need n_frames >= 1 and record_every >= 1, got {n_frames}, {record_every}")

    def run(x, v, q):
        with jax.enable_x64(True):
            xs, vs = _charged_run(x.transpose(2, 1, 0), v.transpose(2, 1, 0), q.T, dt, max_force,
                                  n_frames=n_frames, record_every=record_every)
            return np.asarray(xs).transpose(3, 0, 2, 1), np.asarray(vs).transpose(3, 0, 2, 1)

    return tuple(_batched(run, (positions, velocities, charges), batch_size, progress, "charged"))


def simulate_gravity(positions: np.ndarray, velocities: np.ndarray, masses: np.ndarray, *,
                     n_frames: int = 41, record_every: int = 100, dt: float = 1e-3,
                     softening: float = 0.1, batch_size: int = _GRAVITY_CHUNK,
                     progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Integrates softened gravitational systems with velocity Verlet from given initial states.

    Args:
        positions: ``[S, N, 3]`` initial positions.
        velocities: ``[S, N, 3]`` initial velocities.
        masses: ``[S, N]``.
        n_frames: recorded frames; frame k is the state after ``record_every k`` steps (frame 0 is
            the initial state), so the run takes ``record_every (n_frames - 1)`` steps.
        record_every: steps between frames.
        dt: time step.
        softening: Plummer softening length.
        batch_size: simulations integrated together (the last chunk is padded to this size).
        progress: show a tqdm bar.

    Returns:
        positions and velocities ``[S, T, N, 3]``, float64.
    """
    positions, velocities, masses = _check_state(positions, velocities, masses, "masses")
    if n_frames < 1 or record_every < 1:
        raise NBodyError(f"need n_frames >= 1 and record_every >= 1, got {n_frames}, {record_every}")

    def run(x, v, m):
        with jax.enable_x64(True):
            xs, vs = _gravity_run(x.transpose(2, 1, 0), v.transpose(2, 1, 0), m.T, dt, softening,
                                  n_frames=n_frames, record_every=record_every)
            return np.asarray(xs).transpose(3, 0, 2, 1), np.asarray(vs).transpose(3, 0, 2, 1)

    return tuple(_batched(run, (positions, velocities, masses), batch_size, progress, "gravity"))


def gravity_energy(positions: np.ndarray, velocities: np.ndarray, masses: np.ndarray,
                   softening: float = 0.1) -> np.ndarray:
    """Total energy of softened gravity, ``[...]`` from ``[..., N, 3]`` states and ``[..., N]`` masses.

    The potential ``-sum_{i<j} m_i m_j / sqrt(|x_i - x_j|^2 + eps^2)`` is the one whose gradient gives
    the accelerations of :func:`simulate_gravity`, so velocity Verlet conserves this energy up to
    O(dt^2) oscillations.
    """
    positions = np.asarray(positions, dtype=np.float64)
    masses = np.asarray(masses, dtype=np.float64)
    kinetic = 0.5 * np.sum(masses * np.sum(np.asarray(velocities, np.float64) ** 2, axis=-1), axis=-1)
    d = positions[..., :, None, :] - positions[..., None, :, :]
    inv_r = 1.0 / np.sqrt(np.sum(d * d, axis=-1) + softening ** 2)
    n = positions.shape[-2]
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    pair = masses[..., :, None] * masses[..., None, :] * inv_r
    return kinetic - np.sum(np.where(upper, pair, 0.0), axis=(-2, -1))


# --------------------------------------------------------------------------------------------------
# Generation and the cache


def generate_split(name: Union[str, NBodyConfig], split: str, start: int = 0,
                   stop: Optional[int] = None, *, progress: bool = False) -> Dict[str, np.ndarray]:
    """Simulates systems ``[start, stop)`` of a split (no cache involved).

    Returns:
        A dict of float32 arrays: "positions" and "velocities" ``[S, T, N, 3]`` at ``config.frames``,
        "masses" ``[S, N]``, "charges" ``[S, N]`` (charged only), and "frames" ``[T]`` int32.
    """
    config = _resolve_config(name)
    lo, hi = config.split_range(split)
    stop = hi - lo if stop is None else stop
    if not 0 <= start <= stop <= hi - lo:
        raise NBodyError(f"{config.name}/{split} has {hi - lo} systems; cannot generate "
                         f"[{start}, {stop})")
    frames = np.asarray(config.frames)
    if config.name == "charged":
        x0, v0, q = charged_initial_conditions(config, lo + start, lo + stop)
        xs, vs = simulate_charged(
            x0, v0, q, n_frames=int(frames.max()) + 1, record_every=config.record_every,
            dt=config.dt, max_force=config.max_force, progress=progress)
        extra = {"charges": q.astype(np.float32), "masses": np.ones(q.shape, np.float32)}
    else:
        x0, v0, m = gravity_initial_conditions(config, lo + start, lo + stop)
        xs, vs = simulate_gravity(
            x0, v0, m, n_frames=int(frames.max()) + 1, record_every=config.record_every,
            dt=config.dt, softening=config.softening, progress=progress)
        extra = {"masses": m.astype(np.float32)}
    return {"positions": xs[:, frames].astype(np.float32),
            "velocities": vs[:, frames].astype(np.float32),
            "frames": frames.astype(np.int32), **extra}


def _metadata(config: NBodyConfig, split: str, n_systems: int) -> str:
    return json.dumps({"format_version": _FORMAT_VERSION, "config": config.to_dict(),
                       "split": split, "n_systems": n_systems}, sort_keys=True)


def _checksum(metadata: str, arrays: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(metadata.encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _cache_path(config: NBodyConfig, split: str, data_dir: Path) -> Path:
    return data_dir / f"nbody_{config.name}_{split}_seed{config.seed}.npz"


def _write_cache(path: Path, config: NBodyConfig, split: str, arrays: Dict[str, np.ndarray]):
    metadata = _metadata(config, split, len(arrays["positions"]))
    payload = dict(arrays, metadata=np.array(metadata), sha256=np.array(_checksum(metadata, arrays)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the complete new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path, config: NBodyConfig, split: str) -> Dict[str, np.ndarray]:
    """Reads and verifies a cache file; raises _CacheInvalid with the reason on any defect."""
    expected = set(planned_shapes(config, split, 0))
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if keys != expected | {"metadata", "sha256"}:
                raise _CacheInvalid(f"holds arrays {sorted(keys)}, expected {sorted(expected)}")
            arrays = {k: f[k] for k in expected}
            metadata, digest = str(f["metadata"]), str(f["sha256"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise _CacheInvalid(f"unreadable ({type(e).__name__}: {e})") from e
    try:
        meta = json.loads(metadata)
        n = int(meta["n_systems"])
    except (ValueError, KeyError, TypeError) as e:
        raise _CacheInvalid(f"unreadable metadata ({e})") from e
    if metadata != _metadata(config, split, n):
        raise _CacheInvalid(f"was generated with other parameters: {metadata}")
    shapes = planned_shapes(config, split, n)
    wrong = {k: a.shape for k, a in arrays.items() if a.shape != shapes[k]}
    if wrong:
        raise _CacheInvalid(f"has shapes {wrong}, expected {shapes}")
    if _checksum(metadata, arrays) != digest:
        raise _CacheInvalid("fails its SHA-256 checksum")
    return arrays


def _cached_split(config: NBodyConfig, split: str, n_systems: int, data_dir: Path,
                  progress: bool) -> Dict[str, np.ndarray]:
    path = _cache_path(config, split, data_dir)
    arrays = None
    if path.exists():
        try:
            arrays = _read_cache(path, config, split)
        except _CacheInvalid as e:
            logger.warning("N-body cache %s %s; regenerating it.", path, e)
    have = 0 if arrays is None else len(arrays["positions"])
    if have < n_systems:
        logger.info("Simulating %s/%s systems %d..%d into %s", config.name, split, have, n_systems,
                    path)
        new = generate_split(config, split, have, n_systems, progress=progress)
        if arrays is not None:
            new = {k: v if k == "frames" else np.concatenate([arrays[k], v]) for k, v in new.items()}
        _write_cache(path, config, split, new)
        arrays = new
    return {k: v if k == "frames" else v[:n_systems] for k, v in arrays.items()}


def load_nbody(name: Union[str, NBodyConfig] = "charged", split: str = "train",
               n_systems: Optional[int] = None, data_dir: Union[str, os.PathLike, None] = None, *,
               input_frame: int = 30, target_frame: int = 40, progress: bool = True) -> NBodyData:
    """Loads (generating and caching it first if needed) one split of an N-body data set.

    Args:
        name: "charged", "gravity", or an :class:`NBodyConfig` (e.g. a reduced one for tests).
        split: "train", "valid" or "test".
        n_systems: the first ``n_systems`` simulations of the split (default: all of it). Only these
            are simulated; a later request for more extends the cache.
        data_dir: cache directory (default :func:`default_data_dir`).
        input_frame: frame of the input positions and velocities.
        target_frame: frame of the target positions.
        progress: show a tqdm progress bar while simulating.

    Returns:
        :class:`NBodyData` with ``[S, N, 3]`` positions, velocities and targets.

    Raises:
        NBodyError: unknown data set or split, too many systems, or frames that are not stored.
    """
    config = _resolve_config(name)
    start, stop = config.split_range(split)
    if n_systems is None:
        n_systems = stop - start
    if not 0 < n_systems <= stop - start:
        raise NBodyError(f"{config.name}/{split} has {stop - start} systems, asked for {n_systems}")
    for label, frame in (("input_frame", input_frame), ("target_frame", target_frame)):
        if frame not in config.frames:
            raise NBodyError(f"{label}={frame} is not stored for {config.name}; stored frames are "
                             f"{config.frames[0]}..{config.frames[-1]}"
                             if config.stored_frames is None else
                             f"{label}={frame} is not stored for {config.name}; stored frames are "
                             f"{list(config.frames)}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    arrays = _cached_split(config, split, n_systems, data_dir, progress)
    t_in, t_out = config.frames.index(input_frame), config.frames.index(target_frame)
    horizon = (config.frame_step(target_frame) - config.frame_step(input_frame)) * config.dt
    return NBodyData(
        positions=arrays["positions"][:, t_in], velocities=arrays["velocities"][:, t_in],
        charges=arrays.get("charges"), masses=arrays["masses"],
        targets=arrays["positions"][:, t_out], horizon=float(horizon), name=config.name)


def concatenate(parts: Sequence[NBodyData]) -> NBodyData:
    """The systems of several :class:`NBodyData` of one data set and horizon, in order.

    Raises:
        NBodyError: no parts, or parts of different data sets or horizons.
    """
    if not parts:
        raise NBodyError("nothing to concatenate")
    first = parts[0]
    for part in parts[1:]:
        if part.name != first.name or not np.isclose(part.horizon, first.horizon):
            raise NBodyError(f"cannot concatenate {part.name} data with horizon {part.horizon} "
                             f"to {first.name} data with horizon {first.horizon}")

    def stacked(field):
        values = [getattr(part, field) for part in parts]
        return None if values[0] is None else np.concatenate(values)

    return NBodyData(positions=stacked("positions"), velocities=stacked("velocities"),
                     charges=stacked("charges"), masses=stacked("masses"),
                     targets=stacked("targets"), horizon=first.horizon, name=first.name)


# --------------------------------------------------------------------------------------------------
# Baselines and graphs


def trivial_baselines(data: NBodyData) -> Dict[str, float]:
    """MSE (mean over systems, bodies and coordinates) of the two trivial predictions.

    "input_position" predicts no motion; "constant_velocity" predicts ``x + horizon v``. On the
    charged validation set these are about 0.246 and 0.122.
    """
    def mse(prediction):
        return float(np.mean((prediction.astype(np.float64) - data.targets) ** 2))

    return {"input_position": mse(data.positions),
            "constant_velocity": mse(data.positions + data.horizon * data.velocities)}


def nbody_graphs(data: NBodyData, *, k: Optional[int] = None) -> List:
    """One ``jraph.GraphsTuple`` per system, built with :mod:`segnn_jax.graph`.

    Charged systems are fully connected (5 nodes, 20 edges); gravity systems are k-nearest-neighbour
    graphs on the input positions (``k`` = 6 unless given). Node fields: "positions", "velocities",
    "targets" (``[N, 3]``) and "charges" (charged) or "masses" (gravity), ``[N]``. No model attributes
    are computed here.

    Args:
        data: a split from :func:`load_nbody`.
        k: neighbours per node; None means fully connected for charged and 6 for gravity.
    """
    from segnn_jax import graph as graph_lib  # the data layer stays importable without the library

    scalars = ("charges", data.charges) if data.name == "charged" else ("masses", data.masses)
    if k is None and data.name == "charged":
        senders, receivers = graph_lib.fully_connected_edges(data.positions.shape[1])
    graphs = []
    for s in range(len(data.positions)):
        if k is not None or data.name != "charged":
            senders, receivers = graph_lib.knn_graph_edges(data.positions[s], 6 if k is None else k)
        graphs.append(graph_lib.make_graph(
            data.positions[s], senders, receivers,
            nodes={"velocities": data.velocities[s], "targets": data.targets[s],
                   scalars[0]: scalars[1][s]}))
    return graphs
