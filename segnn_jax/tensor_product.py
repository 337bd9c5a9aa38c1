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
Haiku modules. :func:`tensor_product` is the only implementation, so a faster kernel can replace it
in one place. It never builds the dense Clebsch-Gordan tensor of the whole product; per output irrep:

1. for every path into it, contract ``x2`` with the path's small CG block, then that with ``x1``
   over the few components of ``ir1`` (an unrolled, fused elementwise loop with a hand-written
   backward: tiny batched matrix multiplies and middle-axis reductions are slow on CPU);
2. concatenate the paths along the input channels and apply all their weights in ONE matrix
   multiply ``[..., 2l+1, sum of mul1 mul2] @ [sum of mul1 mul2, mul_out]``.

That is the default order, ``"couple_first"``. ``order="weights_first"`` computes the same
function the other way round (:func:`_weights_first`): weights per input irrep first, on the
nodes for gathered inputs, then the coupling; faster where edges far outnumber nodes.
``order="hybrid"`` (:func:`_hybrid`) runs weights-first where the product is differentiated and
couple-first where it is only evaluated; code that differentiates everything it traces (a training
step) can say so with :func:`differentiated_hybrid` and skip tracing the unused couple-first order.

Mixed precision (``compute_dtype="bfloat16"`` or ``"float16"``): the features, ``x2`` times its
Clebsch-Gordan block, the coupled products and the weights are stored in the low dtype (rounded
once each), in the backward pass too. The weight matrix multiply and its two backward products
read the low dtype and accumulate in the inputs' dtype (``preferred_element_type``), in which the
result is returned. The coupling's few-term sums compute in the inputs' dtype and round their
results: on a CPU without native low-precision arithmetic that is faster (XLA would convert
around every operation), on an accelerator the conversions fuse into the same kernel. The caller
keeps float32 parameters (master weights; their gradients are not rounded) and whatever follows
the product (biases, gates, sums over messages, norms, pooling, loss) in float32.

Shape letters: ``...`` leading (batch) axes, u/v/w channels of in1/in2/out, i/j/k components.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "COMPUTE_DTYPES",
    "ORDERS",
    "Path",
    "Segment",
    "TensorProductSpec",
    "check_compute_dtype",
    "check_order",
    "checked_segments",
    "differentiated_hybrid",
    "fan_in",
    "init_bound",
    "init_weights",
    "make_spec",
    "mixed_matmul",
    "split_chunks",
    "tensor_product",
    "tensor_product_paths",
    "tiled_rows",
]

COMPUTE_DTYPES = ("bfloat16", "float16")
ORDERS = ("couple_first", "weights_first", "hybrid")

_HYBRID_IS_DIFFERENTIATED = contextvars.ContextVar("segnn_hybrid_is_differentiated", default=False)


@contextlib.contextmanager
def differentiated_hybrid():
    """Within this context, ``order="hybrid"`` products are traced as plain weights-first ones.

    For code that differentiates every product it traces, such as a training step's loss: there
    JAX runs only the hybrid's forward rule, which is weights-first, but it still traces the
    couple-first primal of the ``jax.custom_vjp``, which doubled the tracing time of QM9's
    training step (2.9 s -> 6.2 s) for the same compiled program. The orders compute the same
    function (to float rounding), so a product that is only evaluated inside the context gives
    the same values, in the order that is slower for evaluation. Forward-mode differentiation
    (``jax.jvp``) of a hybrid product works inside the context.

    The setting is read while tracing; it follows the thread and the context of the code that
    traces (a ``contextvars.ContextVar``). ``jax.jit`` does not see it: a function jitted on its
    own keeps the trace it was first compiled with, inside the context or not (the same function
    either way). The training engine (:func:`segnn_jax.training.make_train_step`) traces its loss
    inside this context.
    """
    token = _HYBRID_IS_DIFFERENTIATED.set(True)
    try:
        yield
    finally:
        _HYBRID_IS_DIFFERENTIATED.reset(token)


