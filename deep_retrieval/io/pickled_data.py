"""numpy arrays and plain-data objects inside untrusted pickles, without
running anything they name.

A pickled ``numpy.ndarray`` names ``numpy.core.multiarray._reconstruct`` and
``numpy.dtype`` (and ``_codecs.encode`` for its bytes at protocol 2); a pickled scikit-learn ``PCA`` names its class and
``copyreg._reconstructor``. `globals_for` maps exactly those names to
stand-ins that only record data (shape, byte order, raw bytes, attribute
dicts); `materialize` then turns them into numpy arrays and
`PlainObject` records. Object arrays (``dtype=object``) are refused: their
elements would be further pickles.

Used with `torch_pickle.CheckpointUnpickler` (its ``extra_globals``).
"""

import numpy as np

from deep_retrieval.io.torch_pickle import CheckpointError

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED_KINDS = set("biufc?")


class _DtypeStandIn:
    """``numpy.dtype(spec, align, copy)`` and its pickled state (byte order)."""

    def __init__(self, spec, align=False, copy=False):
        self.spec, self.order = str(spec), "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>|=":
            self.order = state[1]

    def resolve(self):
        dtype = np.dtype(self.spec)
        if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None:
            raise CheckpointError(f"refused a pickled array of dtype {self.spec!r} (numbers only)")
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


class _ArrayStandIn:
    """``numpy.core.multiarray._reconstruct(ndarray, shape, code)`` then its
    state ``(version, shape, dtype, fortran, raw bytes)``."""

    def __setstate__(self, state):
        _, shape, dtype, fortran, raw = state[:5]
        if not isinstance(dtype, _DtypeStandIn) or not isinstance(raw, (bytes, bytearray)):
            raise CheckpointError("refused a pickled array that is not plain numbers")
        dtype = dtype.resolve()
        count = int(np.prod(shape, dtype=np.int64))
        if len(raw) != count * dtype.itemsize:
            raise CheckpointError(f"a pickled array of shape {tuple(shape)} holds {len(raw)} bytes")
        self.array = np.frombuffer(raw, dtype).reshape(tuple(shape), order="F" if fortran else "C").astype(
            dtype.newbyteorder("="))


def _reconstruct(cls, shape, code):
    if cls is not _NDARRAY:
        raise CheckpointError("refused to rebuild an array of another class")
    return _ArrayStandIn()


def _scalar(dtype, raw=None):
    if not isinstance(dtype, _DtypeStandIn) or not isinstance(raw, (bytes, bytearray)):
        raise CheckpointError("refused a pickled numpy scalar that is not a plain number")
    dtype = dtype.resolve()
    return np.frombuffer(raw, dtype)[0].astype(dtype.newbyteorder("="))


_NDARRAY = object()  # what the global numpy.ndarray resolves to


def _encode(text, encoding="utf-8"):
    """``_codecs.encode``: how protocol-2 pickles (torch.save's) hold bytes."""
    if encoding not in ("latin1", "latin-1", "utf-8") or not isinstance(text, str):
        raise CheckpointError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


def _empty_bytes(*args):
    """``bytes()``: how protocol-2 pickles hold an empty buffer (nothing else:
    ``bytes(n)`` would allocate what the file asks)."""
    if args:
        raise CheckpointError("refused bytes() with arguments")
    return b""


class PlainObject:
    """A pickled object of an allowed class, as its class name and the
    attributes it was pickled with (never an instance of that class)."""

    def __init__(self, qualified_name):
        self.class_name = qualified_name
        self.attributes = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise CheckpointError(f"refused the pickled state of {self.class_name}")
        self.attributes = dict(state)

    def __repr__(self):
        return f"PlainObject({self.class_name}, {sorted(self.attributes)})"


def _plain_class(qualified_name):
    """A callable standing in for the class ``qualified_name`` (NEWOBJ
    calls ``cls.__new__(cls)``, REDUCE calls it)."""

    class StandIn(PlainObject):
        def __new__(cls, *unused):
            record = PlainObject.__new__(cls)
            PlainObject.__init__(record, qualified_name)
            return record

        def __init__(self, *unused):
            pass

    StandIn.__qualname__ = StandIn.__name__ = qualified_name.rsplit(".", 1)[-1]
    return StandIn


def _reconstructor(cls, base, state=None):
    """``copyreg._reconstructor`` for stand-in classes only."""
    if not (isinstance(cls, type) and issubclass(cls, PlainObject)):
        raise CheckpointError("refused copyreg._reconstructor of a class outside the allow-list")
    return cls()


def globals_for(plain_classes=()):
    """``extra_globals`` for `CheckpointUnpickler`: numpy arrays and scalars,
    and the classes named in ``plain_classes`` (``"module.Class"``) as
    `PlainObject` records."""
    table = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _DtypeStandIn,
             ("copyreg", "_reconstructor"): _reconstructor, ("builtins", "object"): object,
             ("_codecs", "encode"): _encode, ("__builtin__", "bytes"): _empty_bytes,
             ("builtins", "bytes"): _empty_bytes}
    for module in _NUMPY_MODULES:
        table[(module, "_reconstruct")] = _reconstruct
        table[(module, "scalar")] = _scalar
    for name in plain_classes:
        module, _, cls = name.rpartition(".")
        table[(module, cls)] = _plain_class(name)
    return table


def materialize(obj):
    """``obj`` with every stand-in replaced: arrays by numpy arrays, objects
    by `PlainObject` records whose attributes are materialized too."""
    if isinstance(obj, _ArrayStandIn):
        if not hasattr(obj, "array"):
            raise CheckpointError("a pickled array without its data")
        return obj.array
    if isinstance(obj, PlainObject):
        record = PlainObject(obj.class_name)
        record.attributes = {k: materialize(v) for k, v in obj.attributes.items()}
        return record
    if isinstance(obj, _DtypeStandIn):
        return obj.resolve()
    if isinstance(obj, dict):
        return type(obj)((k, materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(materialize(v) for v in obj)
    return obj
