"""The weighted Clebsch-Gordan tensor product of SEGNN, as framework-neutral functions.

The product of a feature ``x1`` (irreps ``in1``) with an attribute ``x2`` (irreps ``in2``) is fully
connected (mode ``uvw``): every allowed path ``(ir1, ir2) -> ir_out`` has its own weight block
``W[u, v, w]`` of shape ``[mul1, mul2, mul_out]``, and

    out_w = sum over paths and u, v of  sqrt(2 l_out + 1) W[u, v, w] CG(x1_u, x2_v)

with the unit-Frobenius-norm Clebsch-Gordan coefficients of e3nn ("component" normalisation). With
the reference initialisation ``W ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, fan_in the sum of
``mul1 * mul2`` over the paths into an output block, this is the function family and initial scale
of the SEGNN reference implementation.

Everything here is pure JAX and takes the weights as arguments; :mod:`segnn_jax.layers` wraps it in
Haiku modules. The product is computed in two stages:

1. :func:`mix_channels`: contract the weights with ``x1`` over the input channels ``u`` (one matrix
   multiply per input irrep, all paths of that irrep at once);
2. :func:`couple`: contract with ``x2`` and the Clebsch-Gordan block, never building the dense CG
   tensor of the whole product.

Stage 1 is linear in ``x1``. When ``x1`` is a concatenation of gathered node features (a message
``[f_i, f_j, e_ij]``), :func:`tensor_product` runs stage 1 on the nodes before gathering, which
replaces a matrix multiply per edge by one per node. This is :func:`tensor_product`'s only
implementation, so a faster kernel can replace it in one place.

Shape letters: ``...`` leading (batch) axes, u/v/w channels of in1/in2/out, i/j/k components.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Path",
    "Segment",
    "TensorProductSpec",
    "couple",
    "fan_in",
    "make_spec",
    "mix_channels",
    "tensor_product",
    "tensor_product_paths",
]


class Path(NamedTuple):
    """One path ``in1[i1] x in2[i2] -> out[i_out]`` (indices into the irreps lists)."""

    i1: int
    i2: int
    i_out: int


def tensor_product_paths(irreps_in1, irreps_in2, irreps_out) -> Tuple[Path, ...]:
    """All paths allowed by the selection rules (|l1 - l2| <= l <= l1 + l2, parity p1 p2)."""
    irreps_in1, irreps_in2, irreps_out = map(e3nn.Irreps, (irreps_in1, irreps_in2, irreps_out))
    return tuple(
        Path(i1, i2, i_out)
        for i1, (mul1, ir1) in enumerate(irreps_in1)
        for i2, (mul2, ir2) in enumerate(irreps_in2)
        for i_out, (mul_out, ir_out) in enumerate(irreps_out)
        if mul1 * mul2 * mul_out > 0 and ir_out in ir1 * ir2
    )


class TensorProductSpec(NamedTuple):
    """Static description of one weighted tensor product.

    ``irreps_in1`` is regrouped (each irrep once) and ``segments`` lists the irreps of the parts
    that ``x1`` may arrive in (e.g. receiver features, sender features, edge scalars); the channels
    of an input irrep are those of the segments in order.
    """

    segments: Tuple[e3nn.Irreps, ...]
    irreps_in1: e3nn.Irreps
    irreps_in2: Optional[e3nn.Irreps]
    irreps_out: e3nn.Irreps
    paths: Tuple[Path, ...]

    @property
    def weight_shapes(self) -> Tuple[Tuple[int, int, int], ...]:
        """``[mul1, mul2, mul_out]`` of each path's weight block."""
        return tuple(
            (self.irreps_in1[p.i1].mul, self._in2[p.i2].mul, self.irreps_out[p.i_out].mul)
            for p in self.paths
        )

    @property
    def _in2(self) -> e3nn.Irreps:
        return self.irreps_in2 if self.irreps_in2 is not None else e3nn.Irreps("0e")

    def path_name(self, index: int) -> str:
        p = self.paths[index]
        return (f"w[{p.i1},{p.i2},{p.i_out}] {self.irreps_in1[p.i1]},"
                f"{self._in2[p.i2]},{self.irreps_out[p.i_out]}")


@functools.lru_cache(maxsize=None)
def _make_spec_cached(segments, irreps_in2, irreps_out) -> TensorProductSpec:
    segments = tuple(e3nn.Irreps(s) for s in segments)
    irreps_in1 = e3nn.Irreps(sum(segments, e3nn.Irreps(""))).regroup()
    irreps_out = e3nn.Irreps(irreps_out).simplify()
    in2 = e3nn.Irreps(irreps_in2).simplify() if irreps_in2 is not None else None
    paths = tensor_product_paths(irreps_in1, in2 if in2 is not None else "0e", irreps_out)
    unreachable = [ir for mul, ir in irreps_out
                   if not any(irreps_out[p.i_out].ir == ir for p in paths)]
    if unreachable:
        raise ValueError(
            f"output irreps {unreachable} cannot be reached from {irreps_in1} x "
            f"{in2 if in2 is not None else '1x0e'}: no allowed path")
    return TensorProductSpec(segments, irreps_in1, in2, irreps_out, paths)