def check_compute_dtype(compute_dtype) -> Optional[str]:
    """``compute_dtype`` as a name (None: compute in the inputs' dtype), or a ValueError naming it.

    >>> check_compute_dtype(jnp.bfloat16)
    'bfloat16'
    """
    name = compute_dtype
    if compute_dtype is not None and not isinstance(compute_dtype, str):
        try:
            name = jnp.dtype(compute_dtype).name
        except TypeError:
            name = None
    if compute_dtype is not None and name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None or one of {COMPUTE_DTYPES}, "
                         f"got {compute_dtype!r}")
    return name


def check_order(order: str) -> str:
    """``order`` if it names a contraction order of :func:`tensor_product`, else a ValueError."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


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


def _upcast(array: jnp.ndarray, dtype: Optional[str]) -> jnp.ndarray:
    return array if dtype is None else array.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _couple_components(a: jnp.ndarray, x: jnp.ndarray, arithmetic: Optional[str] = None
                       ) -> jnp.ndarray:
    """``z[..., v, k, u] = sum_i a[..., v, i, k] x[..., i, u]`` for the few components i.

    ``arithmetic``: a dtype to compute in (the inputs converted, the result rounded back to the
    dtype of ``x``), in the forward and backward passes; None: the inputs' dtype.
    """
    a, x, dtype = _upcast(a, arithmetic), _upcast(x, arithmetic), x.dtype
    return sum(a[..., :, i, :, None] * x[..., None, None, i, :] for i in range(x.shape[-2])
               ).astype(dtype)


def _couple_components_fwd(a, x, arithmetic):
    return _couple_components(a, x, arithmetic), (a, x)


def _couple_components_bwd(arithmetic, residuals, dz):
    a_in, x_in = residuals
    a, x, dz = (_upcast(t, arithmetic) for t in (a_in, x_in, dz))
    n_v, n_i, n_k = a.shape[-3:]
    dx = jnp.stack([
        sum(a[..., v, i, k, None] * dz[..., v, k, :] for v in range(n_v) for k in range(n_k))
        for i in range(n_i)
    ], axis=-2)
    da = jnp.einsum("...iu,...vku->...vik", x, dz)
    return da.astype(a_in.dtype), dx.astype(x_in.dtype)


_couple_components.defvjp(_couple_components_fwd, _couple_components_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x: jnp.ndarray, w: jnp.ndarray, compute_dtype: str) -> jnp.ndarray:
    """``x @ w`` for ``x [..., K]`` in ``compute_dtype`` and ``w [K, N]`` in the working dtype:
    ``w`` rounded to ``compute_dtype``, products accumulated and returned in ``w``'s dtype.

    The backward pass rounds the cotangent to ``compute_dtype`` so that its two matrix multiplies
    are low-precision ones with float32 accumulation too. The transposes JAX derives would mix a
    float32 operand with a low-precision one and return the low dtype, a slow path of XLA's CPU
    backend (with them the N-body training step took 1.45x the float32 time, with this 1.19x).
    The weight gradient is returned unrounded.
    """
    return jnp.matmul(x, w.astype(compute_dtype), preferred_element_type=w.dtype)


def _mixed_matmul_fwd(x, w, compute_dtype):
    w_low = w.astype(compute_dtype)
    return jnp.matmul(x, w_low, preferred_element_type=w.dtype), (x, w_low)


def _mixed_matmul_bwd(compute_dtype, residuals, dy):
    x, w_low = residuals
    dtype, dy = dy.dtype, dy.astype(compute_dtype)  # dtype: of the weights and output
    dx = jnp.matmul(dy, w_low.T, preferred_element_type=dtype).astype(x.dtype)
    rows = tuple(range(x.ndim - 1))
    dw = jnp.tensordot(x, dy, axes=(rows, rows), preferred_element_type=dtype)
    return dx, dw


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def checked_segments(spec: TensorProductSpec, x1: Sequence[Segment]
                     ) -> list[Tuple[e3nn.IrrepsArray, Optional[jnp.ndarray]]]:
    """``x1`` as ``(array, index or None)`` pairs, checked against ``spec.segments``.

    Raises:
        ValueError: a wrong number of segments or a segment with other irreps.
        TypeError: a segment that is not an IrrepsArray.
    """
    if len(x1) != len(spec.segments):
        raise ValueError(f"expected {len(spec.segments)} input segments, got {len(x1)}")
    out = []
    for s, (segment, irreps) in enumerate(zip(x1, spec.segments)):
        array, index = segment if isinstance(segment, tuple) else (segment, None)
        if not isinstance(array, e3nn.IrrepsArray):
            raise TypeError(f"segment {s} must be an e3nn.IrrepsArray, got {type(array).__name__}")
        if array.irreps.regroup() != irreps.regroup():
            raise ValueError(f"segment {s} has irreps {array.irreps}, expected {irreps}")
        out.append((array, index))
    return out


def split_chunks(x: e3nn.IrrepsArray) -> list:
    """``[..., mul, 2l+1]`` per irrep of ``x``: ``x.chunks`` for a dense array, but by one split.

    The transpose of a split is one concatenate; that of the slices ``x.chunks`` takes is a pad
    of every chunk's cotangent to the full width and a sum of them. Pads and sums were about 30%
    of the QM9 training step (``benchmarks/profile_ops.py``); splitting here, in the gate and in
    the biases made the step 1.07x faster (N-body 1.04x).
    """
    offsets = np.cumsum([mul * ir.dim for mul, ir in x.irreps])[:-1]
    pieces = jnp.split(x.array, offsets, axis=-1) if len(x.irreps) > 1 else [x.array]
    return [piece.reshape(piece.shape[:-1] + (mul, ir.dim))
            for piece, (mul, ir) in zip(pieces, x.irreps)]


def _segment_inputs(spec: TensorProductSpec, x1: Sequence[Segment], compute_dtype=None) -> list:
    """For each segment: ``(index or None, {ir: ([n.., 2l+1, mul], (start, stop))})``: its
    components-first chunks, not yet gathered, with the rows of the path weights (input channels)
    they correspond to, in ``compute_dtype`` if set (cast and transposed before any gather: fewer
    rows).

    Segments are kept apart rather than concatenated: concatenating inputs that many paths read
    makes XLA's backward pass slow on CPU, while concatenating the coupled products does not.
    """
    filled = {ir: 0 for _, ir in spec.irreps_in1}
    segments = []
    for array, index in checked_segments(spec, x1):
        array = e3nn.IrrepsArray(array.irreps, array.array).regroup()  # dense: no zero flags
        chunks = {}
        for (mul, ir), chunk in zip(array.irreps, split_chunks(array)):
            if mul == 0:
                continue
            chunk = jnp.swapaxes(chunk, -1, -2)
            if compute_dtype is not None:
                chunk = chunk.astype(compute_dtype)
            chunks[ir] = (chunk, (filled[ir], filled[ir] + mul))
            filled[ir] += mul
        segments.append((index, chunks))
    return segments


def _segment_chunks(spec: TensorProductSpec, x1: Sequence[Segment], compute_dtype=None) -> list:
    """:func:`_segment_inputs` with the gathers done: ``{ir: (chunk, (start, stop))}`` per
    segment."""
    return [{ir: (chunk if index is None else chunk[index], rows)
             for ir, (chunk, rows) in chunks.items()}
            for index, chunks in _segment_inputs(spec, x1, compute_dtype)]


def _attribute_chunks(spec: TensorProductSpec, x2: e3nn.IrrepsArray, leading: Tuple[int, ...],
                      dtype) -> list:
    """``[..., mul2, 2l2+1]`` per irrep of ``x2``, broadcast to the product's leading axes.

    Raises:
        ValueError: ``x2`` does not have the spec's irreps.
    """
    x2 = e3nn.IrrepsArray(x2.irreps, x2.array).simplify()  # dense: no zero-flagged chunks
    if x2.irreps != spec.irreps_in2:
        raise ValueError(f"x2 has irreps {x2.irreps}, the tensor product expects {spec.irreps_in2}")
    return [jnp.broadcast_to(c, leading + c.shape[-2:]).astype(dtype) for c in x2.chunks]


def _input_dtype(x1: Sequence[Segment]):
    """The dtype of the first segment's features (gathered segments are ``(array, index)``)."""
    return (x1[0][0] if isinstance(x1[0], tuple) else x1[0]).dtype


