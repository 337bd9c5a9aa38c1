"""Message tensor products in the edge frame: per order m, one dense matrix multiply.

A message of SEGNN is a weighted Clebsch-Gordan product of the edge's inputs with
``a_ij = Y(r_ij / |r_ij|)``, the spherical harmonics of the edge direction. Rotate the inputs by a
rotation ``R_ij`` that takes the direction to the pole ``y`` of e3nn's harmonics. There ``Y(y)`` has
only its ``m = 0`` components, ``c_l`` for each order ``l``, and a Clebsch-Gordan coefficient
``<l1 m1, l2 0 | l3 m3>`` is zero unless ``|m1| = |m3|``. So the whole weighted product becomes,
for each ``|m|``, matrices ``A_m`` (paths with ``l1 + l2 + l3`` even, ``m -> m``) and ``B_m``
(odd paths, ``m -> -m``):

    out_{+m} = x_{+m} A_m - x_{-m} B_m        out_{-m} = x_{-m} A_m + x_{+m} B_m

where ``x_{+m}`` holds the order ``+m`` component of every input channel of order ``l >= |m|``.
``A_m`` and ``B_m`` are the path weights times fixed coefficients ``c_l2 <l1 m, l2 0 | l3 +-m>``,
assembled once per call from the weights: every attribute order folds into them at no cost per
edge, where the coupling of the other contraction orders runs once per attribute order and edge.
The gate acts channel by channel, so it commutes with the rotation: both gated products of a
message run in the frame, and only their result is rotated back, by ``R_ij^T``.

The result is the same function of the same parameters as :func:`segnn_jax.tensor_product
.tensor_product` (to float rounding), whatever rotation about the pole is chosen (the products
commute with those rotations). It holds only for attributes that are spherical harmonics of a unit
vector (:func:`segnn_jax.attributes.edge_attributes`): :func:`make_frame` checks every real edge,
and the messages of an edge whose attributes are not are NaN, so that a wrong answer cannot pass
unnoticed; padding edges are exempt. A real edge of zero length (coincident atoms) has no
direction and the attribute ``(c_0, 0, ..., 0)``: in the frame it carries no message (the plain
product gives it ``f(x, (c_0, 0, ...))``), which keeps values and gradients finite and the network
equivariant; it is the one input on which the two differ.

Shape letters: E edges, C channels, K sample directions.
"""

from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

from segnn_jax import tensor_product as tp
from segnn_jax.attributes import safe_norm
from segnn_jax.irreps import gate_irreps

__all__ = ["EdgeFrame", "FrameArray", "from_frame", "gate", "make_frame", "product", "to_frame",
           "add_scalar_biases"]

_POLE = np.array([0.0, 1.0, 0.0])  # e3nn's harmonics of the y axis have only m = 0 components


class EdgeFrame(NamedTuple):
    """What the products in the frame need, computed once per forward pass.

    Attributes:
        wigner: ``{l: [E, 2l+1, 2l+1]}``, the matrices ``D_l(R_ij)`` for ``l >= 2`` (``l = 1``
            is ``rotations`` itself, ``l = 0`` is 1).
        rotations: ``[E, 3, 3]``, ``R_ij`` with ``R_ij r_ij / |r_ij| = y``.
        poles: ``[lmax_attr + 1]``, ``c_l``: the attribute in the frame, shared by the real edges
            (their median).
        valid: ``[E]``, False for a real edge whose attribute is neither ``Y`` of a unit vector
            nor that of a zero-length edge.
        directed: ``[E]``, False for a real edge of zero length (attribute ``(c_0, 0, ...)``).
        attribute_irreps: irreps of the edge attributes.
    """

    wigner: Dict[int, jnp.ndarray]
    rotations: jnp.ndarray
    poles: jnp.ndarray
    valid: jnp.ndarray
    directed: jnp.ndarray
    attribute_irreps: e3nn.Irreps

    def matrix(self, l: int) -> jnp.ndarray:
        if l == 1:
            return self.rotations  # e3nn's l = 1 harmonics are (x, y, z)
        return self.wigner[l]


