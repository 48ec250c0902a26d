"""Restricted unpickling of the pickled files WSSS code writes, without running code from them.

IRN, PuzzleCAM, SEAM and PSA save their CAMs with ``np.save(path, a_dict)``:
a ``.npy`` whose payload is a pickle of a 0-d object array holding a dict of
NumPy arrays, sometimes with torch tensors in it (IRN's ``"cam":
strided_cam.cpu()``, PuzzleCAM's ``"cam": strided_cams.cpu()``), and
``cls_labels.npy`` is a pickled dict of ids to float arrays. Python's
unpickler would call any function such a file names (``os.system`` ...), so
it is never used on them here. :func:`loads` is an unpickler that builds
only what these files contain:

* dicts, lists, tuples, sets, strings, bytes, numbers, booleans, ``None``
  (pickle opcodes; nothing is called);
* NumPy arrays, dtypes and scalars, rebuilt by this module's own
  functions from the pickle's data (``numpy._core.multiarray._reconstruct``,
  ``numpy.dtype``, ``...multiarray.scalar``, ``...numeric._frombuffer``
  and their NumPy 1 ``numpy.core`` names), each argument checked (shape
  against the bytes that are really there, so a header cannot make it
  allocate what the file does not hold);
* torch tensors (``torch._utils._rebuild_tensor_v2`` of a storage saved by
  ``torch.storage._load_from_bytes``): the storage's bytes are parsed here
  (torch's legacy serialisation: a few restricted pickles followed by raw
  little-endian data) and the tensor becomes a NumPy array, without torch;
* ``collections.OrderedDict`` (a tensor's empty backward-hook dict), and the
  builtins ``set``, ``frozenset``, ``complex``, ``bytes``, ``bytearray`` and
  ``_codecs.encode(text, 'latin1')`` that protocols 0-3 use for these types.

Any other global, any persistent id outside a torch storage, a class
instantiation, a BUILD on anything but an array or dtype of this load, or a
malformed argument raises :class:`UnsafePickle` naming what was refused;
nothing from the file has run by then (globals are looked up in the table
above, never imported). The data is unpickled from memory by Python's
pure-Python unpickler with those opcodes guarded, so no length in the pickle
can make it allocate more than the file holds.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from typing import Any, Callable, ClassVar, Literal

import numpy as np

__all__ = ["UnsafePickle", "loads", "load_npy_payload", "ALLOWED_GLOBALS"]


class UnsafePickle(ValueError):
    """A pickle asked for something this loader does not build; ``str(exc)`` says what."""


#: dtype kinds an array or scalar may have: booleans, integers, floats, complex, strings, objects
#: (object arrays only hold what this unpickler built itself)
_KINDS = set("biufcUSO")

#: The legacy torch.save magic number and protocol version (torch/serialization.py).
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001

#: torch storage class name -> NumPy dtype of its elements (bfloat16 is widened to float32 exactly)
_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}


# --------------------------------------------------------------------------- markers
class _Marker:
    """A global that pickles refer to but that is never called (``numpy.ndarray``, ``torch.Tensor``)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickle(f"calls {self.name}(...) directly, which these files never do")

    def __repr__(self) -> str:
        return self.name


_NDARRAY = _Marker("numpy.ndarray")
_TENSOR = _Marker("torch.Tensor")


class _StorageType(_Marker):
    """``torch.FloatStorage`` and friends in a storage's persistent id."""

    def __init__(self, name: str, dtype: Any):
        super().__init__(f"torch.{name}")
        self.dtype = dtype


# --------------------------------------------------------------------------- checks
def _int(v: Any, what: str, minimum: int = 0) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
        raise UnsafePickle(f"{what} is {v!r}, not an integer >= {minimum}")
    return int(v)


def _shape(v: Any, what: str = "array shape") -> tuple[int, ...]:
    if not isinstance(v, tuple) or len(v) > 32:
        raise UnsafePickle(f"{what} {v!r} is not a tuple of at most 32 sizes")
    return tuple(_int(s, what) for s in v)