def make_spec(segments, irreps_in2, irreps_out) -> TensorProductSpec:
    """Builds the spec of ``concat(segments) x irreps_in2 -> irreps_out``.

    Args:
        segments: irreps of the parts of ``x1`` (one irreps, or a sequence of them).
        irreps_in2: irreps of ``x2``, or None for the constant ``1x0e`` (an equivariant linear map).
        irreps_out: output irreps.

    Raises:
        ValueError: an output irrep has no path from the inputs.
    """
    if isinstance(segments, (str, e3nn.Irreps)):
        segments = (segments,)
    key = tuple(str(e3nn.Irreps(s)) for s in segments)
    in2 = None if irreps_in2 is None else str(e3nn.Irreps(irreps_in2))
    return _make_spec_cached(key, in2, str(e3nn.Irreps(irreps_out)))


def fan_in(spec: TensorProductSpec) -> Tuple[int, ...]:
    """For each path, the sum of ``mul1 * mul2`` over all paths into the same output block."""
    per_output = [0] * len(spec.irreps_out)
    for (mul1, mul2, _), p in zip(spec.weight_shapes, spec.paths):
        per_output[p.i_out] += mul1 * mul2
    return tuple(per_output[p.i_out] for p in spec.paths)


Segment = Union[e3nn.IrrepsArray, Tuple[e3nn.IrrepsArray, Optional[jnp.ndarray]]]
"""A part of ``x1``: an IrrepsArray, or ``(array, index)`` meaning ``array[index]`` (a gather)."""


def _segment_channel_offsets(spec: TensorProductSpec) -> list:
    """For each segment, a dict ir -> (start, stop) of its channels within ``irreps_in1``."""
    filled = {ir: 0 for _, ir in spec.irreps_in1}
    offsets = []
    for seg in spec.segments:
        ranges = {}
        for mul, ir in seg.regroup():
            ranges[ir] = (filled[ir], filled[ir] + mul)
            filled[ir] += mul
        offsets.append(ranges)
    return offsets


def mix_channels(
    spec: TensorProductSpec,
    weights: Sequence[jnp.ndarray],
    segment: e3nn.IrrepsArray,
    segment_index: int,
) -> list:
    """Stage 1: contracts one segment of ``x1`` with the weights over its input channels.

    Args:
        spec: the tensor product.
        weights: one ``[mul1, mul2, mul_out]`` array per path of ``spec``.
        segment: ``[..., dim]`` with irreps ``spec.segments[segment_index]``.
        segment_index: which segment this is.

    Returns:
        For each path, None if the segment does not feed it, else ``[..., mul2, mul_out, 2 l1 + 1]``.
    """
    segment = e3nn.IrrepsArray(segment.irreps, segment.array).regroup()  # dense: no zero flags
    ranges = _segment_channel_offsets(spec)[segment_index]
    mixed: list = [None] * len(spec.paths)
    for (mul, ir), chunk in zip(segment.irreps, segment.chunks):
        if mul == 0:
            continue
        start, stop = ranges[ir]
        ids = [n for n, p in enumerate(spec.paths) if spec.irreps_in1[p.i1].ir == ir]
        if not ids:
            continue
        # One matrix multiply for every path that starts from this irrep.
        blocks = [weights[n][start:stop].reshape(mul, -1) for n in ids]
        mixed_all = jnp.einsum("...ui,uk->...ki", chunk, jnp.concatenate(blocks, axis=1))
        sizes = np.cumsum([b.shape[1] for b in blocks])[:-1]
        for n, part in zip(ids, jnp.split(mixed_all, sizes, axis=-2)):
            mul2, mul_out = weights[n].shape[1:]
            mixed[n] = part.reshape(part.shape[:-2] + (mul2, mul_out, ir.dim))
    return mixed


