"""Choosing hidden irreps: the balanced and weight-balanced rules of the SEGNN reference.

All functions here work on irreps alone (no arrays), so configs can derive their irreps cheaply.
"""

from __future__ import annotations

import e3nn_jax as e3nn

from segnn_jax.tensor_product import tensor_product_paths

__all__ = ["balanced_irreps", "count_tensor_product_weights", "gate_irreps",
           "weight_balanced_irreps"]


def _irrep_types(lmax: int, sh_type: bool) -> list:
    if sh_type:
        return [e3nn.Irrep(l, (-1) ** l) for l in range(lmax + 1)]
    # 0e, 1e, 1o, 2e, 2o, ...: the scalars stay even.
    return [e3nn.Irrep(0, 1)] + [e3nn.Irrep(l, p) for l in range(1, lmax + 1) for p in (1, -1)]


def balanced_irreps(lmax: int, vec_dim: int, sh_type: bool = True) -> e3nn.Irreps:
    """Splits ``vec_dim`` dimensions equally over the irrep types up to ``lmax``.

    Each type l gets ``int(vec_dim / (2l + 1) / n_types)`` copies and the remaining dimensions go to
    ``0e``, so the result has exactly ``vec_dim`` dimensions.

    Args:
        lmax: highest order.
        vec_dim: total dimension to distribute.
        sh_type: only the parities of spherical harmonics (0e, 1o, 2e, ...) if True, else both
            parities of every order above 0 (0e, 1e, 1o, 2e, 2o, ...).

    >>> balanced_irreps(1, 371)
    188x0e+61x1o
    """
    types = _irrep_types(lmax, sh_type)
    copies = {ir: int(vec_dim / ir.dim / len(types)) for ir in types if ir.l > 0}
    scalars = vec_dim - sum(mul * ir.dim for ir, mul in copies.items())
    irreps = [(scalars, "0e")] + [(mul, ir) for ir, mul in copies.items() if mul > 0]
    return e3nn.Irreps(irreps).regroup()


def count_tensor_product_weights(irreps_in1, irreps_in2, irreps_out) -> int:
    """Weights of the fully connected (``uvw``) tensor product ``in1 x in2 -> out``."""
    irreps_in1, irreps_in2, irreps_out = map(e3nn.Irreps, (irreps_in1, irreps_in2, irreps_out))
    return sum(
        irreps_in1[p.i1].mul * irreps_in2[p.i2].mul * irreps_out[p.i_out].mul
        for p in tensor_product_paths(irreps_in1, irreps_in2, irreps_out)
    )


def weight_balanced_irreps(
    hidden_features: int, irreps_attr, *, lmax: int, sh: bool = True
) -> e3nn.Irreps:
    """The smallest steerable irreps whose tensor product has as many weights as a scalar one.

    Finds the smallest n such that the fully connected tensor product ``H(n) x irreps_attr -> H(n)``
    has at least ``hidden_features**2`` weights, the count of a plain linear layer of width
    ``hidden_features``, where ``H(n) = n x (0e + 1o + ... up to lmax)`` if ``sh`` else
    :func:`balanced_irreps` ``(lmax, n)``.

    Args:
        hidden_features: width of the equivalent scalar network.
        irreps_attr: irreps of the attribute (spherical harmonics up to ``lmax_attr``).
        lmax: highest order of the hidden irreps.
        sh: the shape of the candidate irreps (see above).

    >>> weight_balanced_irreps(64, "1x0e+1x1o", lmax=1)
    32x0e+32x1o
    >>> weight_balanced_irreps(128, e3nn.Irreps.spherical_harmonics(3), lmax=2)
    36x0e+36x1o+36x2e
    """
    irreps_attr = e3nn.Irreps(irreps_attr)
    target = hidden_features**2

    def candidate(n: int) -> e3nn.Irreps:
        if sh:
            return (n * e3nn.Irreps.spherical_harmonics(lmax)).regroup()
        return balanced_irreps(lmax, n)

    n = 1
    while count_tensor_product_weights(candidate(n), irreps_attr, candidate(n)) < target:
        n += 1
    return candidate(n)


def gate_irreps(irreps_out) -> e3nn.Irreps:
    """Irreps a gated layer must produce for ``irreps_out``: scalars, a gate per other irrep, rest.

    >>> gate_irreps("32x0e+32x1o")
    64x0e+32x1o
    """
    irreps_out = e3nn.Irreps(irreps_out).regroup()
    scalars = e3nn.Irreps([(mul, ir) for mul, ir in irreps_out if ir == e3nn.Irrep("0e")])
    gated = e3nn.Irreps([(mul, ir) for mul, ir in irreps_out if ir != e3nn.Irrep("0e")])
    return (scalars + e3nn.Irreps(f"{gated.num_irreps}x0e") + gated).simplify()