def _dtype_ok(dt: Any, what: str) -> np.dtype:
    if not isinstance(dt, np.dtype):
        raise UnsafePickle(f"{what} is {type(dt).__name__}, not a NumPy dtype")
    if dt.kind not in _KINDS or dt.fields is not None or dt.subdtype is not None:
        raise UnsafePickle(f"{what} {dt} is not a plain numeric, string or object dtype")
    return dt


def _nbytes(shape: tuple[int, ...], dt: np.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dt.itemsize


# --------------------------------------------------------------------------- reading
#: Reads at least this long come back as views of the data instead of copies (array bytes).
_VIEW_BYTES = 1 << 16


class _MemReader:
    """A file over bytes in memory for the unpickler: long reads are views (no copy), all reads bounded.

    A read past the end comes back short (the unpickler then fails as
    truncated), so a length in the pickle never allocates more than exists.
    """

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0):
        self.view = memoryview(data).cast("B")
        self.pos = pos

    def read(self, n: int = -1) -> bytes | memoryview:
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        out = self.view[self.pos:end]
        self.pos = end
        return out if len(out) >= _VIEW_BYTES else out.tobytes()

    def readline(self) -> bytes:
        rest = self.view[self.pos:]
        n = bytes(rest[:4096]).find(b"\n")
        if n < 0:
            n = rest.tobytes().find(b"\n")
        end = len(self.view) if n < 0 else self.pos + n + 1
        out = self.view[self.pos:end].tobytes()
        self.pos = end
        return out

    def readinto(self, buf: Any) -> int:
        data = self.read(len(memoryview(buf)))
        memoryview(buf).cast("B")[:len(data)] = data
        return len(data)


_BYTES = (bytes, bytearray, memoryview)


# --------------------------------------------------------------------------- numpy builders
class _ArrayState:
    """What ``_reconstruct`` returns: BUILD hands it the array's state, and it builds the array then.

    The pickle machinery keeps this object (not an array) in the containers that
    reference it; :func:`_resolve` swaps every one for its array at the end.
    """

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self.array is not None:
            raise UnsafePickle("sets the state of one array twice")
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickle("gives an array a state that is not (version, shape, dtype, fortran, data)")
        version, shape, dt, fortran, data = state
        _int(version, "array state version", 1)
        shape = _shape(shape)
        dt = _dtype_ok(dt, "array dtype")
        if not isinstance(fortran, (bool, np.bool_)):
            raise UnsafePickle("gives an array a fortran flag that is not a boolean")
        order: Literal["C", "F"] = "F" if fortran else "C"
        if dt.hasobject:
            if not isinstance(data, list):
                raise UnsafePickle("gives an object array data that is not a list")
            count = _nbytes(shape, dt) // dt.itemsize
            if len(data) != count:
                raise UnsafePickle(f"gives an object array of shape {shape} {len(data)} items")
            arr = np.empty(count, dtype=object)
            for k, item in enumerate(data):
                arr[k] = _resolve(item)
            self.array = arr.reshape(shape, order=order)
            return
        if isinstance(data, str):  # protocol 0-2 pickles write the bytes as latin-1 text
            data = data.encode("latin-1")
        if not isinstance(data, _BYTES):
            raise UnsafePickle("gives an array data that is not bytes")
        if len(data) != _nbytes(shape, dt):
            raise UnsafePickle(f"gives an array of shape {shape} and dtype {dt} {len(data)} bytes, not "
                               f"{_nbytes(shape, dt)} (a damaged or forged file)")
        self.array = np.frombuffer(data, dtype=dt).reshape(shape, order=order).copy(order="K")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayState:
    """``numpy._core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')``: an empty array, state to follow."""
    if cls is not _NDARRAY:
        raise UnsafePickle(f"reconstructs an array of class {cls!r}; only numpy.ndarray is built")
    return _ArrayState()


