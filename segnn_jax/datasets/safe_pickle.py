"""Restricted unpickling of torch / torch_geometric objects into NumPy, without torch.

The legacy OC20 LMDB files store pickled ``torch_geometric.data.Data`` objects
whose tensors are serialised in torch's legacy (non-zip) format. A plain
``pickle.load`` would run whatever callable the file names, so this module uses
an :class:`pickle.Unpickler` whose ``find_class`` resolves only an explicit
allow-list of reconstruction functions, each mapped to a NumPy implementation
written here. Anything else raises :class:`UnsafePickleError` before it can be
called, and torch's persistent-id mechanism is refused outside the tensor
blobs, where it is parsed by hand.

Supported objects: ``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2``
over ``torch.storage._load_from_bytes`` blobs (legacy torch format with
``torch.<Type>Storage`` storages, views included), ``torch.Size``,
``collections.OrderedDict`` and the ``torch_geometric`` ``Data`` /
``DataEdgeAttr`` / ``DataTensorAttr`` / ``GlobalStorage`` classes of PyG 1.x
and 2.x. A tensor is rebuilt as a bounds-checked copy of its storage. Views that
read more elements than their storage holds (stride 0, overlaps) are refused as
malformed, and so are pickles whose rebuilt tensors would exceed twice the
pickle's size plus 1 MiB (a storage named again and again) or whose containers,
walked as a tree, hold over four items per pickle byte plus 10,000 (nested lists
of repeated references), so a small file cannot expand to any size.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
from typing import Any

import numpy as np

__all__ = [
    "MalformedPickleError",
    "PickledObject",
    "UnsafePickleError",
    "pyg_data_to_dict",
    "safe_loads",
]

# torch's legacy serialisation header (torch/serialization.py).
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "UntypedStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(ValueError):
    """Raised when a pickle refers to a callable outside the allow-list."""


class MalformedPickleError(ValueError):
    """Raised when a pickle or an embedded torch tensor blob is corrupt or unsupported."""


class PickledObject:
    """Inert stand-in for an allowed class (PyG ``Data``, ``GlobalStorage``, ...).

    Instances only record the state the pickle gives them; they have no behaviour.

    Attributes:
        qualname: "module.name" of the class the pickle referred to.
        state: the state dict passed to ``__setstate__`` (empty if none).
    """

    qualname = "object"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]  # (dict_state, slot_state) form with no slots
        if not isinstance(state, dict):
            raise MalformedPickleError(
                f"{self.qualname}: expected a dict state, got {type(state).__name__}"
            )
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"PickledObject({self.qualname}, keys={sorted(self.state)})"


def _make_class(qualname: str) -> type:
    # One distinct subclass per allowed name so that pyg_data_to_dict can tell them apart.
    return type(qualname.rsplit(".", 1)[1], (PickledObject,), {"qualname": qualname})


_PYG_CLASSES = {
    ("torch_geometric.data.data", "Data"): _make_class("torch_geometric.data.data.Data"),
    ("torch_geometric.data.data", "DataEdgeAttr"): _make_class(
        "torch_geometric.data.data.DataEdgeAttr"
    ),
    ("torch_geometric.data.data", "DataTensorAttr"): _make_class(
        "torch_geometric.data.data.DataTensorAttr"
    ),
    ("torch_geometric.data.storage", "GlobalStorage"): _make_class(
        "torch_geometric.data.storage.GlobalStorage"
    ),
}


class _StorageType:
    """Marker for ``torch.<Type>Storage`` inside a legacy tensor blob."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


# Protocol-5 opcodes that no torch / PyG pickle uses. CPython's C unpickler allocates a
# BYTEARRAY8's declared size before reading it, and on truncated input frees the bytearray
# while a view of it is still exported ("SystemError: deallocated bytearray object has exported
# buffers"). A large fuzz campaign printed that error, and one of its workers died.
_REFUSED_OPCODES = frozenset({"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"})


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global and every persistent id, and, before loading, scans
    the pickle's opcodes (without running them) for :data:`_REFUSED_OPCODES`."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._file = file

    def load(self) -> Any:
        start = self._file.tell()
        for opcode, _, position in pickletools.genops(self._file):
            if opcode.name in _REFUSED_OPCODES:
                raise MalformedPickleError(
                    f"pickle opcode {opcode.name} at byte {position} is refused (protocol-5 "
                    "buffers never occur in torch or PyG pickles)"
                )
        self._file.seek(start)
        return super().load()

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"refusing to load global {module}.{name!s} from a pickle")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r} in a pickle")


