"""numpy arrays and torch tensors as ``{dtype, shape}`` plus raw little-endian bytes.

Neither library is imported here at module level. A value can only be a numpy array if numpy is
already imported (``sys.modules``), so the sender never imports anything; the receiver imports
numpy or torch the first time such a value arrives.

Only the bytes of the view are sent: a non-contiguous view is made contiguous (a copy of the view,
never of its whole storage), a contiguous one is sent from its own memory without a copy.
Received arrays wrap the received buffer (``np.frombuffer`` / ``torch.frombuffer``): no copy.
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
from ctypes import c_ubyte as _c_ubyte
from typing import Any

from .errors import EncodeError, ProtocolError

# numpy dtypes sent as themselves; the wire name is the numpy name, the layout little-endian.
NUMPY_DTYPES = {
    "bool": "|b1",
    "int8": "|i1",
    "uint8": "|u1",
    "int16": "<i2",
    "uint16": "<u2",
    "int32": "<i4",
    "uint32": "<u4",
    "int64": "<i8",
    "uint64": "<u8",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "complex64": "<c8",
    "complex128": "<c16",
}

_NUMPY_NAMES = {wire: name for name, wire in NUMPY_DTYPES.items()}
NUMPY_NAME_OF: dict[Any, str] = {}
"""numpy dtype -> wire name, for the supported little-endian dtypes sent so far."""

# torch dtypes with a fixed byte layout. bfloat16 and the float8 formats have no numpy dtype:
# they travel as their raw bytes with this name as the tag. Quantized dtypes (which need a scale
# and zero point) and the sub-byte placeholder dtypes are not sent.
TORCH_DTYPES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)


_LITTLE_ENDIAN = sys.byteorder == "little"
_TORCH_DTYPE_SET = frozenset(TORCH_DTYPES)
_TORCH_NAMES: dict[Any, str] = {}  # torch dtype -> wire name, filled as dtypes are sent
_TORCH_COMPLEX = frozenset(("complex32", "complex64", "complex128"))
_TORCH_DTYPE_OF: dict[str, Any] = {}  # wire name -> torch dtype, filled as dtypes arrive


def _require_little_endian() -> None:
    if not _LITTLE_ENDIAN:
        raise EncodeError("socket_rpc sends arrays only from little-endian hosts")


def numpy_buffer(np: Any, array: Any) -> tuple[str, tuple[int, ...], memoryview, Any]:
    """``(wire dtype name, shape, bytes view, owner)`` of a numpy array.

    ``owner`` keeps the bytes alive (the array itself, or the contiguous copy of a view).
    """
    if type(array) is not np.ndarray:
        if isinstance(array, np.ma.MaskedArray):
            raise EncodeError("masked arrays are not sent (the mask would be lost)")
        array = np.asarray(array)
    dtype = array.dtype
    name = NUMPY_NAME_OF.get(dtype)
    if name is None:
        name = _NUMPY_NAMES.get(dtype.str)
        if name is None:
            little = dtype.newbyteorder("<") if dtype.fields is None else None
            if little is None or little.str not in _NUMPY_NAMES:
                raise EncodeError(
                    f"numpy dtype {dtype} is not supported; supported: {', '.join(NUMPY_DTYPES)}"
                )
            array = array.astype(little)  # big-endian data is sent little-endian
            name = _NUMPY_NAMES[little.str]
        elif _LITTLE_ENDIAN:
            NUMPY_NAME_OF[dtype] = name  # sendable as it is (the writer's shortcut)
    if not _LITTLE_ENDIAN:
        _require_little_endian()
    view = memoryview(array)
    if not view.c_contiguous:
        array = np.ascontiguousarray(array)  # only the view's elements, never the whole base
        view = memoryview(array)
    try:
        view = view.cast("B")
    except TypeError:  # formats memoryview cannot cast (complex): go through a uint8 view
        view = memoryview(array.reshape(-1).view(np.uint8))
    return name, array.shape, view, array


def encode_numpy(np: Any, array: Any) -> tuple[dict[str, Any], memoryview, Any]:
    """``(description, bytes view, owner)`` of a numpy array; ``owner`` keeps the bytes alive."""
    name, shape, view, owner = numpy_buffer(np, array)
    return {"dtype": name, "shape": list(shape)}, view, owner


def torch_buffer(torch: Any, tensor: Any) -> tuple[str, tuple[int, ...], memoryview, Any]:
    """``(wire dtype name, shape, bytes view, owner)`` of a torch tensor (moved to the CPU).

    ``owner`` keeps the bytes alive (the tensor the view reads, ``None`` for an empty one).
    """
    dtype = tensor.dtype
    name = _TORCH_NAMES.get(dtype)
    if name is None:
        name = _torch_name(dtype)
        if name not in _TORCH_DTYPE_SET:
            raise EncodeError(
                f"torch dtype {dtype} is not supported; supported: {', '.join(TORCH_DTYPES)}"
            )
        _TORCH_NAMES[dtype] = name
    if tensor.layout is not torch.strided:
        raise EncodeError(f"only dense tensors are sent, not layout {tensor.layout}")
    if not _LITTLE_ENDIAN:
        _require_little_endian()
    try:
        if tensor.requires_grad:
            tensor = tensor.detach()
        if not tensor.is_cpu:
            tensor = tensor.cpu()
        # Only complex tensors can have the conjugate bit; any can have the negative bit.
        if (name in _TORCH_COMPLEX and tensor.is_conj()) or tensor.is_neg():
            tensor = tensor.resolve_conj().resolve_neg()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()  # only the view's elements, never the whole storage
    except (RuntimeError, NotImplementedError) as exc:
        raise EncodeError(f"cannot read the tensor's data: {exc}") from None
    nbytes = tensor.nbytes  # the view's elements only (numel * element_size), not its storage
    shape = tensor.shape  # a torch.Size: a tuple of ints
    if nbytes == 0:
        return name, shape, memoryview(b""), None
    raw = (_c_ubyte * nbytes).from_address(tensor.data_ptr())
    # The ctypes array does not own the memory: the tensor is returned as the owner to keep. Its
    # memoryview is flat, of format "<B" (one unsigned byte per item).
    return name, shape, memoryview(raw), tensor


def encode_torch(torch: Any, tensor: Any) -> tuple[dict[str, Any], memoryview, Any]:
    """``(description, bytes view, owner)`` of a torch tensor (moved to the CPU if elsewhere)."""
    name, shape, view, owner = torch_buffer(torch, tensor)
    return {"dtype": name, "shape": list(shape)}, view, owner


@functools.lru_cache(maxsize=64)
def _torch_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _check_shape(shape: Any, max_ndim: int) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > max_ndim:
        raise ProtocolError(f"bad array shape {shape!r}")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim < _MAX_DIM:
            raise ProtocolError(f"bad array dimension {dim!r} in shape {shape!r}")
    return tuple(shape)


def _shape_and_count(shape: Any, max_ndim: int) -> tuple[tuple[int, ...], int]:
    """The checked shape (see ``_check_shape``) and its number of elements."""
    if type(shape) is list and len(shape) == 1 and max_ndim:  # the common case, checked directly
        count = shape[0]
        if type(count) is int and 0 <= count < _MAX_DIM:
            return (count,), count
    shape = _check_shape(shape, max_ndim)
    return shape, math.prod(shape)


_MAX_DIM = 1 << 62


def _import(name: str) -> Any:
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"an array arrived but {name} is not installed on this side") from None


_NUMPY_DTYPE_OBJECTS: dict[str, Any] = {}  # wire name -> numpy dtype, made on first use


def decode_numpy(description: Any, buffer: memoryview, max_ndim: int) -> Any:
    """A numpy array wrapping ``buffer`` (no copy), checked against its description."""
    if not isinstance(description, dict):
        raise ProtocolError("bad ndarray description")
    name = description.get("dtype")
    dtype = _NUMPY_DTYPE_OBJECTS.get(name)  # made once numpy is imported
    if dtype is None and name not in NUMPY_DTYPES:
        raise ProtocolError(f"unsupported numpy dtype {name!r}")
    shape, count = _shape_and_count(description.get("shape"), max_ndim)
    np = sys.modules.get("numpy") or _import("numpy")
    if dtype is None:
        dtype = _NUMPY_DTYPE_OBJECTS[name] = np.dtype(NUMPY_DTYPES[name])
    nbytes = count * dtype.itemsize
    if nbytes != buffer.nbytes:
        raise ProtocolError(
            f"array of shape {shape} and dtype {name} needs {nbytes} bytes, "
            f"its buffer has {buffer.nbytes}"
        )
    if count == 0:
        return np.empty(shape, dtype)
    array = np.frombuffer(buffer, dtype)  # the buffer holds exactly ``count`` items
    return array if len(shape) == 1 else array.reshape(shape)


def decode_torch(description: Any, buffer: memoryview, max_ndim: int) -> Any:
    """A CPU torch tensor wrapping ``buffer`` (no copy), checked against its description."""
    if not isinstance(description, dict):
        raise ProtocolError("bad tensor description")
    name = description.get("dtype")
    if type(name) is not str or name not in _TORCH_DTYPE_SET:
        raise ProtocolError(f"unsupported torch dtype {name!r}")
    shape, count = _shape_and_count(description.get("shape"), max_ndim)
    torch = sys.modules.get("torch") or _import("torch")
    dtype = _TORCH_DTYPE_OF.get(name)
    if dtype is None:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ProtocolError(f"torch dtype {name!r} does not exist in this torch version")
        _TORCH_DTYPE_OF[name] = dtype
    itemsize = dtype.itemsize
    if count * itemsize != buffer.nbytes:
        raise ProtocolError(
            f"tensor of shape {shape} and dtype {name} needs {count * itemsize} bytes, "
            f"its buffer has {buffer.nbytes}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(buffer, dtype=dtype)  # the buffer holds exactly ``count`` items
    return tensor if len(shape) == 1 else tensor.reshape(shape)
