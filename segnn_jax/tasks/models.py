"""``create_model``: the one place where a config's ``model`` section becomes constructor arguments.

The section (see :func:`default_model_config`)::

    name             "segnn" | "seconv_linear" | "seconv_nonlinear"
    hidden_features  width of the equivalent scalar network; with lmax_hidden and lmax_attr it gives
                     the weight-balanced hidden irreps (segnn_jax.weight_balanced_irreps)
    hidden_irreps    explicit hidden irreps (a string such as "32x0e+32x1o"); overrides the above
    lmax_hidden      highest order of the hidden features
    lmax_attr        highest order of the spherical-harmonic attributes
    num_layers       message-passing layers
    norm             "none" | "instance" | "batch"
    pool             "avg" | "sum" (graph-level tasks)
    task             "node" | "graph"
    weight_init      "reference" | "unit"
    scan_layers      run the layers as a scan over stacked parameters: the same function, compiled
                     once instead of once per layer (QM9 reference: 20 s instead of 60 s to compile
                     the training step here); checkpoints then hold stacked layer parameters
    row_tile         None (one pass, the default) or a positive integer: rows (edges, nodes) per
                     tile of every tensor product (see segnn_jax.tensor_product.tiled_rows). Tiles
                     cut peak memory (QM9 training step 3.9 -> 2.4 GB with 256) and pay on a CPU
                     whose memory bandwidth is shared with other jobs; on a quiet CPU one pass is
                     faster (QM9 1.64 s vs 2.02 s per step). Parameters and results do not depend
                     on it.
    backend          "e3nn" (the default: segnn_jax.tensor_product, pure JAX) | "cuequivariance"
                     (NVIDIA's cuequivariance-jax runs the same tensor products, same parameters:
                     pip install 'segnn[cuequivariance]'; see segnn_jax.tensor_product_cue)
    compute_dtype    "none" (the default: float32 throughout) | "bfloat16" | "float16": mixed
                     precision, every tensor product's contractions in this dtype with float32
                     accumulation and outputs; parameters, gates, sums over messages, norms,
                     pooling and the loss stay float32 (backend "e3nn" only). bfloat16 costs a
                     relative equivariance error of about 1e-2 (float16: 1e-3); on the 2-core CPU
                     its training step took 0.86x the float32 time on N-body, 1.36x on QM9
                     (benchmarks/results/mixed_precision_cpu.json); not yet timed on a GPU.
    contraction_order "couple_first" (the default) | "weights_first" | "hybrid": the order in
                     which every tensor product applies its Clebsch-Gordan coupling and its
                     weights (see segnn_jax.tensor_product.tensor_product); the same function and
                     parameters. Weights first mixes node features on the nodes before gathering
                     them to the edges: a faster training step in every shipped config (N-body
                     1.2x, OC20 1.6-2.0x, QM9 with scanned layers 1.2x), a slower forward on QM9
                     (1.4x). "hybrid" runs weights first where the product is differentiated
                     (training) and couple first where it is only evaluated (evaluation,
                     prediction): QM9's config; no forward-mode autodiff (jax.jvp) through it
                     (backend "e3nn" only; benchmarks/README.md)
    edge_frame       false (the default) | true: the message tensor products in the edge frame
                     (segnn_jax.edge_frame), one dense matrix multiply per order m instead of the
                     Clebsch-Gordan coupling: the same function and parameters, except that a
                     zero-length real edge (coincident atoms) then sends no message

The output irreps are not a model option: they follow from the task (N-body: ``1x1o``), which passes
them to :func:`create_model`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import e3nn_jax as e3nn
import haiku as hk

from segnn_jax.irreps import weight_balanced_irreps
from segnn_jax.segnn import SEGNN, SEConv
from segnn_jax.tensor_product import COMPUTE_DTYPES, ORDERS
from segnn_jax.tensor_product_cue import BACKENDS
from segnn_jax.training.config import ConfigError, check_known_options, to_dict

__all__ = ["MODEL_NAMES", "attribute_irreps", "create_model", "default_model_config",
           "hidden_irreps", "validate_model_config"]

MODEL_NAMES = ("segnn", "seconv_linear", "seconv_nonlinear")

_DEFAULTS: Dict[str, Any] = {
    "name": "segnn",
    "hidden_features": 64,
    "hidden_irreps": None,
    "lmax_hidden": 1,
    "lmax_attr": 1,
    "num_layers": 4,
    "norm": "none",
    "pool": "avg",
    "task": "node",
    "weight_init": "reference",
    "scan_layers": False,
    "row_tile": None,
    "backend": "e3nn",
    "compute_dtype": None,
    "contraction_order": "couple_first",
    "edge_frame": False,
}

_CHOICES = {
    "name": MODEL_NAMES,
    "norm": ("none", "instance", "batch"),
    "pool": ("avg", "sum"),
    "task": ("node", "graph"),
    "weight_init": ("reference", "unit"),
    "backend": BACKENDS,
    "contraction_order": ORDERS,
}


def default_model_config() -> Dict[str, Any]:
    """A fresh copy of the model options with their defaults (the N-body reference's SEGNN)."""
    return dict(_DEFAULTS)


def _int_option(config: Dict[str, Any], key: str, name: str, minimum: int) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _row_tile_option(value: Any, name: str) -> Optional[int]:
    """None (also ``"none"``) or a positive int (also a digit string, from the CLI)."""
    if isinstance(value, str):
        if value.lower() == "none":
            return None
        if value.isdigit():
            value = int(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ConfigError(f"{name}.row_tile: expected 'none' or a positive integer, got {value!r}")


def _compute_dtype_option(value: Any, name: str) -> Optional[str]:
    """None (also ``"none"``), ``"bfloat16"`` or ``"float16"``."""
    if isinstance(value, str) and value.lower() == "none":
        return None
    if value is None or (isinstance(value, str) and value in COMPUTE_DTYPES):
        return value
    raise ConfigError(f"{name}.compute_dtype: expected 'none' or one of {COMPUTE_DTYPES}, "
                      f"got {value!r}")


def validate_model_config(config: Any, *, name: str = "config.model") -> Dict[str, Any]:
    """Checks the model section and returns it as a plain dict with the defaults filled in.

    Raises:
        ConfigError: an unknown option or an invalid value, named by its dotted path.
    """
    config = to_dict(config) or {}
    check_known_options(config, _DEFAULTS, name=name)
    full = dict(_DEFAULTS, **config)
    for key, choices in _CHOICES.items():
        if full[key] not in choices:
            raise ConfigError(f"{name}.{key}: expected one of {choices}, got {full[key]!r}")
    _int_option(full, "hidden_features", name, 1)
    _int_option(full, "lmax_hidden", name, 0)
    _int_option(full, "lmax_attr", name, 0)
    _int_option(full, "num_layers", name, 0)
    for flag in ("scan_layers", "edge_frame"):
        if not isinstance(full[flag], bool):
            raise ConfigError(f"{name}.{flag}: expected true or false, got {full[flag]!r}")
    full["row_tile"] = _row_tile_option(full["row_tile"], name)
    full["compute_dtype"] = _compute_dtype_option(full["compute_dtype"], name)
    if full["compute_dtype"] is not None and full["backend"] != "e3nn":
        raise ConfigError(f"{name}.compute_dtype: mixed precision needs backend 'e3nn', "
                          f"got backend {full['backend']!r}")
    if full["contraction_order"] != "couple_first" and full["backend"] != "e3nn":
        raise ConfigError(f"{name}.contraction_order: {full['contraction_order']!r} needs backend "
                          f"'e3nn', got backend {full['backend']!r}")
    if full["hidden_irreps"] is not None:
        try:
            irreps = e3nn.Irreps(full["hidden_irreps"])
        except (ValueError, TypeError, AssertionError) as e:
            raise ConfigError(
                f"{name}.hidden_irreps: not irreps: {full['hidden_irreps']!r} ({e})") from e
        if irreps.dim == 0:
            raise ConfigError(f"{name}.hidden_irreps: must not be empty, "
                              f"got {full['hidden_irreps']!r}")
    return full


def attribute_irreps(model_config: Any) -> e3nn.Irreps:
    """Irreps of the edge and node attributes: spherical harmonics up to ``lmax_attr``."""
    return e3nn.Irreps.spherical_harmonics(validate_model_config(model_config)["lmax_attr"])


def hidden_irreps(model_config: Any) -> e3nn.Irreps:
    """The hidden irreps: ``hidden_irreps`` if given, else weight-balanced from ``hidden_features``.

    >>> hidden_irreps({"hidden_features": 64, "lmax_hidden": 1, "lmax_attr": 1})
    32x0e+32x1o
    """
    cfg = validate_model_config(model_config)
    if cfg["hidden_irreps"] is not None:
        return e3nn.Irreps(cfg["hidden_irreps"]).regroup()
    return weight_balanced_irreps(cfg["hidden_features"], attribute_irreps(cfg),
                                  lmax=cfg["lmax_hidden"])


def create_model(model_config: Any, *, output_irreps) -> Callable[[], hk.Module]:
    """The Haiku module factory described by a model section.

    Args:
        model_config: the ``model`` section (dict or ConfigDict; see the module docstring).
        output_irreps: what the task predicts, e.g. ``"1x1o"`` per node for N-body.

    Returns:
        A zero-argument callable that creates the module; call it inside ``hk.transform``. The
        module maps a :class:`segnn_jax.SteerableGraphsTuple` to ``[N or G, output_irreps]``.

    Raises:
        ConfigError: an invalid model section (checked now, before anything is traced).

    >>> factory = create_model({"name": "seconv_linear", "num_layers": 2}, output_irreps="1x1o")
    >>> hk.transform(lambda: type(factory()).__name__).apply({}, None)
    'SEConv'
    """
    cfg = validate_model_config(model_config)
    irreps = hidden_irreps(cfg)
    output_irreps = e3nn.Irreps(output_irreps)
    common = dict(task=cfg["task"], pool=cfg["pool"], norm=cfg["norm"],
                  weight_init=cfg["weight_init"], scan_layers=cfg["scan_layers"],
                  backend=cfg["backend"],
                  row_tile=cfg["row_tile"], compute_dtype=cfg["compute_dtype"],
                  contraction_order=cfg["contraction_order"], edge_frame=cfg["edge_frame"])

    def factory() -> hk.Module:
        if cfg["name"] == "segnn":
            return SEGNN(irreps, output_irreps, cfg["num_layers"], **common, name="segnn")
        return SEConv(irreps, output_irreps, cfg["num_layers"],
                      nonlinear=cfg["name"] == "seconv_nonlinear", **common, name="seconv")

    return factory