def tensor_product(
    spec: TensorProductSpec,
    weights: Sequence[jnp.ndarray],
    x1: Sequence[Segment],
    x2: Optional[e3nn.IrrepsArray],
    compute_dtype: Optional[str] = None,
    order: str = "couple_first",
) -> e3nn.IrrepsArray:
    """``concat(x1) x x2 -> out`` with the given weights (no bias).

    Args:
        spec: from :func:`make_spec`.
        weights: one ``[mul1, mul2, mul_out]`` array per path.
        x1: the segments of ``x1``; a segment given as ``(array, index)`` is ``array[index]``
            (e.g. node features gathered to the edges).
        x2: ``[..., in2.dim]``, or None for the constant ``1x0e`` (then the product is linear).
        compute_dtype: None (compute in the inputs' dtype), ``"bfloat16"`` or ``"float16"``:
            mixed precision as described in the module docstring.
        order: ``"couple_first"`` (Clebsch-Gordan coupling, then one weight matrix multiply per
            output irrep), ``"weights_first"`` (:func:`_weights_first`) or ``"hybrid"``
            (:func:`_hybrid`: couple-first when only evaluated, weights-first when
            differentiated): the same function, faster or slower depending on the shapes.

    Returns:
        ``[..., out.dim]`` with irreps ``spec.irreps_out``, in the dtype of ``x1`` promoted with
        the weights' (float32 weights make half-precision features give float32).
    """
    compute_dtype = check_compute_dtype(compute_dtype)
    order = check_order(order)
    if order == "hybrid" and _HYBRID_IS_DIFFERENTIATED.get():
        order = "weights_first"
    if order == "weights_first":
        return _weights_first(spec, weights, x1, x2, compute_dtype)
    if order == "hybrid":
        return _hybrid(spec, weights, x1, x2, compute_dtype)
    segments = _segment_chunks(spec, x1, compute_dtype)
    dtype = _input_dtype(x1)
    first = next(chunk for seg in segments for chunk, _ in seg.values())
    leading = first.shape[:-2]
    x2_chunks = None if x2 is None else _attribute_chunks(spec, x2, leading, dtype)
    outputs = []
    for i_out, (mul_out, ir_out) in enumerate(spec.irreps_out):
        coupled, blocks = [], []
        for path, w in zip(spec.paths, weights):
            if path.i_out != i_out:
                continue
            ir1 = spec.irreps_in1[path.i1].ir
            a = None
            if x2_chunks is not None:
                ir2 = spec.irreps_in2[path.i2].ir
                cg = np.sqrt(ir_out.dim) * e3nn.clebsch_gordan(ir1.l, ir2.l, ir_out.l)
                a = jnp.einsum("...vj,ijk->...vik", x2_chunks[path.i2], jnp.asarray(cg, dtype))
                a = a if compute_dtype is None else a.astype(compute_dtype)
            for seg in segments:
                if ir1 not in seg:
                    continue
                x, (start, stop) = seg[ir1]  # [..., i, u]
                if a is None:  # 0e coupling is the identity in "component" normalisation
                    coupled.append(x)
                    blocks.append(w[start:stop, 0, :])
                    continue
                z = _couple_components(a, x, None if compute_dtype is None else dtype.name)
                z = jnp.swapaxes(z, -3, -2)  # [..., k, v, u]
                coupled.append(z.reshape(z.shape[:-2] + (-1,)))
                blocks.append(jnp.swapaxes(w[start:stop], 0, 1).reshape(-1, mul_out))  # rows (v, u)
        if compute_dtype is not None:  # the long sum over input channels and paths: in float32
            out = mixed_matmul(jnp.concatenate(coupled, axis=-1), jnp.concatenate(blocks, axis=0),
                                compute_dtype)  # [..., k, w]
        else:
            out = jnp.concatenate(coupled, axis=-1) @ jnp.concatenate(blocks, axis=0)
        outputs.append(jnp.swapaxes(out, -1, -2))
    return e3nn.from_chunks(spec.irreps_out, outputs, leading, dtype)


