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

import sys
from typing import Any

from . import arrays
from .errors import EncodeError, ProtocolError
from .limits import Limits

_SCALARS = (type(None), bool, str)


class Encoder:
    """Collects the raw buffers of the values it encodes (and the objects that own them)."""

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

    @staticmethod
    def _key(key: Any) -> str:
        if not isinstance(key, str):
            raise EncodeError(f"dict keys must be str, got {type(key).__name__} {key!r}")
        return str(key)

    def _encode_other(self, value: Any, depth: int) -> Any:
        # numpy and torch can only be in use if they are imported already: never import here.
        np = sys.modules.get("numpy")
        if np is not None and isinstance(value, np.ndarray):
            return {"ndarray": self._array(*arrays.encode_numpy(np, value))}
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(value, torch.Tensor):
            return {"tensor": self._array(*arrays.encode_torch(torch, value))}
        # Subclasses of the plain types are sent as the plain type (an IntEnum as its int).
        for base in (bool, int, float, str, bytes, list, tuple, dict):
            if isinstance(value, base):
                return self.encode(base(value), depth)
        raise EncodeError(
            f"cannot send a value of type {type(value).__module__}.{type(value).__qualname__}: "
            "socket_rpc sends None, bool, int, float, str, bytes, list, tuple, dict with str "
            "keys, numpy arrays and torch tensors (convert it to one of these)"
        )

    def _array(self, description: dict[str, Any], view: memoryview, owner: Any) -> dict[str, Any]:
        self.buffers.append(view)
        self.owners.append(owner)
        description["buffer"] = len(self.buffers) - 1
        return description


class Decoder:
    """Turns a received JSON tree and its raw buffers back into values, validating as it goes."""

    def __init__(self, buffers: list[memoryview], limits: Limits) -> None:
        self._buffers = buffers
        self._used = [False] * len(buffers)
        self._limits = limits

    def decode(self, tree: Any, depth: int = 0) -> Any:
        """The value of ``tree``. Raises :class:`ProtocolError` on anything malformed."""
        kind = type(tree)
        if kind in _SCALARS or kind is int or kind is float:
            return tree
        if depth >= self._limits.max_depth:
            raise ProtocolError(f"value nested deeper than {self._limits.max_depth} levels")
        if kind is list:
            return [self.decode(item, depth + 1) for item in tree]
        if kind is not dict or len(tree) != 1:
            raise ProtocolError(f"malformed value in the message: {_short(tree)}")
        ((tag, body),) = tree.items()
        if tag == "tuple" and type(body) is list:
            return tuple(self.decode(item, depth + 1) for item in body)
        if tag == "dict" and type(body) is dict:
            return {k: self.decode(v, depth + 1) for k, v in body.items()}
        if tag == "bytes":
            return bytes(self._take(body))
        if tag in ("ndarray", "tensor") and type(body) is dict:
            decode = arrays.decode_numpy if tag == "ndarray" else arrays.decode_torch
            buffer = self._take(body.get("buffer"))
            try:
                return decode(body, buffer, self._limits.max_ndim)
            except (ValueError, TypeError, OverflowError, RuntimeError, MemoryError) as exc:
                raise ProtocolError(f"cannot build the {tag} {_short(body)}: {exc}") from None
        raise ProtocolError(f"malformed value in the message: {_short(tree)}")

    def _take(self, index: Any) -> memoryview:
        if type(index) is not int or not 0 <= index < len(self._buffers):
            raise ProtocolError(f"reference to a raw buffer that does not exist: {index!r}")
        if self._used[index]:
            raise ProtocolError(f"raw buffer {index} is referenced twice")
        self._used[index] = True
        return self._buffers[index]


def _short(tree: Any) -> str:
    text = repr(tree)
    return text if len(text) <= 80 else text[:77] + "..."


def encode_values(*values: Any, max_depth: int = 64) -> tuple[list[Any], Encoder]:
    """Encode several values with one encoder: their trees and the encoder holding the buffers."""
    encoder = Encoder(max_depth)
    return [encoder.encode(v) for v in values], encoder