def _make_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype('f4', False, True)`` (its state follows in a BUILD, checked by NumPy itself)."""
    if not isinstance(spec, str) or len(spec) > 16 or align not in (0, 1) or copy not in (0, 1):
        raise UnsafePickle(f"makes a dtype from {spec!r}; only type strings such as 'f4' are built")
    try:
        # always a new descriptor: the BUILD that follows sets its state, and must never reach NumPy's
        # shared built-in descriptors (np.dtype('f4') without copy=True returns one of them)
        dt = np.dtype(spec, align=bool(align), copy=True)
    except TypeError as exc:
        raise UnsafePickle(f"makes an unknown dtype {spec!r}: {exc}") from None
    return _dtype_ok(dt, "dtype")


def _scalar(dt: Any, data: Any = None) -> Any:
    """``numpy._core.multiarray.scalar(dtype, bytes)``: one NumPy scalar."""
    dt = _dtype_ok(dt, "scalar dtype")
    if dt.hasobject:
        return _resolve(data)
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, _BYTES) or len(data) != dt.itemsize:
        raise UnsafePickle(f"makes a {dt} scalar from {len(data) if isinstance(data, _BYTES) else data!r} "
                           f"bytes")
    return np.frombuffer(data, dtype=dt)[0]


def _frombuffer(buf: Any, dt: Any, shape: Any, order: Any) -> np.ndarray:
    """``numpy._core.numeric._frombuffer(buffer, dtype, shape, order)`` (pickle protocol 5)."""
    dt = _dtype_ok(dt, "array dtype")
    if dt.hasobject:
        raise UnsafePickle("makes an object array from raw bytes")
    shape = _shape(shape)
    if isinstance(buf, pickle.PickleBuffer):
        buf = buf.raw()
    if not isinstance(buf, _BYTES):
        raise UnsafePickle("gives an array data that is not bytes")
    if len(buf) != _nbytes(shape, dt):
        raise UnsafePickle(f"gives an array of shape {shape} and dtype {dt} {len(buf)} bytes, not "
                           f"{_nbytes(shape, dt)} (a damaged or forged file)")
    if order not in ("C", "F"):
        raise UnsafePickle(f"gives an array order {order!r}")
    return np.frombuffer(buf, dtype=dt).reshape(shape, order=order).copy(order="K")


# --------------------------------------------------------------------------- builtins
def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    out: collections.OrderedDict = collections.OrderedDict()
    for pair in list(items) if isinstance(items, (list, tuple)) else []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise UnsafePickle("builds an OrderedDict from items that are not pairs")
        out[pair[0]] = pair[1]
    return out


def _set(items: Any = ()) -> set:
    if not isinstance(items, (list, tuple)):
        raise UnsafePickle("builds a set from something that is not a list")
    return set(items)


def _frozenset(items: Any = ()) -> frozenset:
    return frozenset(_set(items))


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (real, imag)):
        raise UnsafePickle("builds a complex number from something that is not two numbers")
    return complex(real, imag)


def _bytearray(data: Any = b"", encoding: Any = None) -> bytearray:
    if isinstance(data, str) and encoding in ("latin-1", "latin1"):
        return bytearray(data.encode("latin-1"))
    if isinstance(data, _BYTES) and encoding is None:
        return bytearray(data)
    raise UnsafePickle("builds a bytearray from something that is not bytes (a size would allocate memory)")


def _bytes(data: Any = b"") -> bytes:
    if isinstance(data, _BYTES):
        return bytes(data)
    raise UnsafePickle("builds bytes from something that is not bytes (a size would allocate memory)")


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickle("calls _codecs.encode other than the way pickle writes bytes (latin1 text)")
    return text.encode("latin-1")


# --------------------------------------------------------------------------- torch
def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: the tensor as a NumPy array (a copy of its storage view)."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise UnsafePickle("rebuilds a tensor from something that is not a torch storage")
    offset = _int(offset, "tensor storage offset")
    size = _shape(tuple(size) if isinstance(size, (list, tuple)) else size, "tensor size")
    if not isinstance(stride, (list, tuple)) or len(stride) != len(size):
        raise UnsafePickle(f"rebuilds a tensor with strides {stride!r} for size {size}")
    stride = tuple(_int(s, "tensor stride") for s in stride)
    if hooks not in (None, {}) and not (isinstance(hooks, dict) and not hooks):
        raise UnsafePickle("rebuilds a tensor with backward hooks (functions), which CAM files never hold")
    if metadata not in (None, {}):
        raise UnsafePickle("rebuilds a tensor with Python metadata, which CAM files never hold")
    if 0 in size:
        return np.empty(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(storage):
        raise UnsafePickle(f"rebuilds a tensor of size {size} that reaches element {last} of a storage of "
                           f"{len(storage)} (a damaged or forged file)")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, copy=True)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
    """``torch._utils._rebuild_tensor`` (torch before 1.0)."""
    return _rebuild_tensor_v2(storage, offset, size, stride)


def _rebuild_from_type_v2(func: Any, cls: Any, args: Any, state: Any) -> np.ndarray:
    """``torch._tensor._rebuild_from_type_v2`` for a plain ``torch.Tensor`` without Python state."""
    if cls is not _TENSOR or func not in (_rebuild_tensor_v2, _rebuild_tensor) or state not in (None, {}):
        raise UnsafePickle("rebuilds a tensor subclass or a tensor with Python state")
    if not isinstance(args, tuple):
        raise UnsafePickle("rebuilds a tensor from arguments that are not a tuple")
    return func(*args)


class _GuardedUnpickler(pickle._Unpickler):
    """Python's own (pure-Python) unpickler with the opcodes these files never need refused.

    The pure-Python implementation is used, not the C one, because its opcodes
    can be guarded: BUILD may only set the state of an array or dtype this load
    made (never of a function or marker of this module, which would change
    later loads), class instantiation (INST, OBJ, NEWOBJ, NEWOBJ_EX) is
    refused (NumPy and torch pickles use REDUCE), and BYTEARRAY8 reads its
    data before allocating (the C unpickler allocates a BINBYTES8 /
    BYTEARRAY8 of the claimed size first). It is also the faster of the two
    here: it reads the few large byte strings of a CAM file without the
    pre-scan the C one would need.
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    # attributes of the pure-Python unpickler that typeshed does not declare
    stack: list[Any]
    read: Callable[[int], bytes]
    append: Callable[[Any], None]

    def __init__(self, f: Any):
        super().__init__(f)
        self._built: set[int] = set()  # ids of the dtypes this load made (BUILD may set their state)

    def _make_dtype(self, *args: Any) -> np.dtype:
        dt = _make_dtype(*args)
        self._built.add(id(dt))
        return dt

    def load_build(self) -> None:
        inst = self.stack[-2] if len(self.stack) >= 2 else None
        if not (isinstance(inst, _ArrayState) or (isinstance(inst, np.dtype) and id(inst) in self._built)):
            raise UnsafePickle(f"sets the state of {type(inst).__name__} {inst!r}; only arrays and dtypes "
                               f"are built")
        super().load_build()  # type: ignore[misc]  # typeshed omits the pure-Python unpickler's load_*

    def _refuse_instance(self) -> None:
        raise UnsafePickle("instantiates a class (INST / OBJ / NEWOBJ), which CAM and label files never do")

    def load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise UnsafePickle(f"is not a complete pickle: a bytearray of {n} bytes has {len(data)}")
        self.append(bytearray(data))

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX):
        dispatch[_op[0]] = _refuse_instance
    del _op

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickle(f"names the global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("uses persistent ids (a torch.save file, not an np.save one)")


def _run(unpickler: _GuardedUnpickler) -> Any:
    try:
        return unpickler.load()
    except UnsafePickle:
        raise
    except RecursionError:
        raise UnsafePickle("nests deeper than Python's recursion limit") from None
    except Exception as exc:  # truncated or malformed pickle data
        raise UnsafePickle(f"is not a complete pickle: {type(exc).__name__}: {exc}") from None


class _StorageRef:
    """A storage named by a persistent id inside a torch legacy save; filled once its bytes are read."""

    def __init__(self, key: str, dtype: Any, numel: int, view: Any):
        self.key, self.dtype, self.numel, self.view = key, dtype, numel, view


class _TorchLegacyUnpickler(_GuardedUnpickler):
    """The pickles inside torch's legacy format: only storage classes and storage persistent ids."""

    def __init__(self, f: Any, storages: dict[str, _StorageRef]):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return _StorageType(name, _STORAGES[name])
        raise UnsafePickle(f"names the global {module}.{name} inside a torch storage; only storage types "
                           f"are read there")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafePickle(f"uses the persistent id {pid!r} inside a torch storage")
        stype, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise UnsafePickle("names a torch storage without its storage type and key")
        numel = _int(numel, "torch storage size")
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = _StorageRef(key, stype.dtype, numel, None)
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3):
                raise UnsafePickle("names a view of a torch storage in an unknown form")
            part = (_int(view[1], "view offset"), _int(view[2], "view size"))
            return _StorageRef(key, stype.dtype, numel, part)
        return ref