def _weights_first(spec: TensorProductSpec, weights: Sequence[jnp.ndarray],
                   x1: Sequence[Segment], x2: Optional[e3nn.IrrepsArray],
                   compute_dtype: Optional[str]) -> e3nn.IrrepsArray:
    """:func:`tensor_product` with the weights applied before the coupling.

    Per input irrep, ONE matrix multiply applies the weights of all paths that read it (side by
    side, ``[mul1, sum over its paths of mul2 mul_out]``), on the rows the segment arrives with:
    a gathered segment ``(array, index)`` is mixed on the nodes and the result gathered, so the
    multiply runs on nodes rather than edges. Each path's columns are then coupled with ``x2``
    through the nonzero Clebsch-Gordan coefficients and summed into its output irrep; the wide
    concatenated coupled products of ``"couple_first"`` never exist. Pays most where edges far
    outnumber nodes or the orders are low (the N-body and OC20-like configurations); where the
    coupling of many output channels dominates (QM9's l <= 3) the forward is slower and only the
    training step gains (with scanned layers); see benchmarks/README.md.

    With ``compute_dtype`` the multiplies read the features and weights in that dtype and
    accumulate in float32; the coupling runs in float32.
    """
    dtype = _input_dtype(x1)
    segments = _segment_inputs(spec, x1, compute_dtype)
    index, first = next((index, chunk) for index, chunks in segments
                        for chunk, _ in chunks.values())  # [n.., 2l+1, mul]
    leading = first.shape[:-2] if index is None else index.shape + first.shape[1:-2]
    # Each attribute irrep cut once into its components ([..., mul2] each), shared by every path
    # that reads it: cut per path and per coefficient, the thousands of slices made tracing the
    # QM9 training step take seconds longer.
    y2 = None if x2 is None else [_components(y, axis=-1)
                                  for y in _attribute_chunks(spec, x2, leading, dtype)]
    outputs = [None] * len(spec.irreps_out)
    for i1, (_, ir1) in enumerate(spec.irreps_in1):
        group = [(path, w) for path, w in zip(spec.paths, weights) if path.i1 == i1]
        if not group:
            continue
        columns = jnp.concatenate([w.reshape(w.shape[0], -1) for _, w in group], axis=1)
        mixed = None  # [..., 2l1+1, columns]
        for index, chunks in segments:
            if ir1 not in chunks:
                continue
            x, (start, stop) = chunks[ir1]
            flat = x.reshape(-1, x.shape[-1])
            if compute_dtype is None:
                y = flat @ columns[start:stop]
            else:
                y = mixed_matmul(flat, columns[start:stop], compute_dtype)
            y = y.reshape(x.shape[:-1] + (columns.shape[1],))
            y = y if index is None else y[index]
            mixed = y if mixed is None else mixed + y
        # One split, not slices: the transpose of a split is one concatenate, that of each slice
        # a pad to the full width and a sum of them all (the same holds in _couple_columns).
        widths = [w.shape[1] * w.shape[2] for _, w in group]
        parts = jnp.split(mixed, np.cumsum(widths)[:-1], axis=-1) if len(group) > 1 else [mixed]
        for (path, w), part in zip(group, parts):
            mul2, mul_out = w.shape[1], w.shape[2]
            part = part.reshape(part.shape[:-1] + (mul2, mul_out))  # [..., i, v, w]
            if y2 is None:  # x2 = 1x0e: the coupling is the identity
                term = jnp.swapaxes(part[..., 0, :], -1, -2)  # [..., w, i]
            else:
                term = _couple_columns(spec, path, y2[path.i2], part)
            previous = outputs[path.i_out]
            outputs[path.i_out] = term if previous is None else previous + term
    # The dtype couple-first returns: the inputs' promoted with the weights' (half-precision
    # features times float32 weights give float32, which a scanned layer's carry relies on).
    dtype = jnp.result_type(dtype, *(w.dtype for w in weights))
    chunks = [out.astype(dtype) for out in outputs]
    return e3nn.from_chunks(spec.irreps_out, chunks, leading, dtype)


