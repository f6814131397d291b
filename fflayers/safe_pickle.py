"""Reading pickles without running their code.

A pickle names functions that the reader calls while loading it (``os.system`` as easily as a DataFrame's
constructor), so a plain ``pickle.load`` / ``pandas.read_pickle`` of a file someone else made runs their
code. Everything fflayers reads as a pickle goes through :class:`RestrictedUnpickler`, which resolves only
the names on an explicit allow-list: what pandas and numpy need to rebuild DataFrames, Series, indexes and
arrays (old and new module paths), torch's tensor rebuilders (for ``torch.save`` files), and a few harmless
builtins. Any other name stops the load with :class:`UnsafePickleError` before anything is called.

``trust=True`` (the command lines' ``--trust-checkpoint``) reads a file the user vouches for in full.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from fflayers.core import InputError

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "restricted_loads", "load_pickle",
           "torch_load_restricted"]

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")

#: (module, name) pairs a pickle may name. Exact names, never module prefixes: ``pandas.read_pickle`` or
#: ``numpy.load`` would unpickle a second file without these checks.
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [(m, n) for m in _NUMPY_CORE for n in ("_reconstruct", "scalar", "_frombuffer")]
    + [("numpy", n) for n in ("ndarray", "dtype", "bool_", "int8", "int16", "int32", "int64", "uint8",
                              "uint16", "uint32", "uint64", "float16", "float32", "float64", "complex64",
                              "complex128", "str_", "bytes_", "object_", "datetime64", "timedelta64")]
    + [("numpy.dtypes", n) for n in ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType",
                                     "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType",
                                     "Float16DType", "Float32DType", "Float64DType", "Complex64DType",
                                     "Complex128DType", "StrDType", "BytesDType", "ObjectDType",
                                     "DateTime64DType", "TimeDelta64DType")]
    + [
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.series", "Series"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas.core.internals.managers", "SingleBlockManager"),
        ("pandas.core.internals.blocks", "new_block"),
        ("pandas.core.internals.blocks", "Block"),
        ("pandas.core.internals.blocks", "NumpyBlock"),
        ("pandas.core.internals.blocks", "ObjectBlock"),
        ("pandas.core.internals.blocks", "FloatBlock"),
        ("pandas.core.internals.blocks", "IntBlock"),
        ("pandas.core.internals.blocks", "BoolBlock"),
        ("pandas.core.internals.blocks", "ExtensionBlock"),
        ("pandas.core.internals.blocks", "DatetimeTZBlock"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas._libs.internals", "BlockPlacement"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas.core.indexes.numeric", "Int64Index"),
        ("pandas.core.indexes.numeric", "Float64Index"),
        ("pandas.core.indexes.multi", "MultiIndex"),
        ("pandas.core.indexes.category", "CategoricalIndex"),
        ("pandas.core.indexes.datetimes", "_new_DatetimeIndex"),
        ("pandas.core.indexes.datetimes", "DatetimeIndex"),
        ("pandas.core.arrays.categorical", "Categorical"),
        ("pandas.core.arrays.categorical", "_recode_for_categories"),
        ("pandas.core.dtypes.dtypes", "CategoricalDtype"),
        ("pandas.core.arrays.string_", "StringArray"),
        ("pandas.core.arrays.string_", "StringDtype"),
        ("pandas.core.arrays.integer", "IntegerArray"),
        ("pandas.core.arrays.floating", "FloatingArray"),
        ("pandas.core.arrays.boolean", "BooleanArray"),
        ("pandas.core.arrays.datetimes", "DatetimeArray"),
        ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"),
        ("pandas._libs.tslibs.timestamps", "Timestamp"),
        ("pandas._libs.tslibs.timedeltas", "_timedelta_unpickle"),
        ("pandas.core.flags", "Flags"),
        ("pandas._libs.properties", "AxisProperty"),
    ]
    + [("pandas", n) for n in ("DataFrame", "Series", "Index", "RangeIndex", "MultiIndex", "CategoricalIndex",
                               "DatetimeIndex", "TimedeltaIndex", "PeriodIndex", "IntervalIndex",
                               "Categorical", "CategoricalDtype", "Timestamp", "Timedelta", "NA", "NaT",
                               "StringDtype", "BooleanDtype", "Int8Dtype", "Int16Dtype", "Int32Dtype",
                               "Int64Dtype", "UInt8Dtype", "UInt16Dtype", "UInt32Dtype", "UInt64Dtype",
                               "Float32Dtype", "Float64Dtype", "DatetimeTZDtype", "ArrowDtype", "Flags")]
    + [("pandas.arrays", n) for n in ("ArrowStringArray", "ArrowExtensionArray", "StringArray",
                                      "IntegerArray", "FloatingArray", "BooleanArray", "DatetimeArray",
                                      "TimedeltaArray", "Categorical", "NumpyExtensionArray")]
    + [("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"), ("pandas._libs.missing", "NA"),
       ("pandas._libs.tslibs.nattype", "__nat_unpickle")]
    + [("pyarrow.lib", n) for n in ("_restore_array", "py_buffer", "type_for_alias", "chunked_array", "field",
                                    "list_", "large_list", "struct", "dictionary", "timestamp", "string",
                                    "large_string", "schema", "ChunkedArray", "DataType")]
    + [("_codecs", "encode")]  # protocol-2 pickles store bytes as encode(text, "latin1")
    + [("torch._utils", n) for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                     "_rebuild_parameter", "_rebuild_parameter_with_state")]
    + [("torch", n) for n in ("Size", "device", "float32", "float64", "float16", "bfloat16", "int64", "int32",
                              "int16", "int8", "uint8", "bool", "complex64")]
    + [("collections", n) for n in ("OrderedDict", "defaultdict", "Counter", "deque")]
    + [("builtins", n) for n in ("slice", "range", "complex", "set", "frozenset", "bytearray", "object",
                                 "list", "dict", "tuple", "int", "float", "str", "bytes", "bool")]
    + [("copyreg", "_reconstructor")]
    + [("datetime", n) for n in ("datetime", "date", "time", "timedelta", "timezone")]
)

_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

# ``copyreg._reconstructor`` calls the class it is given: safe only because that class must come through
# :meth:`RestrictedUnpickler.find_class` too.


class UnsafePickleError(InputError):
    """A pickle names a function outside the allow-list; nothing of it was called."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the (module, name) pairs of :data:`ALLOWED`."""

    source = "the pickle"

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)  # protocol <= 2 pickles name Python 2's modules
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source} names {module}.{name}, which fflayers does not load from a file it did not make "
            "(a pickle can run code while loading); nothing of it ran. If you trust the file, pass "
            "--trust-checkpoint (trust=True in Python)"
        )