def _storage_array(raw: bytes | memoryview, dtype: Any) -> np.ndarray:
    if dtype == "bfloat16":
        u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.dtype(dtype))


def _load_from_bytes(data: Any) -> np.ndarray:
    """``torch.storage._load_from_bytes(b)``: a legacy ``torch.save`` of one storage, as a 1-D array."""
    if not isinstance(data, _BYTES):
        raise UnsafePickle("loads a torch storage from something that is not bytes")
    f = _MemReader(data)
    storages: dict[str, _StorageRef] = {}

    def load() -> Any:
        try:
            return _run(_TorchLegacyUnpickler(f, storages))
        except UnsafePickle as exc:
            if "inside a torch storage" in str(exc):
                raise
            raise UnsafePickle(f"{exc} inside a torch storage") from None

    if load() != _TORCH_MAGIC or load() != _TORCH_PROTOCOL:
        raise UnsafePickle("holds a torch storage that is not in torch's legacy format")
    info = load()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UnsafePickle("holds a torch storage saved on a big-endian machine (not supported)")
    obj = load()
    keys = load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or set(keys) != set(storages):
        raise UnsafePickle("holds a torch storage whose key list does not match its storages")
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        ref = storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise UnsafePickle("holds a truncated torch storage")
        numel = int.from_bytes(head, "little")
        if numel != ref.numel:
            raise UnsafePickle(f"holds a torch storage of {numel} elements where its id says {ref.numel}")
        item = 2 if ref.dtype == "bfloat16" else np.dtype(ref.dtype).itemsize
        raw = f.read(numel * item)
        if len(raw) != numel * item:
            raise UnsafePickle("holds a truncated torch storage")
        arrays[key] = _storage_array(raw, ref.dtype)
    if not isinstance(obj, _StorageRef):
        raise UnsafePickle("holds something other than one storage where a torch storage was expected")
    arr = arrays[obj.key]
    if obj.view is not None:
        off, n = obj.view
        if off + n > len(arr):
            raise UnsafePickle("names a view beyond its torch storage")
        arr = arr[off:off + n].copy()
    return arr