class _HybridStatics(NamedTuple):
    """What :func:`_hybrid_product` needs besides arrays: the spec, the irreps of each segment
    and of ``x2``, and the compute dtype."""

    spec: TensorProductSpec
    segment_irreps: Tuple[e3nn.Irreps, ...]
    x2_irreps: Optional[e3nn.Irreps]
    compute_dtype: Optional[str]


def _hybrid(spec: TensorProductSpec, weights: Sequence[jnp.ndarray], x1: Sequence[Segment],
            x2: Optional[e3nn.IrrepsArray], compute_dtype: Optional[str]) -> e3nn.IrrepsArray:
    """:func:`tensor_product` couple-first when evaluated, weights-first when differentiated.

    On QM9's shapes couple-first has the faster forward (1.4x) and weights-first the faster
    training step (1.2x; on N-body and OC20 weights-first is faster in both). A
    ``jax.custom_vjp`` whose primal is couple-first and whose forward rule is weights-first (its
    own VJP) gives each its faster order, since JAX runs the primal only where nothing
    differentiates it (inference, evaluation) and the forward rule inside ``grad``/``vjp``. Both
    orders compute the same function (to float rounding), so the value does not depend on which
    one ran.

    Reverse mode of any order works (forces by ``grad``, then a loss on them); forward mode
    (``jax.jvp``, ``jax.jacfwd`` of the product itself) is refused by JAX for a ``custom_vjp``:
    use ``"weights_first"`` or ``"couple_first"`` there, or trace inside
    :func:`differentiated_hybrid`.
    """
    segments = checked_segments(spec, x1)
    statics = _HybridStatics(spec, tuple(array.irreps for array, _ in segments),
                             None if x2 is None else x2.irreps, compute_dtype)
    out = _hybrid_product(statics, list(weights), [array.array for array, _ in segments],
                          [index for _, index in segments], None if x2 is None else x2.array)
    return e3nn.IrrepsArray(spec.irreps_out, out)