class FrameArray(NamedTuple):
    """Features in the edge frame: for each order ``m`` (0, 1, -1, 2, -2, ...), ``[E, C_m]`` with
    the order-``m`` component of every channel of every irrep with ``l >= |m|``, irreps in the
    order of ``irreps`` and channels in the order of ``segments``.

    Attributes:
        segments: irreps of the parts the features came in (the tensor product's ``x1``
            segments), which fix the order of the channels of each irrep.
        irreps: the parts' irreps regrouped (each irrep once).
        parts: ``{m: [E, C_m]}``.
    """

    segments: Tuple[e3nn.Irreps, ...]
    irreps: e3nn.Irreps
    parts: Dict[int, jnp.ndarray]


def _check_attribute_irreps(irreps: e3nn.Irreps) -> int:
    lmax = irreps.lmax
    if lmax < 1 or irreps != e3nn.Irreps.spherical_harmonics(lmax):
        raise ValueError(f"the edge frame needs edge attributes that are spherical harmonics "
                         f"1x0e+1x1o+... up to some lmax >= 1, got {irreps}")
    return lmax


@functools.lru_cache(maxsize=None)
def _sampling(lmax: int) -> Tuple[np.ndarray, Dict[int, np.ndarray]]:
    """Directions ``V [K, 3]`` and, for ``2 <= l <= lmax``, ``pinv(Y_l(V)) [2l+1, K]``:
    ``D_l(R)^T = pinv(Y_l(V)) Y_l(R V)``, since ``Y_l(R v) = D_l(R) Y_l(v)``."""
    count = 2 * lmax + 3
    index = np.arange(count) + 0.5  # a Fibonacci sphere: well spread, deterministic
    z = 1.0 - 2.0 * index / count
    phi = np.pi * (1.0 + 5.0**0.5) * index
    directions = np.stack([np.sqrt(1 - z**2) * np.cos(phi), z, np.sqrt(1 - z**2) * np.sin(phi)], 1)
    with jax.ensure_compile_time_eval():  # a constant, also when first asked for under jit
        harmonics = np.asarray(e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(lmax), directions, normalize=True,
            normalization="component").array, np.float64)
    inverses = {}
    for l in range(2, lmax + 1):
        block = harmonics[:, l * l:(l + 1) ** 2]
        if np.linalg.cond(block) > 1e3:
            # A guard for orders beyond those in use (l <= 3 is well conditioned).
            raise AssertionError(f"sample directions do not determine D_{l}")
        inverses[l] = np.linalg.pinv(block)
    return directions, inverses


def _rotations_to_pole(directions: jnp.ndarray) -> jnp.ndarray:
    """``[E, 3] -> [E, 3, 3]``: rotations taking each (nonzero) direction to ``y``.

    The rows are ``(e1, n, e1 x n)`` with ``e1`` perpendicular to ``n``, built from ``z`` or, when
    ``n`` is close to ``z``, from ``x``. Which rotation about ``y`` this picks does not matter
    (the products commute with those), so the switch between the two is harmless, also for the
    gradient. A zero vector is taken as pointing along ``y``.
    """
    norm = safe_norm(directions, keepdims=True)
    nonzero = norm > 0
    n = jnp.where(nonzero, directions / jnp.where(nonzero, norm, 1.0),
                  _POLE.astype(directions.dtype))
    helper = jnp.where(jnp.abs(n[:, 2:3]) < 0.9, jnp.array([0.0, 0.0, 1.0], n.dtype),
                       jnp.array([1.0, 0.0, 0.0], n.dtype))
    e1 = jnp.cross(helper, n)  # |e1| >= 0.43: the helper is never close to n
    e1 = e1 / safe_norm(e1, keepdims=True)
    return jnp.stack([e1, n, jnp.cross(e1, n)], axis=-2)