# --------------------------------------------------------------------------- the unpickler
def _numpy_names(module: str, names: dict[str, Callable]) -> dict[tuple[str, str], Callable]:
    out = {}
    for prefix in ("numpy.core", "numpy._core"):
        for name, fn in names.items():
            out[(f"{prefix}.{module}", name)] = fn
    return out


#: (module, name) -> what this loader builds for it; nothing else is ever looked up
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_names("multiarray", {"_reconstruct": _reconstruct, "scalar": _scalar}),
    **_numpy_names("numeric", {"_frombuffer": _frombuffer}),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _make_dtype,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set, ("__builtin__", "set"): _set,
    ("builtins", "frozenset"): _frozenset, ("__builtin__", "frozenset"): _frozenset,
    ("builtins", "complex"): _complex, ("__builtin__", "complex"): _complex,
    ("builtins", "bytearray"): _bytearray, ("__builtin__", "bytearray"): _bytearray,
    ("builtins", "bytes"): _bytes, ("__builtin__", "bytes"): _bytes,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
}


class _RestrictedUnpickler(_GuardedUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        fn = ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            raise UnsafePickle(f"names the global {module}.{name}, which CAM and label files never hold")
        return self._make_dtype if fn is _make_dtype else fn


def _resolve(obj: Any, _active: set[int] | None = None) -> Any:
    """Swap every :class:`_ArrayState` in ``obj`` for its array; refuse what these files never hold."""
    if isinstance(obj, _ArrayState):
        if obj.array is None:
            raise UnsafePickle("reconstructs an array without its state")
        return obj.array
    if isinstance(obj, memoryview):  # a long byte string read as a view of the file
        return obj.tobytes()
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray, np.generic,
                                       np.ndarray, np.dtype)):
        return obj
    if isinstance(obj, _Marker) or callable(obj):
        raise UnsafePickle(f"holds the object {obj!r} itself, which CAM and label files never hold")
    active = set() if _active is None else _active
    if id(obj) in active:
        raise UnsafePickle("holds a structure that contains itself")
    active.add(id(obj))
    try:
        if isinstance(obj, dict):
            for k in list(obj):
                if not (k is None or isinstance(k, (bool, int, float, str, bytes, np.generic, tuple))):
                    raise UnsafePickle(f"holds a dict key of type {type(k).__name__}")
                obj[k] = _resolve(obj[k], active)
            return obj
        if isinstance(obj, list):
            for i, v in enumerate(obj):
                obj[i] = _resolve(v, active)
            return obj
        if isinstance(obj, tuple):
            return tuple(_resolve(v, active) for v in obj)
        if isinstance(obj, (set, frozenset)):
            for v in obj:
                if isinstance(v, _ArrayState):
                    raise UnsafePickle("holds an array inside a set")
            return obj
    finally:
        active.discard(id(obj))
    raise UnsafePickle(f"holds an object of type {type(obj).__name__}")