def _hybrid_inputs(statics: _HybridStatics, arrays, indices, x2_array):
    x1 = [e3nn.IrrepsArray(irreps, array) if index is None
          else (e3nn.IrrepsArray(irreps, array), index)
          for irreps, array, index in zip(statics.segment_irreps, arrays, indices)]
    return x1, None if x2_array is None else e3nn.IrrepsArray(statics.x2_irreps, x2_array)


def _hybrid_order(order: str, statics: _HybridStatics, weights, arrays, indices, x2_array):
    x1, x2 = _hybrid_inputs(statics, arrays, indices, x2_array)
    out = tensor_product(statics.spec, weights, x1, x2, statics.compute_dtype, order).array
    # Both orders return this dtype; stated here because custom_vjp requires it.
    return out.astype(jnp.result_type(*(array.dtype for array in arrays),
                                       *(w.dtype for w in weights)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hybrid_product(statics: _HybridStatics, weights, arrays, indices, x2_array) -> jnp.ndarray:
    return _hybrid_order("couple_first", statics, weights, arrays, indices, x2_array)


def _hybrid_product_fwd(statics, weights, arrays, indices, x2_array):
    out, pullback = jax.vjp(
        lambda w, a, x2: _hybrid_order("weights_first", statics, w, a, indices, x2),
        weights, arrays, x2_array)
    return out, (pullback, indices)


def _hybrid_product_bwd(statics, residuals, cotangent):
    pullback, indices = residuals
    d_weights, d_arrays, d_x2 = pullback(cotangent)
    d_indices = [None if index is None else np.zeros(index.shape, jax.dtypes.float0)
                 for index in indices]
    return d_weights, d_arrays, d_indices, d_x2


_hybrid_product.defvjp(_hybrid_product_fwd, _hybrid_product_bwd)


def _components(x: jnp.ndarray, axis: int) -> list:
    """``x`` cut along ``axis`` into its slices, that axis removed (one split, no slices)."""
    if x.shape[axis] == 1:
        return [jnp.squeeze(x, axis=axis)]
    return [jnp.squeeze(c, axis=axis) for c in jnp.split(x, x.shape[axis], axis=axis)]


def _couple_columns(spec: TensorProductSpec, path: Path, y: Sequence[jnp.ndarray],
                    part: jnp.ndarray) -> jnp.ndarray:
    """``out[..., w, k] = sum over v, i, j of cg[i, j, k] y_j[..., v] part[..., i, v, w]``,
    unrolled over the nonzero coefficients (most of a Clebsch-Gordan block is zero); ``y`` holds
    the attribute irrep's components."""
    ir1 = spec.irreps_in1[path.i1].ir
    ir_out = spec.irreps_out[path.i_out].ir
    cg = np.sqrt(ir_out.dim) * e3nn.clebsch_gordan(ir1.l, spec.irreps_in2[path.i2].ir.l, ir_out.l)
    components = _components(part, axis=-3)  # [..., v, w] per component i of ir1
    single_channel = part.shape[-2] == 1  # one attribute channel (spherical harmonics)
    if single_channel:
        components = [jnp.squeeze(c, axis=-2) for c in components]  # [..., w]
    rows = []
    for k in range(ir_out.dim):
        total = None
        for i in range(ir1.dim):
            nonzero = [(j, float(cg[i, j, k])) for j in range(len(y)) if abs(cg[i, j, k]) > 1e-12]
            if not nonzero:
                continue
            coefficient = functools.reduce(
                operator.add, [c * y[j] for j, c in nonzero])  # [..., v]
            if single_channel:  # no reduction: [..., 1] times [..., w]
                term = coefficient * components[i]
            else:
                term = jnp.sum(coefficient[..., :, None] * components[i], axis=-2)
            total = term if total is None else total + term
        rows.append(total if total is not None else jnp.zeros(part.shape[:-3] + part.shape[-1:],
                                                                 part.dtype))
    # Components last, the layout of IrrepsArray chunks: written so by the fusion that computes
    # them, where a separate transpose of the stacked rows would read and write them once more.
    return jnp.stack(rows, axis=-1)  # [..., w, 2l+1]


def _row_count(x1: Sequence[Segment], x2: Optional[e3nn.IrrepsArray]) -> Optional[int]:
    """Rows of the product when every row-wise input is 2-D (``[rows, dim]``), else None."""
    counts = set()
    for segment in x1:
        array, index = segment if isinstance(segment, tuple) else (segment, None)
        if index is not None:
            if index.ndim != 1 or array.ndim != 2:
                return None
            counts.add(index.shape[0])
        elif array.ndim != 2:
            return None
        else:
            counts.add(array.shape[0])
    if x2 is not None:
        if x2.ndim != 2:
            return None
        counts.add(x2.shape[0])
    return counts.pop() if len(counts) == 1 else None


def _pad_rows(array: jnp.ndarray, n_tiles: int, tile: int) -> jnp.ndarray:
    """``[rows, ...] -> [n_tiles, tile, ...]``, zero rows appended."""
    pad = n_tiles * tile - array.shape[0]
    array = jnp.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1))
    return array.reshape((n_tiles, tile) + array.shape[1:])