class _LegacyStorageUnpickler(_NoGlobalsUnpickler):
    """Reads the object record of a legacy torch blob; storages become placeholders."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.storages: dict[str, tuple[np.dtype, int]] = {}
        self.views: list[tuple[str, str, int, int]] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r} in a torch tensor blob")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise MalformedPickleError(f"malformed storage record {pid!r}")
        key = str(key)
        self.storages.setdefault(key, (storage_type.dtype, numel))
        if view is None:
            return ("storage", key)
        view_key, offset, size = view
        view_key = str(view_key)
        self.views.append((view_key, key, int(offset), int(size)))
        return ("storage", view_key)


def _load_from_bytes(blob: bytes) -> np.ndarray:
    """NumPy version of ``torch.storage._load_from_bytes`` for the legacy format.

    Layout: pickled magic number, protocol version, sys-info dict, the storage
    record (persistent ids), the list of storage keys, then for each key an
    int64 element count followed by the raw elements.

    Returns:
        [numel] 1-D array of the storage's dtype.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise MalformedPickleError(f"_load_from_bytes expects bytes, got {type(blob).__name__}")
    f = io.BytesIO(blob)
    try:
        if _NoGlobalsUnpickler(f).load() != _LEGACY_MAGIC_NUMBER:
            raise MalformedPickleError(
                "tensor blob is not in torch's legacy format (zip-format blobs are not supported)"
            )
        if _NoGlobalsUnpickler(f).load() != _LEGACY_PROTOCOL_VERSION:
            raise MalformedPickleError("unsupported legacy torch protocol version")
        sys_info = _NoGlobalsUnpickler(f).load()
        record_unpickler = _LegacyStorageUnpickler(f)
        result = record_unpickler.load()
        keys = _NoGlobalsUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            OverflowError) as err:
        if isinstance(err, (UnsafePickleError, MalformedPickleError)):
            raise
        raise MalformedPickleError(f"corrupt legacy torch tensor blob: {err}") from err
    byteorder = (
        "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
    )
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        key = str(key)
        if key not in record_unpickler.storages:
            raise MalformedPickleError(f"storage key {key!r} listed but not declared in the blob")
        dtype, numel = record_unpickler.storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise MalformedPickleError("truncated legacy torch tensor blob (storage header)")
        stored = int(np.frombuffer(header, dtype=byteorder + "i8")[0])
        if stored != numel:
            raise MalformedPickleError(
                f"storage {key!r} declares {numel} elements but holds {stored}"
            )
        dtype = dtype.newbyteorder(byteorder) if dtype.itemsize > 1 else dtype
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise MalformedPickleError(f"truncated legacy torch tensor blob (storage {key!r})")
        arrays[key] = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    for view_key, root_key, offset, size in record_unpickler.views:
        root = arrays.get(root_key)
        if root is None or offset < 0 or size < 0 or offset + size > root.size:
            raise MalformedPickleError(f"storage view {view_key!r} out of bounds of {root_key!r}")
        arrays[view_key] = root[offset : offset + size]
    if not (isinstance(result, tuple) and len(result) == 2 and result[0] == "storage"):
        raise MalformedPickleError("legacy torch blob does not hold a single storage")
    if result[1] not in arrays:
        raise MalformedPickleError(f"storage {result[1]!r} has no data in the blob")
    return arrays[result[1]]