def loads(data: bytes) -> Any:
    """Unpickle ``data`` building only dicts, lists, tuples, NumPy arrays / dtypes / scalars and tensors.

    Parameters
    ----------
    data : bytes
        A whole pickle in memory: sizes in the pickle then never make the
        reader allocate more than the data holds (reads past the end come
        back short and fail as truncated).

    Returns
    -------
    object
        The unpickled object; torch tensors are NumPy arrays.

    Raises
    ------
    UnsafePickle
        The pickle names a global or builds an object outside that list, or
        is malformed; the message says which. Nothing from it has run.
    """
    return _load_from(_MemReader(data))


def _load_from(f: _MemReader) -> Any:
    """:func:`loads` reading ``f``."""
    return _resolve(_run(_RestrictedUnpickler(f)))


def load_npy_payload(raw: bytes) -> Any:
    """Read a whole ``.npy`` file (``raw``) of an object dtype: its header, then its pickle (:func:`loads`).

    Returns the array ``np.save`` pickled (a 0-d object array for a saved
    dict: call ``.item()``).
    """
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            _, _, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise UnsafePickle(f"is not a NumPy .npy file: {exc}") from None
    if not dtype.hasobject:
        raise UnsafePickle("is a plain array, not a pickle")
    return _load_from(_MemReader(raw, f.tell()))  # a view of ``raw``: no copy of the file