@jax.named_scope("make_frame")  # its operations carry the name in profiles
def make_frame(edge_attr: e3nn.IrrepsArray, edge_mask: jnp.ndarray, lmax: int) -> EdgeFrame:
    """The edge frame of every edge, from its attribute ``Y(r_ij / |r_ij|)``.

    Args:
        edge_attr: ``[E, sh]`` spherical harmonics ``0e + 1o + ...`` of the edge directions, any
            normalisation (``"integral"``, ``"component"``, ``"norm"``).
        edge_mask: ``[E]``, False for padding edges.
        lmax: the highest order of the features to rotate.

    Raises:
        ValueError: attributes that are not spherical harmonics.
    """
    lmax_attr = _check_attribute_irreps(edge_attr.irreps)
    # At least float32: half-precision attributes would make the rotations as coarse.
    dtype = jnp.promote_types(edge_attr.dtype, jnp.float32)
    chunks = [chunk[:, 0, :].astype(dtype) for chunk in edge_attr.chunks]  # [E, 2l+1] per order
    rotations = _rotations_to_pole(chunks[1])
    top = max(lmax, lmax_attr)
    directions, inverses = _sampling(top)
    wigner = {}
    if top >= 2:
        rotated = jnp.einsum("eab,kb->eka", rotations, jnp.asarray(directions, dtype))
        harmonics = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(top), rotated,
                                             normalize=False, normalization="component").array
        for l, inverse in inverses.items():
            transposed = jnp.einsum("dk,ekf->edf", jnp.asarray(inverse, dtype),
                                    harmonics[..., l * l:(l + 1) ** 2])
            wigner[l] = jnp.swapaxes(transposed, -1, -2)
    frame = EdgeFrame(wigner, rotations, jnp.zeros((lmax_attr + 1,), dtype),
                      jnp.ones(edge_mask.shape, bool), jnp.ones(edge_mask.shape, bool),
                      edge_attr.irreps)
    tolerance = max(1e-4, 100 * float(jnp.finfo(edge_attr.dtype).eps))
    # A zero-length edge (coincident atoms) has the attribute (c_0, 0, ...): no direction.
    scale = 1.0 + jnp.abs(chunks[0][:, 0])
    degenerate = edge_mask & jnp.all(jnp.stack(
        [jnp.max(jnp.abs(chunk), axis=-1) <= tolerance * scale for chunk in chunks[1:]]), axis=0)
    # The attribute in the frame: c_l on the pole component, zero elsewhere, on every real edge.
    in_frame = [chunks[0]] + [
        jnp.stack(_rotate(frame, l, _components(chunk[:, None, :])), axis=-1)[:, 0, :]
        for l, chunk in enumerate(chunks) if l > 0]
    directed = edge_mask & ~degenerate
    poles = jnp.stack([_masked_median(a[:, l], directed) for l, a in enumerate(in_frame)])
    error = jnp.stack([jnp.max(jnp.abs(a - poles[l] * jax.nn.one_hot(l, 2 * l + 1, dtype=dtype)),
                               axis=-1) for l, a in enumerate(in_frame)], axis=-1)
    valid = jnp.all(error <= tolerance * (1.0 + jnp.abs(poles)), axis=-1) | ~directed
    return frame._replace(poles=jax.lax.stop_gradient(poles), valid=valid, directed=~degenerate)


