"""Haiku modules for SEGNN's steerable layers: thin wrappers over :mod:`segnn_jax.tensor_product`.

Shape letters: ``...`` leading axes (nodes or edges).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from segnn_jax import edge_frame
from segnn_jax import tensor_product as tp
from segnn_jax.irreps import gate_irreps
from segnn_jax.tensor_product_cue import product_function

__all__ = ["O3TensorProduct", "O3TensorProductGate", "gate", "gate_irreps"]

Inputs = Union[tp.Segment, Sequence[tp.Segment]]


def _as_segments(x1: Inputs) -> list:
    if isinstance(x1, (e3nn.IrrepsArray, tuple)):
        return [x1]
    return list(x1)


def _segment_irreps(segment: tp.Segment) -> e3nn.Irreps:
    array = segment[0] if isinstance(segment, tuple) else segment
    if not isinstance(array, e3nn.IrrepsArray):
        raise TypeError(f"inputs must be e3nn.IrrepsArray, got {type(array).__name__}")
    return array.irreps


class O3TensorProduct(hk.Module):
    """Weighted Clebsch-Gordan tensor product ``x1 x x2 -> irreps_out`` plus scalar biases.

    With ``x2=None`` the second input is the constant ``1x0e`` and the layer is an equivariant
    linear map. ``x1`` may be a list of segments, read as their concatenation; a segment given as
    ``(array, index)`` stands for ``array[index]`` (node features gathered to the edges).

    Args:
        irreps_out: output irreps.
        biases: one learnable bias per ``0e`` output channel (none on other irreps: it would break
            equivariance).
        weight_init: ``"reference"`` (the SEGNN reference's scale) or ``"unit"`` (unit second
            moment at initialisation); see :func:`segnn_jax.tensor_product.init_bound`.
        row_tile: compute the product this many rows (edges, nodes) at a time, each tile
            rematerialised in the backward pass (:func:`segnn_jax.tensor_product.tiled_rows`):
            less memory, faster only where memory bandwidth is contended. Same function.
        backend: ``"e3nn"`` (the default, :func:`segnn_jax.tensor_product.tensor_product`) or
            ``"cuequivariance"`` (:mod:`segnn_jax.tensor_product_cue`, needs cuequivariance-jax):
            the same function and the same parameters.
        compute_dtype: None, ``"bfloat16"`` or ``"float16"``: mixed precision, the product's
            contractions in this dtype with float32 accumulation and output (see
            :mod:`segnn_jax.tensor_product`); parameters, biases and ``epilogue`` stay float32.
        contraction_order: ``"couple_first"`` (the default), ``"weights_first"`` (weights
            applied before the coupling, on the nodes for gathered inputs) or ``"hybrid"``
            (weights first where differentiated, couple first where only evaluated): the same
            function and parameters, faster for some shapes (``order`` of
            :func:`segnn_jax.tensor_product.tensor_product`); e3nn backend only.

    >>> import jax, jax.numpy as jnp
    >>> f = hk.transform(lambda x, a: O3TensorProduct("4x0e+2x1o")(x, a))
    >>> x = e3nn.normal("3x0e+1x1o", jax.random.PRNGKey(0), (5,))
    >>> a = e3nn.spherical_harmonics("0e+1o", jnp.ones((5, 3)), normalize=True)
    >>> params = f.init(jax.random.PRNGKey(1), x, a)
    >>> f.apply(params, None, x, a).irreps
    4x0e+2x1o
    """

    def __init__(self, irreps_out, *, biases: bool = True, weight_init: str = "reference",
                 backend: str = "e3nn",
                 row_tile: Optional[int] = None, compute_dtype: Optional[str] = None,
                 contraction_order: str = "couple_first", name: Optional[str] = None):
        super().__init__(name=name)
        self.irreps_out = e3nn.Irreps(irreps_out)
        self.biases = biases
        self.weight_init = weight_init
        self.backend = backend
        self.compute_dtype = tp.check_compute_dtype(compute_dtype)
        if self.compute_dtype is not None and backend != "e3nn":
            raise ValueError(f"compute_dtype={self.compute_dtype!r} needs backend='e3nn', "
                             f"got backend={backend!r}")
        self.contraction_order = tp.check_order(contraction_order)
        if self.contraction_order != "couple_first" and backend != "e3nn":
            raise ValueError(f"contraction_order={contraction_order!r} needs backend='e3nn', "
                             f"got backend={backend!r}")
        self.product_fn = product_function(backend)  # checks the name, imports lazily
        self.row_tile = _check_row_tile(row_tile)

    def __call__(self, x1: Inputs, x2: Optional[e3nn.IrrepsArray] = None,
                 epilogue: Optional[Callable[[e3nn.IrrepsArray], e3nn.IrrepsArray]] = None
                 ) -> e3nn.IrrepsArray:
        """``x1 x x2`` plus biases, then ``epilogue`` (a row-wise function, e.g. a gate) if given.

        With ``row_tile`` set, all of it runs tile by tile (:func:`segnn_jax.tensor_product.tiled_rows`).
        """
        segments = _as_segments(x1)
        spec, weights, bias = self._parameters([_segment_irreps(s) for s in segments],
                                               None if x2 is None else x2.irreps,
                                               _segment_dtype(segments[0]))

        def rows(segments, x2):
            if self.contraction_order == "couple_first":  # every backend's signature
                out = self.product_fn(spec, weights, segments, x2, self.compute_dtype)
            else:
                out = self.product_fn(spec, weights, segments, x2, self.compute_dtype,
                                      order=self.contraction_order)
            if bias is not None:
                out = _add_scalar_biases(out, bias)
            return out if epilogue is None else epilogue(out)

        return tp.tiled_rows(rows, segments, x2, self.row_tile)

    def in_frame(self, x1: edge_frame.FrameArray, frame: edge_frame.EdgeFrame,
                 epilogue: Optional[Callable[[edge_frame.FrameArray], edge_frame.FrameArray]] = None
                 ) -> edge_frame.FrameArray:
        """The same product of edge features with the edge attributes, computed in the edge
        frame (:mod:`segnn_jax.edge_frame`): ``x1`` rotated into it, the result left there.

        The parameters are those :meth:`__call__` creates for segments of ``x1.segments`` and
        ``x2`` of ``frame.attribute_irreps``; ``backend`` and ``row_tile`` do not apply.
        """
        spec, weights, bias = self._parameters(list(x1.segments), frame.attribute_irreps,
                                               x1.parts[0].dtype)
        out = edge_frame.product(spec, weights, x1, frame, self.compute_dtype)
        if bias is not None:
            out = edge_frame.add_scalar_biases(out, bias)
        return out if epilogue is None else epilogue(out)

    def _parameters(self, segment_irreps, x2_irreps, dtype):
        """``(spec, weights, bias or None)`` of ``concat(segments) x x2 -> irreps_out``."""
        spec = tp.make_spec(segment_irreps, x2_irreps, self.irreps_out)
        # At initialisation every path takes its slice of one draw (see tp.init_weights).
        drawn = (tp.init_weights(hk.next_rng_key(), spec, self.weight_init, dtype)
                 if hk.running_init() else None)
        weights = [
            hk.get_parameter(spec.path_name(n), shape, dtype,
                             lambda shape, dtype, n=n: drawn[n].astype(dtype))
            for n, shape in enumerate(spec.weight_shapes)
        ]
        n_scalars = sum(mul for mul, ir in spec.irreps_out if ir == e3nn.Irrep("0e"))
        bias = None
        if self.biases and n_scalars > 0:
            bias = hk.get_parameter("b", (n_scalars,), dtype, hk.initializers.Constant(0.0))
        return spec, weights, bias


def _check_row_tile(row_tile: Optional[int]) -> Optional[int]:
    if row_tile is not None and (isinstance(row_tile, bool) or not isinstance(row_tile, int)
                                 or row_tile < 1):
        raise ValueError(f"row_tile must be None or a positive integer, got {row_tile!r}")
    return row_tile


def _segment_dtype(segment: tp.Segment):
    array = segment[0] if isinstance(segment, tuple) else segment
    return array.dtype


def _add_scalar_biases(x: e3nn.IrrepsArray, bias: jnp.ndarray) -> e3nn.IrrepsArray:
    # One addition of a full-width vector (zero on the l > 0 components): cutting the rows into
    # chunks instead would cost a pad and a sum per chunk in the backward pass.
    pieces, used = [], 0
    for mul, ir in x.irreps:
        if ir == e3nn.Irrep("0e"):
            pieces.append(bias[used:used + mul].astype(x.dtype))
            used += mul
        else:
            pieces.append(jnp.zeros((mul * ir.dim,), x.dtype))
    return e3nn.IrrepsArray(x.irreps, x.array + jnp.concatenate(pieces))


def gate(x: e3nn.IrrepsArray, irreps_out) -> e3nn.IrrepsArray:
    """SiLU on the scalars, and each other irrep times sigmoid of its own gate scalar.

    ``irreps_out`` is taken regrouped (scalars first).

    Args:
        x: ``[..., gate_irreps(irreps_out).dim]``: scalars, then gates, then the gated irreps.
        irreps_out: the irreps after gating.

    Returns:
        ``[..., irreps_out.dim]``.
    """
    irreps_out = e3nn.Irreps(irreps_out).regroup()
    if x.irreps != gate_irreps(irreps_out):
        raise ValueError(f"gate expects {gate_irreps(irreps_out)} for {irreps_out}, got {x.irreps}")
    n_scalars = sum(mul for mul, ir in irreps_out if ir == e3nn.Irrep("0e"))
    gated = e3nn.Irreps([(mul, ir) for mul, ir in irreps_out if ir != e3nn.Irrep("0e")])
    n_gates = gated.num_irreps
    # One split (its transpose is one concatenate; slices would each be padded back and summed).
    offsets = np.cumsum([n_scalars, n_gates] + [mul * ir.dim for mul, ir in gated])[:-1]
    scalars, gates, *blocks = jnp.split(x.array, offsets, axis=-1)
    gates = jnp.split(jax.nn.sigmoid(gates), np.cumsum([mul for mul, _ in gated])[:-1], axis=-1)
    pieces = [jax.nn.silu(scalars)]
    for block, gate_of_block, (mul, ir) in zip(blocks, gates, gated):
        block = block.reshape(block.shape[:-1] + (mul, ir.dim)) * gate_of_block[..., None]
        pieces.append(block.reshape(block.shape[:-2] + (mul * ir.dim,)))
    # Output order: scalars first, then the gated irreps, as in irreps_out after regroup().
    return e3nn.IrrepsArray(
        e3nn.Irreps(f"{n_scalars}x0e") + gated, jnp.concatenate(pieces, axis=-1)
    ).simplify()


class O3TensorProductGate(hk.Module):
    """:class:`O3TensorProduct` to ``gate_irreps(irreps_out)``, followed by :func:`gate`.

    If ``irreps_out`` holds only scalars this is the tensor product followed by SiLU.

    >>> import jax, jax.numpy as jnp
    >>> f = hk.transform(lambda x, a: O3TensorProductGate("4x0e+2x1o")(x, a))
    >>> x = e3nn.normal("3x0e+1x1o", jax.random.PRNGKey(0), (5,))
    >>> a = e3nn.spherical_harmonics("0e+1o", jnp.ones((5, 3)), normalize=True)
    >>> f.apply(f.init(jax.random.PRNGKey(1), x, a), None, x, a).irreps
    4x0e+2x1o
    """

    def __init__(self, irreps_out, *, biases: bool = True, weight_init: str = "reference",
                 backend: str = "e3nn",
                 row_tile: Optional[int] = None, compute_dtype: Optional[str] = None,
                 contraction_order: str = "couple_first", name: Optional[str] = None):
        super().__init__(name=name)
        self.irreps_out = e3nn.Irreps(irreps_out).regroup()
        self.product = O3TensorProduct(gate_irreps(self.irreps_out), biases=biases,
                                       weight_init=weight_init, row_tile=row_tile,
                                       backend=backend, compute_dtype=compute_dtype,
                                       contraction_order=contraction_order,
                                       name="tensor_product")

    def __call__(self, x1: Inputs, x2: Optional[e3nn.IrrepsArray] = None) -> e3nn.IrrepsArray:
        return self.product(x1, x2, epilogue=lambda out: gate(out, self.irreps_out))

    def in_frame(self, x1: edge_frame.FrameArray, frame: edge_frame.EdgeFrame
                 ) -> edge_frame.FrameArray:
        """:meth:`__call__` in the edge frame (see :meth:`O3TensorProduct.in_frame`)."""
        return self.product.in_frame(x1, frame,
                                     epilogue=lambda out: edge_frame.gate(out, self.irreps_out))
