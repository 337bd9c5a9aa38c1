"""An ASE calculator for SEGNN potentials: energy, forces and stress for ASE's optimisers and MD.

Named ``ase_calculator`` (not ``ase``) so that nothing inside this package can shadow the ``ase``
package. Typical use::

    from segnn_jax.ase_calculator import SEGNNCalculator
    atoms.calc = SEGNNCalculator.load("runs/emt_s2ef")   # a run directory of the potential task
    atoms.calc = SEGNNCalculator.load("emt.segnn")       # or its artifact (segnn export)
    BFGS(atoms).run(fmax=0.05)

Neighbour lists are rebuilt on the host at every call with :mod:`segnn_jax.periodic` (periodic
along ``atoms.pbc``). The graph is padded to a bucket (nodes rounded up to a multiple, edges to a
geometric ladder), so the jitted model recompiles only when the bucket changes, not at every MD
step in which the number of edges moves by a few; :attr:`SEGNNCalculator.compilations` counts the
shapes compiled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from segnn_jax import potential as pot
from segnn_jax.compile_options import jit
from segnn_jax.graph import pad_graph

__all__ = ["ARTIFACT_LOADER", "SEGNNCalculator", "padded_sizes"]

def _load_potential_artifact(path: Path) -> tuple[Any, Any, Any, Any]:
    # Imported when called: the task module (training, configs) is heavier than this one, and
    # its predict imports this module.
    from segnn_jax.tasks.potential import load_potential

    loaded = load_potential(path)
    return loaded.spec, loaded.model, loaded.params, loaded.model_state


#: How :meth:`SEGNNCalculator.load` reads a portable model file:
#: ``loader(path) -> (spec, model, params, model_state)``; by default an artifact of the
#: ``potential`` task (``segnn export``, :mod:`segnn_jax.artifact`). Replace it to read another
#: format; None reads run directories only.
ARTIFACT_LOADER: Callable[[Path], tuple[Any, Any, Any, Any]] | None = _load_potential_artifact


def padded_sizes(n_atoms: int, n_edges: int, *, node_multiple: int = 8,
                 edge_growth: float = 1.25, min_edges: int = 64) -> tuple[int, int]:
    """The padded (nodes, edges) of a structure: nodes ``n_atoms + 1`` rounded up to
    ``node_multiple``; edges the first rung >= ``n_edges`` of the ladder ``min_edges``,
    ``x edge_growth`` (rounded up to multiples of 8), ...

    >>> padded_sizes(29, 700)
    (32, 720)
    """
    nodes = node_multiple * math.ceil((n_atoms + 1) / node_multiple)
    edges = min_edges
    while edges < n_edges:
        edges = 8 * math.ceil(edges * edge_growth / 8)
    return nodes, edges


class SEGNNCalculator(Calculator):
    """Energy (eV), forces (eV/A) and, under full periodic boundaries with the conservative head,
    stress (eV/A^3) from a trained SEGNN potential.

    Args:
        spec: the potential's :class:`segnn_jax.potential.PotentialSpec`.
        params, model_state: its parameters and (empty) Haiku state.
        model: the transformed network (default: built from ``spec``).
        node_multiple, edge_growth: the padding buckets (see :func:`padded_sizes`).
        dtype: of positions and shifts handed to the model (float32, or float64 with x64 enabled).

    Raises (at calculation):
        ValueError: an element the potential was not trained on.
    """

    implemented_properties: ClassVar[list] = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, spec: pot.PotentialSpec, params: Any, model_state: Any = None, *,
                 model: Any = None, node_multiple: int = 8, edge_growth: float = 1.25,
                 dtype: Any = np.float32, **kwargs: Any):
        super().__init__(**kwargs)
        if np.dtype(dtype) == np.float64 and not jax.config.jax_enable_x64:
            raise ValueError("dtype float64 needs jax_enable_x64 (jax.config.update("
                             "'jax_enable_x64', True)); otherwise JAX computes in float32")
        self.spec = spec
        self.model = model if model is not None else pot.make_potential(spec)
        self.params = params
        self.model_state = model_state if model_state is not None else {}
        self.node_multiple = int(node_multiple)
        self.edge_growth = float(edge_growth)
        self.dtype = np.dtype(dtype)
        self.compiled_shapes: set = set()
        self._predict = {
            flag: jit(functools.partial(pot.predict, self.model, head=spec.head, stress=flag))
            for flag in (False, True)}

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs: Any) -> SEGNNCalculator:
        """The best checkpoint of a run directory of the ``potential`` task."""
        from segnn_jax.tasks.potential import load_run

        loaded = load_run(run_dir)
        return cls(loaded.spec, loaded.params, loaded.model_state, model=loaded.model, **kwargs)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> SEGNNCalculator:
        """A run directory, or (through :data:`ARTIFACT_LOADER`) a portable model file such as
        ``segnn export``'s artifact of a potential run."""
        path = Path(path)
        if path.is_dir():
            return cls.from_run(path, **kwargs)
        if ARTIFACT_LOADER is None:
            raise FileNotFoundError(f"{path}: not a run directory (portable model files need "
                                    f"segnn_jax.ase_calculator.ARTIFACT_LOADER)")
        spec, model, params, model_state = ARTIFACT_LOADER(path)
        return cls(spec, params, model_state, model=model, **kwargs)

    @property
    def compilations(self) -> int:
        """Distinct padded shapes (and stress flags) compiled so far."""
        return len(self.compiled_shapes)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        numbers = atoms.get_atomic_numbers()
        known = set(self.spec.element_energies)
        unknown = sorted({int(z) for z in numbers} - known)
        if known and unknown:
            from ase.data import chemical_symbols

            raise ValueError(f"element(s) {', '.join(chemical_symbols[z] for z in unknown)} were "
                             f"not in the potential's training data")
        with_stress = "stress" in properties
        if with_stress and (not atoms.pbc.all() or self.spec.head != "conservative"):
            raise ValueError("stress needs periodic boundaries in all three directions and the "
                             "conservative force head")
        graph = pot.structure_graph(atoms.get_positions(), numbers, atoms.get_cell().array,
                                    atoms.get_pbc(), self.spec.cutoff, dtype=self.dtype)
        n_atoms, n_edges = len(atoms), int(graph.n_edge[0])
        nodes, edges = padded_sizes(n_atoms, n_edges, node_multiple=self.node_multiple,
                                    edge_growth=self.edge_growth)
        graph = pad_graph(graph, nodes, edges, 2)
        self.compiled_shapes.add((nodes, edges, with_stress))
        out = self._predict[with_stress](self.params, self.model_state, graph)
        energy = float(out["energy"][0])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = np.asarray(out["forces"], np.float64)[:n_atoms]
        if with_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(
                np.asarray(out["stress"][0], np.float64))