def _rebuild_tensor_v2(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """NumPy version of ``torch._utils._rebuild_tensor_v2`` (bounds-checked copy)."""
    del requires_grad, backward_hooks, metadata  # autograd state has no meaning here
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise MalformedPickleError("tensor storage is not a storage blob")
    try:
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
        storage_offset = int(storage_offset)
    except (TypeError, ValueError, OverflowError) as err:
        raise MalformedPickleError(f"malformed tensor geometry: {err}") from err
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise MalformedPickleError(f"malformed tensor geometry size={size} stride={stride}")
    if storage_offset < 0:
        raise MalformedPickleError(f"negative storage offset {storage_offset}")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    # A view with more elements than its storage holds past the offset reads some of them more
    # than once (stride 0, overlaps): copying it would let a few bytes of pickle expand to any size
    # (a mutated stride and size made one fuzzed pickle allocate gigabytes). Saved data tensors are
    # never such views.
    numel, available = math.prod(size), max(storage.size - storage_offset, 0)
    if numel > available:
        raise MalformedPickleError(
            f"tensor of size {size} stride {stride} has {numel} elements, more than the "
            f"{available} its storage holds from offset {storage_offset} (overlapping or "
            "stride-0 views are refused)"
        )
    # as_strided does no bounds checking, so check that the last element lies inside the storage.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise MalformedPickleError(
            f"tensor of size {size} stride {stride} offset {storage_offset} exceeds its storage "
            f"of {storage.size}"
        )
    base = storage[storage_offset:]
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * storage.itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_tensor(
    storage: np.ndarray, storage_offset: int, size: tuple, stride: tuple
) -> np.ndarray:
    """NumPy version of the older ``torch._utils._rebuild_tensor``."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _torch_size(*args: Any) -> tuple[int, ...]:
    return tuple(*args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch", "Size"): _torch_size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **_PYG_CLASSES,
}


_TENSOR_BUILDERS = {_rebuild_tensor_v2, _rebuild_tensor}
# Rebuilt tensors may hold at most this multiple of the pickle's size, plus _SLACK_BYTES (views
# of one storage may each copy part of it; real entries stay near 1x).
_TENSOR_BYTES_PER_PICKLE_BYTE = 2
_SLACK_BYTES = 1 << 20


class _RestrictedUnpickler(_NoGlobalsUnpickler):
    """Resolves only the allow-list, and bounds the bytes of the tensors it rebuilds: every tensor
    is a copy of (part of) a storage, and a pickle can name one storage again and again for a few
    bytes each, which would make a small file expand to any size."""

    def __init__(self, file: io.BytesIO, size: int) -> None:
        super().__init__(file)
        self.tensor_budget = _TENSOR_BYTES_PER_PICKLE_BYTE * size + _SLACK_BYTES
        self.tensor_bytes = 0

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name} from a pickle: only torch tensor and "
                "torch_geometric Data reconstruction is allowed"
            ) from None
        return self._budgeted(found) if found in _TENSOR_BUILDERS else found

    def _budgeted(self, build):
        def rebuild(*args: Any) -> np.ndarray:
            tensor = build(*args)
            self.tensor_bytes += tensor.nbytes
            if self.tensor_bytes > self.tensor_budget:
                raise MalformedPickleError(
                    f"the tensors rebuilt from this pickle exceed {self.tensor_budget} bytes "
                    f"({_TENSOR_BYTES_PER_PICKLE_BYTE}x its size plus {_SLACK_BYTES}): it names "
                    "its storages over and over"
                )
            return tensor

        return rebuild


# Containers may name their items (memo references) many times; walked as a tree, the
# unpickled object may hold at most this many items per pickle byte, plus _SLACK_ELEMENTS.
_ELEMENTS_PER_PICKLE_BYTE = 4
_SLACK_ELEMENTS = 10_000


def _check_expanded_size(obj: Any, limit: int) -> None:
    """Refuses an object whose containers, walked as a tree, hold more than ``limit`` items.

    A pickle can build a list of ten references to a list of ten references to ... in a few
    bytes per level: ten levels name 10^10 items, which ``np.asarray`` would then try to
    materialise. Sizes are memoised per object, so the walk visits each object once.
    """
    sizes: dict[int, int] = {}

    def size(item: Any) -> int:
        key = id(item)
        if key in sizes:
            return sizes[key]
        if isinstance(item, PickledObject):
            children = list(item.state.items())
        elif isinstance(item, dict):
            children = list(item.items())
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = list(item)
        else:
            return 1
        sizes[key] = 1  # a cycle counts once
        total = 1 + sum(size(child) for child in children)
        if total > limit:
            raise MalformedPickleError(
                f"the unpickled containers hold over {limit} items when expanded "
                f"({_ELEMENTS_PER_PICKLE_BYTE} per pickle byte plus {_SLACK_ELEMENTS}): "
                "the pickle names its items over and over"
            )
        sizes[key] = total
        return total

    size(obj)


def safe_loads(data: bytes) -> Any:
    """Unpickle torch / torch_geometric objects into NumPy without running foreign code.

    Args:
        data: the pickle bytes.

    Returns:
        The object with tensors as NumPy arrays and PyG objects as
        :class:`PickledObject` instances.

    Raises:
        UnsafePickleError: the pickle names a callable outside the allow-list.
        MalformedPickleError: the pickle or a tensor blob inside it is corrupt, or it would
            expand beyond its size (tensors over twice its size plus 1 MiB, containers over
            four items per byte plus 10,000 when walked as a tree).
    """
    try:
        result = _RestrictedUnpickler(io.BytesIO(data), len(data)).load()
        _check_expanded_size(result, _ELEMENTS_PER_PICKLE_BYTE * len(data) + _SLACK_ELEMENTS)
        return result
    except (UnsafePickleError, MalformedPickleError):
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        MemoryError,
        OverflowError,  # int(inf) in a tensor geometry or a storage view
        RecursionError,  # absurdly nested containers
    ) as err:
        raise MalformedPickleError(f"corrupt pickle: {type(err).__name__}: {err}") from err


def pyg_data_to_dict(obj: Any) -> dict[str, Any]:
    """Fields of an unpickled PyG ``Data`` (PyG 2.x ``_store`` or PyG 1.x ``__dict__`` layout).

    Args:
        obj: result of :func:`safe_loads` on a pickled ``Data``.

    Returns:
        Mapping from field name to value (NumPy array or Python scalar);
        ``None`` fields of PyG 1.x objects are dropped.

    Raises:
        MalformedPickleError: ``obj`` is not a PyG ``Data``.
    """
    if not isinstance(obj, _PYG_CLASSES[("torch_geometric.data.data", "Data")]):
        raise MalformedPickleError(f"expected a torch_geometric Data object, got {obj!r}")
    store = obj.state.get("_store")
    if store is not None:
        if not isinstance(store, _PYG_CLASSES[("torch_geometric.data.storage", "GlobalStorage")]):
            raise MalformedPickleError(f"Data._store is not a GlobalStorage: {store!r}")
        mapping = store.state.get("_mapping")
        if not isinstance(mapping, dict):
            raise MalformedPickleError("GlobalStorage has no _mapping dict")
        return dict(mapping)
    return {k: v for k, v in obj.state.items() if not k.startswith("_") and v is not None}