def tiled_rows(fn, x1: Sequence[Segment], x2: Optional[e3nn.IrrepsArray],
               tile: Optional[int]) -> e3nn.IrrepsArray:
    """``fn(x1, x2)`` computed ``tile`` rows (edges or nodes) at a time, each tile rematerialised.

    ``fn`` must act row by row (a tensor product, biases, a gate). The rows are cut into tiles by a
    ``lax.scan`` whose body is ``jax.checkpoint``-ed, so the large per-row intermediates of a
    tensor product (coupled components, gathered features) exist for one tile at a time: they stay
    in the CPU caches, and the backward pass recomputes them tile by tile instead of storing them.
    This lowers peak memory, and it is faster where memory bandwidth is the bottleneck: on the
    project's 2-core CPU shared with other jobs, the QM9 message tensor product (forward and
    backward) fell from 556 to 165 ms with 256-row tiles. On the same CPU when quiet, and on
    accelerators, one pass is faster (the scan costs parallelism), so it is off (``tile=None``)
    unless asked for. Gathered segments
    ``(array, index)`` are gathered once and then tiled like the other rows.

    Falls back to ``fn(x1, x2)`` when ``tile`` is None, the rows fit in one tile, or an input is not
    ``[rows, dim]``. Padding rows are zeros and are cut from the result.
    """
    rows = _row_count(x1, x2)
    if tile is None or rows is None or rows <= tile:
        return fn(x1, x2)
    n_tiles = -(-rows // tile)
    # Gathered segments are gathered once, before tiling: read from inside the tiles, the whole
    # source array would receive a dense cotangent per tile in the backward pass.
    irreps, tiled = [], []
    for segment in x1:
        array, index = segment if isinstance(segment, tuple) else (segment, None)
        irreps.append(array.irreps)
        tiled.append(_pad_rows(array.array if index is None else array.array[index], n_tiles, tile))
    if x2 is not None:
        tiled.append(_pad_rows(x2.array, n_tiles, tile))
    out_irreps = []

    @jax.checkpoint
    def body(carry, leaves):
        segments = [e3nn.IrrepsArray(ir, leaf) for ir, leaf in zip(irreps, leaves)]
        y2 = None if x2 is None else e3nn.IrrepsArray(x2.irreps, leaves[-1])
        out = fn(segments, y2)
        out_irreps.append(out.irreps)
        return carry, out.array

    _, out = jax.lax.scan(body, None, tiled)
    out = out.reshape((n_tiles * tile,) + out.shape[2:])[:rows]
    return e3nn.IrrepsArray(out_irreps[-1], out)


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
    """Draws the weights of every path (a pure-JAX alternative to the Haiku module).

    Path ``n`` is uniform on ``[-bound_n, bound_n]`` (:func:`init_bound`). All paths come from
    one random draw, sliced: every draw compiles its own copy of the generator's rounds, and a
    draw per path made initialising a small network take 15-20 s of XLA compilation on a CPU.
    """
    sizes = [int(np.prod(shape)) for shape in spec.weight_shapes]
    unit = jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0)
    starts = np.cumsum([0] + sizes)
    return [
        (unit[start:start + size] * bound).reshape(shape)
        for start, size, shape, bound in zip(starts, sizes, spec.weight_shapes,
                                             init_bound(spec, weight_init))
    ]