def _masked_median(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """The (lower) median of ``values`` where ``mask``, 0 if none: a few invalid edges do not
    move it. Padding sorts last as +inf, not NaN, which ``jax.debug_nans`` flags."""
    count = jnp.sum(mask)
    ordered = jnp.sort(jnp.where(mask, values, jnp.inf))
    median = ordered[jnp.maximum(count - 1, 0) // 2]
    return jnp.where(count > 0, median, 0.0).astype(values.dtype)


def _pieces(x: jnp.ndarray, widths: Sequence[int], axis: int = -1) -> list:
    """``x`` cut along ``axis`` into pieces of these widths by one split: the transpose of a split
    is one concatenate, that of each slice a pad to the full width and a sum of them all."""
    if len(widths) == 1:
        return [x]
    return jnp.split(x, np.cumsum(widths)[:-1], axis=axis)


def _components(chunk: jnp.ndarray) -> list:
    """``[E, C, 2l+1] ->`` its ``2l+1`` components ``[E, C]``."""
    return [piece[..., 0] for piece in _pieces(chunk, [1] * chunk.shape[-1])]


def _rotate(frame: EdgeFrame, l: int, components: Sequence[jnp.ndarray], inverse: bool = False
            ) -> list:
    """The components of ``D_l x`` (or ``D_l^T x``) from those of ``x`` (each ``[E, C]``)."""
    if l == 0:
        return list(components)
    return _rotate_by(frame.matrix(l), components, inverse)


def _rotate_by(d: jnp.ndarray, components: Sequence[jnp.ndarray], inverse: bool = False) -> list:
    """:func:`_rotate` by the matrices ``d [E, 2l+1, 2l+1]``, unrolled: batched 3x3 and 5x5
    matrix multiplies are slow on CPU, this fuses elementwise."""
    size = d.shape[-1]
    return [sum((d[:, j, i, None] if inverse else d[:, i, j, None]) * components[j]
                for j in range(size)) for i in range(size)]


def _orders(lmax: int) -> Tuple[int, ...]:
    return (0,) + tuple(s * m for m in range(1, lmax + 1) for s in (1, -1))


@jax.named_scope("to_frame")
def to_frame(frame: EdgeFrame, segments: Sequence[tp.Segment]) -> FrameArray:
    """Rotates the product's input ``x1`` (segments as for :func:`segnn_jax.tensor_product
    .tensor_product`, gathered ones gathered here) into the edge frame."""
    arrays, indices, regrouped, segment_irreps = [], [], [], []
    for segment in segments:
        array, index = segment if isinstance(segment, tuple) else (segment, None)
        array = e3nn.IrrepsArray(array.irreps, array.array).regroup()
        regrouped.append(array.irreps)
        irreps = e3nn.Irreps([(mul, ir) for mul, ir in array.irreps if mul > 0])
        if irreps.dim == 0:
            continue
        # Reordered where it is cheap, before the gather: on the nodes for gathered segments.
        arrays.append(_component_major(array.array, irreps))
        indices.append(index)
        segment_irreps.append(irreps)
    irreps = e3nn.Irreps(sum(segment_irreps, e3nn.Irreps(""))).regroup()
    layout = _Layout(tuple(segment_irreps), irreps, tuple(a.shape[0] for a in arrays))
    matrices = tuple(frame.matrix(l) for l in range(1, irreps.lmax + 1))
    parts = _rotated_in(layout, matrices, arrays, indices)
    return FrameArray(tuple(regrouped), irreps, dict(zip(_orders(irreps.lmax), parts)))


class _Layout(NamedTuple):
    """What :func:`_rotated_in` needs besides arrays: each segment's irreps (regrouped, no zero
    multiplicities), all of them regrouped, and each segment's rows (nodes if gathered)."""

    segments: Tuple[e3nn.Irreps, ...]
    irreps: e3nn.Irreps
    rows: Tuple[int, ...]


def _component_major(array: jnp.ndarray, irreps: e3nn.Irreps) -> jnp.ndarray:
    """``[R, irreps.dim]`` in e3nn's layout (``[mul, 2l+1]`` per irrep) to the layout with
    ``[2l+1, mul]`` per irrep: each component of an irrep then is a contiguous block of columns."""
    blocks, start = [], 0
    for mul, ir in irreps:
        chunk = array[:, start:start + mul * ir.dim].reshape(-1, mul, ir.dim)
        blocks.append(jnp.swapaxes(chunk, -1, -2).reshape(-1, mul * ir.dim))
        start += mul * ir.dim
    return jnp.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]


def _gathered_blocks(layout: _Layout, arrays, indices) -> list:
    """Per segment ``{ir: [E, 2l+1, mul]}``: its component-major array gathered to the edges."""
    out = []
    for irreps, array, index in zip(layout.segments, arrays, indices):
        array = array if index is None else array[index]
        pieces = _pieces(array, [mul * ir.dim for mul, ir in irreps])
        out.append({ir: piece.reshape(-1, ir.dim, mul) for (mul, ir), piece in zip(irreps, pieces)})
    return out


def _channel_order(layout: _Layout) -> list:
    """``(segment, irrep, mul)`` in the order their channels take in every part: irreps in the
    order of ``layout.irreps``, segments in their order within each."""
    return [(s, ir, mul) for _, ir in layout.irreps for s, segment in enumerate(layout.segments)
            for mul, ir_s in segment if ir_s == ir]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rotated_in(layout: _Layout, matrices, arrays, indices) -> tuple:
    """The parts of :func:`to_frame`, one per order ``m``, from component-major arrays.

    Each ``D_l x`` is one broadcast product summed over the components, about 1.4x faster here
    than the unrolled sums of :func:`_rotate`; the transpose JAX derives for it is 1.7x slower
    than the unrolled one, hence the explicit backward pass (:func:`_rotated_in_bwd`)."""
    return _rotated_in_fwd(layout, matrices, arrays, indices)[0]


def _rotated_in_fwd(layout: _Layout, matrices, arrays, indices):
    blocks = _gathered_blocks(layout, arrays, indices)
    pieces: Dict[int, list] = {m: [] for m in _orders(layout.irreps.lmax)}
    for s, ir, _ in _channel_order(layout):
        x = blocks[s][ir]
        if ir.l > 0:  # [E, 1, 2l+1, mul] times [E, 2l+1, 2l+1, 1], summed over the components
            x = jnp.sum(matrices[ir.l - 1][:, :, :, None] * x[:, None, :, :], axis=2)
        for m in _orders(ir.l):
            pieces[m].append(x[:, ir.l + m, :])
    parts = tuple(jnp.concatenate(p, axis=-1) if len(p) > 1 else p[0] for p in pieces.values())
    return parts, (matrices, blocks, indices)


def _rotated_in_bwd(layout: _Layout, residuals, cotangents):
    """``D_l^T`` of the cotangents, unrolled (:func:`_rotate_by`), summed to the nodes for
    gathered segments. The matrices' cotangent ``sum_c g_i x_j`` is dead code, which XLA
    removes, unless the positions are differentiated."""
    matrices, blocks, indices = residuals
    order = _channel_order(layout)
    cut = {m: _pieces(part, [mul for _, ir, mul in order if ir.l >= abs(m)])
           for m, part in zip(_orders(layout.irreps.lmax), cotangents)}
    taken = {m: 0 for m in cut}
    per_segment: list = [{} for _ in layout.segments]  # {ir: cotangent per component}
    for s, ir, _ in order:
        per_segment[s][ir] = [cut[m][taken[m]] for m in range(-ir.l, ir.l + 1)]
        for m in range(-ir.l, ir.l + 1):
            taken[m] += 1
    d_matrices = [jnp.zeros_like(d) for d in matrices]
    d_arrays = []
    for s, (segment, index) in enumerate(zip(layout.segments, indices)):
        columns = []  # component-major, as the input array
        for _, ir in segment:
            g = per_segment[s][ir]
            if ir.l == 0:
                columns.extend(g)
                continue
            d, x = matrices[ir.l - 1], blocks[s][ir]
            columns.extend(_rotate_by(d, g, inverse=True))
            d_matrices[ir.l - 1] = d_matrices[ir.l - 1] + jnp.stack([
                jnp.stack([jnp.sum(g[i] * x[:, j, :], axis=-1) for j in range(ir.dim)], axis=-1)
                for i in range(ir.dim)], axis=-2).astype(d.dtype)
        d_array = jnp.concatenate(columns, axis=-1) if len(columns) > 1 else columns[0]
        if index is not None:
            d_array = jax.ops.segment_sum(d_array, index, layout.rows[s])
        d_arrays.append(d_array.astype(blocks[s][segment[0].ir].dtype))
    d_indices = [None if index is None else np.zeros(index.shape, jax.dtypes.float0)
                 for index in indices]
    return tuple(d_matrices), d_arrays, d_indices


_rotated_in.defvjp(_rotated_in_fwd, _rotated_in_bwd)


def _split_parts(x: FrameArray) -> Dict[int, list]:
    """Each part of ``x`` cut (one split) into one piece per irrep with ``l >= |m|``."""
    return {m: _pieces(part, [mul for mul, ir in x.irreps if ir.l >= abs(m)])
            for m, part in x.parts.items()}


@jax.named_scope("from_frame")
def from_frame(frame: EdgeFrame, x: FrameArray) -> e3nn.IrrepsArray:
    """Rotates features back from the edge frame: ``[E, x.irreps.dim]``; zero on real edges of
    zero length, NaN on the edges that are not valid (see :func:`make_frame`)."""
    pieces = _split_parts(x)
    taken = {m: 0 for m in pieces}
    chunks = []
    for mul, ir in x.irreps:
        components = []
        for m in range(-ir.l, ir.l + 1):
            components.append(pieces[m][taken[m]])
            taken[m] += 1
        chunk = jnp.stack(_rotate(frame, ir.l, components, inverse=True), axis=-1)
        chunks.append(chunk.reshape(chunk.shape[0], mul * ir.dim))
    out = jnp.concatenate(chunks, axis=-1) if len(chunks) > 1 else chunks[0]
    out = out * frame.directed.astype(out.dtype)[:, None]  # zero-length edges: no message
    # NaN on the invalid edges as (out + inf) - inf: a NaN constant would be flagged by
    # jax.debug_nans even when every edge is valid.
    poison = jnp.where(frame.valid, 0.0, jnp.inf).astype(out.dtype)[:, None]
    return e3nn.IrrepsArray(x.irreps, (out + poison) - poison)


@functools.lru_cache(maxsize=None)
def _path_coefficients(l1: int, l2: int, l3: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` per order ``m = 0..min(l1, l3)``: ``sqrt(2 l3 + 1) <l1 m, l2 0 | l3 m>`` and
    ``sqrt(2 l3 + 1) <l1 m, l2 0 | l3 -m>`` in e3nn's real basis (the normalisation of
    :func:`segnn_jax.tensor_product.tensor_product`), for a unit pole component."""
    cg = np.sqrt(2 * l3 + 1) * np.asarray(e3nn.clebsch_gordan(l1, l2, l3), np.float64)[:, l2, :]
    orders = range(min(l1, l3) + 1)
    a = np.array([cg[l1 + m, l3 + m] for m in orders])
    b = np.array([cg[l1 + m, l3 - m] if m > 0 else 0.0 for m in orders])
    # What the formula above relies on (e3nn's real basis): checked, not assumed.
    for m in orders:
        if m > 0 and not (np.isclose(cg[l1 - m, l3 - m], a[m])
                          and np.isclose(cg[l1 - m, l3 + m], -b[m])):
            raise AssertionError(f"unexpected Clebsch-Gordan symmetry for {l1},{l2},{l3}")
    return a, b


def _matrices(spec: tp.TensorProductSpec, weights: Sequence[jnp.ndarray], poles: jnp.ndarray,
              m: int) -> Tuple[Optional[jnp.ndarray], Optional[jnp.ndarray]]:
    """``(A_m, B_m)`` (None where no path contributes), ``[C_m(in), C_m(out)]``."""
    rows = [(i1, mul, ir) for i1, (mul, ir) in enumerate(spec.irreps_in1) if ir.l >= m]
    cols = [(i_out, mul, ir) for i_out, (mul, ir) in enumerate(spec.irreps_out) if ir.l >= m]
    blocks = {"a": {}, "b": {}}
    for path, w in zip(spec.paths, weights):
        l1 = spec.irreps_in1[path.i1].ir.l
        l2 = spec.irreps_in2[path.i2].ir.l
        l3 = spec.irreps_out[path.i_out].ir.l
        if min(l1, l3) < m:
            continue
        a, b = _path_coefficients(l1, l2, l3)
        for kind, coefficient in (("a", a[m]), ("b", b[m])):
            if abs(coefficient) < 1e-12:
                continue
            term = (poles[l2] * coefficient).astype(w.dtype) * w[:, 0, :]
            key = (path.i1, path.i_out)
            blocks[kind][key] = term if key not in blocks[kind] else blocks[kind][key] + term
    out = []
    for kind in ("a", "b"):
        if not blocks[kind]:
            out.append(None)
            continue
        dtype = next(iter(blocks[kind].values())).dtype
        out.append(jnp.concatenate([
            jnp.concatenate([blocks[kind].get((i1, i_out), jnp.zeros((mul1, mul_out), dtype))
                             for i_out, mul_out, _ in cols], axis=1)
            for i1, mul1, _ in rows], axis=0))
    return out[0], out[1]


def product(spec: tp.TensorProductSpec, weights: Sequence[jnp.ndarray], x: FrameArray,
            frame: EdgeFrame, compute_dtype: Optional[str] = None) -> FrameArray:
    """:func:`segnn_jax.tensor_product.tensor_product` of ``x`` (in the frame) with the edge
    attributes, in the frame: ``spec`` must be that of ``x.segments x frame.attribute_irreps``.

    Raises:
        ValueError: a spec for other inputs or other attribute irreps.
    """
    if (tuple(s.regroup() for s in spec.segments) != tuple(s.regroup() for s in x.segments)
            or spec.irreps_in2 != frame.attribute_irreps):
        raise ValueError(f"spec for {spec.segments} x {spec.irreps_in2}, inputs "
                         f"{x.segments} x {frame.attribute_irreps}")
    parts = {}
    for m in _orders(spec.irreps_out.lmax):
        if m < 0:
            continue
        a, b = _matrices(spec, weights, frame.poles, m)
        out_plus = out_minus = None
        if a is not None:
            out_plus = _matmul(x.parts[m], a, compute_dtype)
            out_minus = _matmul(x.parts[-m], a, compute_dtype) if m else None
        if b is not None:  # never at m = 0, where <l1 0, l2 0 | l3 0> of odd paths vanish
            cross_plus, cross_minus = (-_matmul(x.parts[-m], b, compute_dtype),
                                       _matmul(x.parts[m], b, compute_dtype))
            out_plus = cross_plus if out_plus is None else out_plus + cross_plus
            out_minus = cross_minus if out_minus is None else out_minus + cross_minus
        if out_plus is None:  # no path reaches order m (only odd paths at m = 0, or no l >= m)
            width = sum(mul for mul, ir in spec.irreps_out if ir.l >= m)
            out_plus = out_minus = jnp.zeros((x.parts[0].shape[0], width), x.parts[0].dtype)
        parts[m] = out_plus
        if m:
            parts[-m] = out_minus
    return FrameArray((spec.irreps_out,), spec.irreps_out, parts)


def _matmul(x: jnp.ndarray, w: jnp.ndarray, compute_dtype: Optional[str]) -> jnp.ndarray:
    if compute_dtype is None:
        return x @ w
    return tp.mixed_matmul(x.astype(compute_dtype), w, compute_dtype)


def add_scalar_biases(x: FrameArray, bias: jnp.ndarray) -> FrameArray:
    """Biases on the ``0e`` channels (the first irrep, its channels first in the m = 0 part)."""
    if x.irreps[0].ir != e3nn.Irrep("0e") or x.irreps[0].mul != bias.shape[0]:
        raise ValueError(f"{bias.shape[0]} biases for the scalars of {x.irreps}")
    width = x.parts[0].shape[-1]
    padded = jnp.concatenate([bias.astype(x.parts[0].dtype),
                              jnp.zeros((width - bias.shape[0],), x.parts[0].dtype)])
    return x._replace(parts={**x.parts, 0: x.parts[0] + padded})


def gate(x: FrameArray, irreps_out) -> FrameArray:
    """:func:`segnn_jax.layers.gate` in the frame: SiLU on the scalars, each other irrep's
    channels times the sigmoid of their gates (which are invariant, ``m = 0``)."""
    irreps_out = e3nn.Irreps(irreps_out).regroup()
    if x.irreps != gate_irreps(irreps_out):
        raise ValueError(f"gate expects {gate_irreps(irreps_out)} for {irreps_out}, got {x.irreps}")
    n_scalars = sum(mul for mul, ir in irreps_out if ir == e3nn.Irrep("0e"))
    gated = e3nn.Irreps([(mul, ir) for mul, ir in irreps_out if ir != e3nn.Irrep("0e")])
    # The m = 0 part: scalars, gates, then the gated irreps' m = 0 components.
    scalars, gates, *zero_blocks = _pieces(
        x.parts[0], [n_scalars, gated.num_irreps] + [mul for mul, _ in gated])
    gates = _pieces(jax.nn.sigmoid(gates), [mul for mul, _ in gated])
    parts = {}
    for m, part in x.parts.items():
        blocks = zero_blocks if m == 0 else _pieces(
            part, [mul for mul, ir in gated if ir.l >= abs(m)])
        gate_of = [g for g, (_, ir) in zip(gates, gated) if ir.l >= abs(m)]
        out = [jax.nn.silu(scalars)] if m == 0 and n_scalars else []
        out += [block * g for block, g in zip(blocks, gate_of)]
        parts[m] = jnp.concatenate(out, axis=-1) if len(out) > 1 else out[0]
    irreps = (e3nn.Irreps(f"{n_scalars}x0e") + gated).simplify()
    return FrameArray((irreps,), irreps, parts)