def couple(
    spec: TensorProductSpec,
    mixed: Sequence[Optional[jnp.ndarray]],
    x2: Optional[e3nn.IrrepsArray],
) -> e3nn.IrrepsArray:
    """Stage 2: couples the mixed channels with ``x2`` through the Clebsch-Gordan blocks.

    Args:
        spec: the tensor product.
        mixed: per path ``[..., mul2, mul_out, 2 l1 + 1]`` (or None), as from :func:`mix_channels`.
        x2: ``[..., in2.dim]``, or None for the constant ``1x0e``.

    Returns:
        ``[..., out.dim]`` with irreps ``spec.irreps_out``.
    """
    leading = next(m.shape[:-3] for m in mixed if m is not None)
    dtype = next(m.dtype for m in mixed if m is not None)
    outputs: list = [None] * len(spec.irreps_out)
    x2_chunks = None
    if x2 is not None:
        x2 = e3nn.IrrepsArray(x2.irreps, x2.array).simplify()  # dense: no zero-flagged chunks
        if x2.irreps != spec.irreps_in2:
            raise ValueError(f"x2 has irreps {x2.irreps}, the tensor product expects {spec.irreps_in2}")
        x2_chunks = [jnp.broadcast_to(c, leading + c.shape[-2:]) for c in x2.chunks]
    for path, m in zip(spec.paths, mixed):
        if m is None:
            continue
        ir_out = spec.irreps_out[path.i_out].ir
        if x2_chunks is None:
            out = m[..., 0, :, :]  # 0e coupling is the identity in "component" normalisation
        else:
            ir1 = spec.irreps_in1[path.i1].ir
            ir2 = spec.irreps_in2[path.i2].ir
            cg = jnp.asarray(
                np.sqrt(ir_out.dim) * e3nn.clebsch_gordan(ir1.l, ir2.l, ir_out.l), dtype=dtype)
            # Attribute and CG first (small), then one batched matmul over (v, i).
            coupling = jnp.einsum("...vj,ijk->...vik", x2_chunks[path.i2], cg)
            out = jnp.einsum("...vwi,...vik->...wk", m, coupling)
        outputs[path.i_out] = out if outputs[path.i_out] is None else outputs[path.i_out] + out
    chunks = [
        o if o is not None else jnp.zeros(leading + (mul, ir.dim), dtype)
        for o, (mul, ir) in zip(outputs, spec.irreps_out)
    ]
    return e3nn.from_chunks(spec.irreps_out, chunks, leading, dtype)


def tensor_product(
    spec: TensorProductSpec,
    weights: Sequence[jnp.ndarray],
    x1: Sequence[Segment],
    x2: Optional[e3nn.IrrepsArray],
) -> e3nn.IrrepsArray:
    """``concat(x1) x x2 -> out`` with the given weights (no bias).

    Args:
        spec: from :func:`make_spec`.
        weights: one ``[mul1, mul2, mul_out]`` array per path.
        x1: the segments of ``x1``; a segment given as ``(array, index)`` is ``array[index]``, and is
            mixed before it is gathered (cheaper when ``array`` has fewer rows than ``index``).
        x2: ``[..., in2.dim]`` or None.

    Returns:
        ``[..., out.dim]`` with irreps ``spec.irreps_out``.
    """
    if len(x1) != len(spec.segments):
        raise ValueError(f"expected {len(spec.segments)} input segments, got {len(x1)}")
    total: list = [None] * len(spec.paths)
    for s, (seg, irreps) in enumerate(zip(x1, spec.segments)):
        array, index = seg if isinstance(seg, tuple) else (seg, None)
        if not isinstance(array, e3nn.IrrepsArray):
            raise TypeError(f"segment {s} must be an e3nn.IrrepsArray, got {type(array).__name__}")
        if array.irreps.regroup() != irreps.regroup():
            raise ValueError(f"segment {s} has irreps {array.irreps}, expected {irreps}")
        mixed = mix_channels(spec, weights, array, s)
        if index is not None:
            mixed = [None if m is None else m[index] for m in mixed]
        total = [m if t is None else (t if m is None else t + m) for t, m in zip(total, mixed)]
    return couple(spec, total, x2)


def init_bound(spec: TensorProductSpec, weight_init: str) -> Tuple[float, ...]:
    """Half-width of the uniform initialisation of each path's weights.

    ``"reference"``: ``1 / sqrt(fan_in)`` as the SEGNN reference (torch ``Linear``-like; outputs
    start with second moment 1/3 for unit inputs). ``"unit"``: ``sqrt(3 / fan_in)``, so that outputs
    start with second moment 1.
    """
    if weight_init == "reference":
        return tuple(1.0 / np.sqrt(f) for f in fan_in(spec))
    if weight_init == "unit":
        return tuple(np.sqrt(3.0 / f) for f in fan_in(spec))
    raise ValueError(f"weight_init must be 'reference' or 'unit', got {weight_init!r}")


def init_weights(key: jax.Array, spec: TensorProductSpec, weight_init: str = "reference",
                 dtype=jnp.float32) -> list:
    """Draws the weights of every path (a pure-JAX alternative to the Haiku module)."""
    keys = jax.random.split(key, len(spec.paths))
    return [
        jax.random.uniform(k, shape, dtype, -bound, bound)
        for k, shape, bound in zip(keys, spec.weight_shapes, init_bound(spec, weight_init))
    ]
