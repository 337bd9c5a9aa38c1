"""The same weighted tensor product as :func:`segnn_jax.tensor_product.tensor_product`, run by
NVIDIA's ``cuequivariance-jax`` (an optional backend: ``pip install segnn[cuequivariance]``).

The product is written as one segmented tensor product with subscripts ``uvw,ui,vj,wk+ijk``:

* operand 0, the weights: for every path, the rows of its block ``W[u, v, w]`` that meet each
  chunk of ``x1`` (so the buffer is simply the path blocks flattened and concatenated);
* operand 1, ``x1``: the segments concatenated as they come, in e3nn-jax's ``mul_ir`` layout (the
  chunk ``u`` x ``i`` is ``[mul, 2l+1]``), one operand segment per chunk;
* operand 2, ``x2`` (``mul_ir``; the constant ``1x0e`` for a linear map);
* operand 3, the output, ``mul_ir``;

and each path's coefficients are e3nn's Clebsch-Gordan block times ``sqrt(2 l_out + 1)``, without
cuequivariance's own path normalisation. So the weights, their Haiku parameters and the results
are those of the e3nn-jax path, and checkpoints work with either backend.

Execution method: cuequivariance-jax 0.13's fused GPU kernels do not cover this product:
``uniform_1d`` needs a polynomial with a single channel mode and equal segment extents (this one
has three modes, u, v and w), and ``indexed_linear`` is for linear layers. So the backend runs
the ``"naive"`` method (plain JAX einsums, per path) on every platform; it is correct everywhere
and is the base on which a fused kernel for this product would slot in.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

from segnn_jax.tensor_product import Segment, TensorProductSpec, checked_segments

__all__ = ["BACKENDS", "check_backend", "product_function", "tensor_product_cue"]

BACKENDS = ("e3nn", "cuequivariance")

_INSTALL = ("the 'cuequivariance' tensor-product backend needs cuequivariance-jax: "
            "pip install 'segnn[cuequivariance]' (or pip install cuequivariance-jax)")


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else a ValueError naming the option."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def product_function(backend: str):
    """The tensor-product function of a backend, with the signature of
    :func:`segnn_jax.tensor_product.tensor_product`.

    Raises:
        ValueError: an unknown backend.
        ImportError: ``"cuequivariance"`` without cuequivariance-jax installed.
    """
    if check_backend(backend) == "e3nn":
        from segnn_jax.tensor_product import tensor_product
        return tensor_product
    _import_cue()
    return tensor_product_cue


def _import_cue():
    try:
        import cuequivariance as cue
        import cuequivariance_jax as cuex
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({e})") from e
    return cue, cuex


@functools.cache
def _polynomial(spec: TensorProductSpec, x1_irreps: tuple[str, ...]):
    """The segmented polynomial of ``spec`` for ``x1`` arriving as parts with these irreps."""
    cue, _ = _import_cue()
    in2 = spec.irreps_in2 if spec.irreps_in2 is not None else e3nn.Irreps("0e")
    stp = cue.SegmentedTensorProduct.from_subscripts("uvw,ui,vj,wk+ijk")
    # x1 chunks in buffer order, with the rows of the weight blocks they meet.
    chunks = {ir: [] for _, ir in spec.irreps_in1}
    filled = {ir: 0 for _, ir in spec.irreps_in1}
    for irreps in x1_irreps:
        for mul, ir in e3nn.Irreps(irreps):
            if mul == 0:
                continue
            sid = stp.add_segment(1, (mul, ir.dim))
            chunks[ir].append((sid, mul, filled[ir]))
            filled[ir] += mul
    for mul, ir in in2:
        stp.add_segment(2, (mul, ir.dim))
    for mul, ir in spec.irreps_out:
        stp.add_segment(3, (mul, ir.dim))
    for path, (_, mul2, mul_out) in zip(spec.paths, spec.weight_shapes):
        ir1, ir2 = spec.irreps_in1[path.i1].ir, in2[path.i2].ir
        ir_out = spec.irreps_out[path.i_out].ir
        cg = np.sqrt(ir_out.dim) * e3nn.clebsch_gordan(ir1.l, ir2.l, ir_out.l)
        # The chunks come in increasing row order: their weight segments tile the block W[p].
        for sid, mul, _ in chunks[ir1]:
            stp.add_path((mul, mul2, mul_out), sid, path.i2, path.i_out, c=cg)
    return cue.SegmentedPolynomial.eval_last_operand(stp)


def tensor_product_cue(
    spec: TensorProductSpec,
    weights: Sequence[jnp.ndarray],
    x1: Sequence[Segment],
    x2: e3nn.IrrepsArray | None,
    compute_dtype: str | None = None,
) -> e3nn.IrrepsArray:
    """:func:`segnn_jax.tensor_product.tensor_product` (same arguments, same function), computed
    by ``cuequivariance_jax.segmented_polynomial``.

    Raises:
        ValueError: ``compute_dtype`` set: mixed precision is an option of the e3nn-jax backend.
    """
    _, cuex = _import_cue()
    if compute_dtype is not None:
        raise ValueError(f"compute_dtype={compute_dtype!r} needs backend='e3nn': the "
                         f"cuequivariance backend computes in the inputs' dtype")
    arrays, irreps = [], []
    for array, index in checked_segments(spec, x1):
        arrays.append(array.array if index is None else array.array[index])
        irreps.append(str(array.irreps))
    dtype = arrays[0].dtype
    leading = jnp.broadcast_shapes(*(a.shape[:-1] for a in arrays))
    arrays = [jnp.broadcast_to(a, leading + a.shape[-1:]) for a in arrays]
    if x2 is None:
        x2_array = jnp.ones((1,), dtype)  # the constant 1x0e, broadcast by cuequivariance
    else:
        if x2.irreps.simplify() != spec.irreps_in2:
            raise ValueError(
                f"x2 has irreps {x2.irreps}, the tensor product expects {spec.irreps_in2}")
        x2_array = x2.array.astype(dtype)
    weight_buffer = jnp.concatenate([jnp.ravel(w).astype(dtype) for w in weights])
    [out] = cuex.segmented_polynomial(
        _polynomial(spec, tuple(irreps)),
        [weight_buffer, jnp.concatenate(arrays, axis=-1), x2_array],
        [jax.ShapeDtypeStruct(leading + (spec.irreps_out.dim,), dtype)],
        method="naive",
        name="segnn_tensor_product",
    )
    return e3nn.IrrepsArray(spec.irreps_out, out)