def restricted_loads(data: bytes, source: str = "the pickle") -> Any:
    """``pickle.loads`` through :class:`RestrictedUnpickler`."""
    unpickler = RestrictedUnpickler(io.BytesIO(data))
    unpickler.source = source
    return unpickler.load()


def load_pickle(path: str | os.PathLike, trust: bool = False) -> Any:
    """The object pickled in ``path`` (DataFrames and arrays only, unless ``trust``).

    Also reads pandas' own compressed pickles by their suffix (.gz, .bz2, .xz, .zst) only with ``trust``.
    """
    path = Path(path)
    if trust:
        import pandas as pd

        return pd.read_pickle(path)
    with open(path, "rb") as f:
        unpickler = RestrictedUnpickler(f)
        unpickler.source = str(path)
        return unpickler.load()


class _TorchPickleModule:
    """The ``pickle_module`` torch.load accepts, with the restricted Unpickler (tensors rebuild as usual)."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):  # legacy (non-zip) torch files
        return RestrictedUnpickler(file, **kwargs).load()


def torch_load_restricted(path: str | os.PathLike, trust: bool = False) -> Any:
    """``torch.load`` of a file fflayers wrote (tensors, DataFrames, plain containers), never running code
    named in it unless ``trust``."""
    import torch

    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TorchPickleModule)
