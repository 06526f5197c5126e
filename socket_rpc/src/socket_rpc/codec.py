"""Values to a JSON tree plus raw buffers, and back. Nothing is pickled, ever.

The tree uses JSON's own null, booleans, numbers, strings and arrays (= Python ``list``); every
other value is a JSON object with exactly one key naming its kind::

    {"tuple": [...]}                              a tuple
    {"dict": {"key": ...}}                        a dict with str keys
    {"bytes": 3}                                  bytes: raw buffer 3
    {"ndarray": {"dtype", "shape", "buffer"}}     a numpy array: raw buffer "buffer"
    {"tensor": {"dtype", "shape", "buffer"}}      a torch tensor (bfloat16 etc. by name)

A value of any other type is refused by the sender with :class:`EncodeError`; a tree that does not
follow this grammar is refused by the receiver with :class:`ProtocolError`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from . import arrays
from .errors import EncodeError, ProtocolError
from .limits import Limits

_SCALARS = (type(None), bool, str)

# The JSON writer's pieces: the C string escaper json itself uses, and the reprs it uses for
# numbers (with json's spelling of the special floats).
json_string = getattr(json.encoder, "c_encode_basestring_ascii", None) or (
    json.encoder.py_encode_basestring_ascii
)
"""``json_string(text)``: ``text`` as a JSON string literal (ASCII, escaped as json does)."""
_int_repr = int.__repr__
_float_repr = float.__repr__
_SPECIAL_FLOATS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_LITERALS = {None: "null", True: "true", False: "false"}

# numpy's and torch's array types once either is imported (``is`` checks on the hot path).
_ndarray: Any = None
_tensor: Any = None


def _array_module(value: Any) -> tuple[str, Any] | None:
    """``("ndarray", numpy)`` or ``("tensor", torch)`` if ``value`` is one of theirs, else None.

    numpy and torch can only be in use if they are imported already: this never imports them.
    """
    global _ndarray, _tensor
    np = sys.modules.get("numpy")
    if np is not None:
        _ndarray = np.ndarray
        if isinstance(value, np.ndarray):
            return "ndarray", np
    torch = sys.modules.get("torch")
    if torch is not None:
        _tensor = torch.Tensor
        if isinstance(value, torch.Tensor):
            return "tensor", torch
    return None


def _array_parts(value: Any) -> tuple[str, str, tuple[int, ...], memoryview, Any] | None:
    """``(tag, wire dtype name, shape, bytes view, owner)`` of a numpy array or torch tensor
    (see :func:`~socket_rpc.arrays.numpy_buffer`), None for any other value."""
    found = _array_module(value)
    if found is None:
        return None
    tag, module = found
    to_buffer = arrays.numpy_buffer if tag == "ndarray" else arrays.torch_buffer
    return (tag, *to_buffer(module, value))


def _refuse(value: Any) -> EncodeError:
    return EncodeError(
        f"cannot send a value of type {type(value).__module__}.{type(value).__qualname__}: "
        "socket_rpc sends None, bool, int, float, str, bytes, list, tuple, dict with str "
        "keys, numpy arrays and torch tensors (convert it to one of these)"
    )


_numpy_name_of = arrays.NUMPY_NAME_OF
_decode_numpy = arrays.decode_numpy
_decode_torch = arrays.decode_torch
_PLAIN_BASES = (bool, int, float, str, bytes, list, tuple, dict)


class Encoder:
    """Collects the raw buffers of the values it encodes (and the objects that own them).

    :meth:`encode` makes a value's JSON tree; :meth:`write` writes the same tree straight as JSON
    text (what the client and server send, without building the tree first).
    """

    __slots__ = ("buffers", "owners", "_max_depth")

    def __init__(self, max_depth: int = 64) -> None:
        self.buffers: list[memoryview] = []
        self.owners: list[Any] = []
        self._max_depth = max_depth

    def encode(self, value: Any, depth: int = 0) -> Any:
        """The JSON tree of ``value``; its raw buffers are appended to ``self.buffers``."""
        kind = type(value)
        if kind in _SCALARS or kind is int or kind is float:
            return value
        if depth >= self._max_depth:
            raise EncodeError(f"value nested deeper than {self._max_depth} levels")
        if kind is list:
            return [self.encode(item, depth + 1) for item in value]
        if kind is tuple:
            return {"tuple": [self.encode(item, depth + 1) for item in value]}
        if kind is dict:
            return {"dict": {self._key(k): self.encode(v, depth + 1) for k, v in value.items()}}
        if kind is bytes:
            self.buffers.append(memoryview(value))
            return {"bytes": len(self.buffers) - 1}
        return self._encode_other(value, depth)

    def write(self, value: Any, depth: int = 0) -> str:
        """The JSON text of :meth:`encode`'s tree of ``value``, as the header's JSON encoder
        writes it (compact), with the raw buffers appended to ``self.buffers`` the same way.

        Raises :class:`EncodeError` for the same values as :meth:`encode`, and for an int too
        long to write (as :func:`~socket_rpc.wire.pack` does).
        """
        kind = type(value)
        if kind is str:
            return json_string(value)
        if kind is int:
            return _int_text(value)
        if kind is float:
            text = _float_repr(value)
            return _SPECIAL_FLOATS.get(text, text)
        if kind is bool or value is None:
            return _LITERALS[value]
        if depth >= self._max_depth:
            raise EncodeError(f"value nested deeper than {self._max_depth} levels")
        if kind is _ndarray:
            # The usual array (a dtype sent before, C-contiguous) is written here; anything else
            # goes through numpy_buffer, which this does the same as.
            name = _numpy_name_of.get(value.dtype)
            if name is not None:
                view = memoryview(value)
                flat = None
                if view.c_contiguous:
                    try:
                        flat = view.cast("B")
                    except TypeError:  # complex, or zeros in the shape: numpy_buffer's way
                        pass
                if flat is not None:
                    return self._write_array("ndarray", name, value.shape, flat, value)
            np = sys.modules["numpy"]
            return self._write_array("ndarray", *arrays.numpy_buffer(np, value))
        if kind is _tensor:
            torch = sys.modules["torch"]
            return self._write_array("tensor", *arrays.torch_buffer(torch, value))
        if kind is list:
            return "[" + ",".join([self.write(item, depth + 1) for item in value]) + "]"
        if kind is tuple:
            return '{"tuple":[' + ",".join([self.write(item, depth + 1) for item in value]) + "]}"
        if kind is dict:
            items = [
                json_string(self._key(k)) + ":" + self.write(v, depth + 1) for k, v in value.items()
            ]
            return '{"dict":{' + ",".join(items) + "}}"
        if kind is bytes:
            self.buffers.append(memoryview(value))
            return f'{{"bytes":{len(self.buffers) - 1}}}'
        found = _array_parts(value)
        if found is not None:
            return self._write_array(*found)
        # Subclasses of the plain types are sent as the plain type (an IntEnum as its int).
        for base in _PLAIN_BASES:
            if isinstance(value, base):
                return self.write(base(value), depth)
        raise _refuse(value)

    @staticmethod
    def _key(key: Any) -> str:
        if not isinstance(key, str):
            raise EncodeError(f"dict keys must be str, got {type(key).__name__} {key!r}")
        return str(key)

    def _encode_other(self, value: Any, depth: int) -> Any:
        found = _array_parts(value)
        if found is not None:
            tag, name, shape, view, owner = found
            self.buffers.append(view)
            self.owners.append(owner)
            description = {"dtype": name, "shape": list(shape), "buffer": len(self.buffers) - 1}
            return {tag: description}
        # Subclasses of the plain types are sent as the plain type (an IntEnum as its int).
        for base in _PLAIN_BASES:
            if isinstance(value, base):
                return self.encode(base(value), depth)
        raise _refuse(value)

    def _write_array(
        self, tag: str, name: str, shape: tuple[int, ...], view: memoryview, owner: Any
    ) -> str:
        self.buffers.append(view)
        self.owners.append(owner)
        dims = f"{shape[0]}" if len(shape) == 1 else ",".join(map(str, shape))
        index = len(self.buffers) - 1
        return f'{{"{tag}":{{"dtype":"{name}","shape":[{dims}],"buffer":{index}}}}}'


def _int_text(value: int) -> str:
    try:
        return _int_repr(value)
    except ValueError as exc:  # e.g. more digits than int-to-str conversion allows
        raise EncodeError(f"cannot encode the message header: {exc}") from None


class Decoder:
    """Turns a received JSON tree and its raw buffers back into values, validating as it goes."""

    __slots__ = ("_buffers", "_used", "_limits", "_max_depth")

    def __init__(self, buffers: list[memoryview], limits: Limits) -> None:
        self._buffers = buffers
        self._used = [False] * len(buffers)
        self._limits = limits
        self._max_depth = limits.max_depth

    def decode(self, tree: Any, depth: int = 0) -> Any:
        """The value of ``tree``. Raises :class:`ProtocolError` on anything malformed."""
        kind = type(tree)
        if kind in _SCALARS or kind is int or kind is float:
            return tree
        if depth >= self._max_depth:
            raise ProtocolError(f"value nested deeper than {self._max_depth} levels")
        if kind is list:
            if len(tree) == 1:  # e.g. a call's single argument: no comprehension to set up
                return [self.decode(tree[0], depth + 1)]
            return [self.decode(item, depth + 1) for item in tree]
        if kind is not dict or len(tree) != 1:
            raise ProtocolError(f"malformed value in the message: {_short(tree)}")
        ((tag, body),) = tree.items()
        if (tag == "ndarray" or tag == "tensor") and type(body) is dict:
            decode = _decode_numpy if tag == "ndarray" else _decode_torch
            buffer = self._take(body.get("buffer"))
            try:
                return decode(body, buffer, self._limits.max_ndim)
            except (ValueError, TypeError, OverflowError, RuntimeError, MemoryError) as exc:
                raise ProtocolError(f"cannot build the {tag} {_short(body)}: {exc}") from None
        if tag == "tuple" and type(body) is list:
            return tuple([self.decode(item, depth + 1) for item in body])
        if tag == "dict" and type(body) is dict:
            return {k: self.decode(v, depth + 1) for k, v in body.items()}
        if tag == "bytes":
            return bytes(self._take(body))
        raise ProtocolError(f"malformed value in the message: {_short(tree)}")

    def _take(self, index: Any) -> memoryview:
        if type(index) is not int or not 0 <= index < len(self._buffers):
            raise ProtocolError(f"reference to a raw buffer that does not exist: {index!r}")
        used = self._used
        if used[index]:
            raise ProtocolError(f"raw buffer {index} is referenced twice")
        used[index] = True
        return self._buffers[index]


def _short(tree: Any) -> str:
    text = repr(tree)
    return text if len(text) <= 80 else text[:77] + "..."


def encode_values(*values: Any, max_depth: int = 64) -> tuple[list[Any], Encoder]:
    """Encode several values with one encoder: their trees and the encoder holding the buffers."""
    encoder = Encoder(max_depth)
    return [encoder.encode(v) for v in values], encoder
