"""The opening handshake and the optional shared-token challenge-response.

Every connection starts with three tiny messages (no body is allowed before the handshake ends)::

    server -> client  {"kind": "hello", "auth": bool, "nonce": 32 random bytes as hex}
    client -> server  {"kind": "auth", "nonce": client nonce, "proof": HMAC or null}
    server -> client  {"kind": "welcome", "proof": HMAC or null}   (or an error, then close)

With a token both sides prove they know it without sending it: the client sends
``HMAC-SHA256(token, "socket_rpc client" | server nonce | client nonce)`` and the server answers
with the same over ``"socket_rpc server"``, so neither proof can be replayed or reflected. Proofs
are compared with :func:`hmac.compare_digest`. A client that holds a token refuses a server that
does not prove it knows the token too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from .errors import AuthenticationError, ProtocolError, RPCConnectionError
from .limits import HANDSHAKE_LIMITS
from .wire import Channel, pack

_NONCE_BYTES = 32


def _proof(token: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> str:
    message = b"socket_rpc " + role + b"\x00" + server_nonce + client_nonce
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def _nonce(header: dict[str, Any]) -> bytes:
    value = header.get("nonce")
    if not isinstance(value, str) or len(value) != 2 * _NONCE_BYTES:
        raise ProtocolError("the handshake carries no valid nonce")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError("the handshake nonce is not hex") from None


def _expect(channel: Channel, kind: str, deadline: float | None) -> dict[str, Any]:
    frame = channel.receive(deadline, HANDSHAKE_LIMITS)
    if frame is None:
        raise RPCConnectionError(
            f"the peer closed the connection before the handshake's {kind!r} (not a socket_rpc "
            "peer, TLS on one side only, or the server is at its connection limit)"
        )
    header = frame.header
    if header.get("kind") == "error" and header.get("type") == "AuthenticationError":
        raise AuthenticationError(str(header.get("message", "authentication failed")))
    if header.get("kind") != kind:
        raise ProtocolError(f"expected the handshake's {kind!r}, got {header.get('kind')!r}")
    return header


def server_handshake(channel: Channel, token: bytes | None, deadline: float | None) -> None:
    """Run the server's side; raises :class:`AuthenticationError` if the client has no proof."""
    server_nonce = secrets.token_bytes(_NONCE_BYTES)
    hello = {"kind": "hello", "auth": token is not None, "nonce": server_nonce.hex()}
    channel.send(pack(hello), deadline)
    reply = _expect(channel, "auth", deadline)
    client_nonce = _nonce(reply)
    proof = None
    if token is not None:
        given = reply.get("proof")
        expected = _proof(token, b"client", server_nonce, client_nonce)
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
            message = "authentication failed: the client did not prove it holds the server's token"
            refusal = {"kind": "error", "type": "AuthenticationError", "message": message}
            channel.send(pack(refusal), deadline)
            raise AuthenticationError(message)
        proof = _proof(token, b"server", server_nonce, client_nonce)
    channel.send(pack({"kind": "welcome", "proof": proof}), deadline)


def client_handshake(channel: Channel, token: bytes | None, deadline: float | None) -> None:
    """Run the client's side; raises :class:`AuthenticationError` on any mismatch of tokens."""
    hello = _expect(channel, "hello", deadline)
    server_nonce = _nonce(hello)
    if hello.get("auth") and token is None:
        raise AuthenticationError("the server requires a token and this client has none")
    client_nonce = secrets.token_bytes(_NONCE_BYTES)
    proof = None if token is None else _proof(token, b"client", server_nonce, client_nonce)
    channel.send(pack({"kind": "auth", "nonce": client_nonce.hex(), "proof": proof}), deadline)
    welcome = _expect(channel, "welcome", deadline)
    if token is not None:
        given = welcome.get("proof")
        expected = _proof(token, b"server", server_nonce, client_nonce)
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
            raise AuthenticationError(
                "the server did not prove it holds the token (wrong token, or not the server "
                "you meant)"
            )


def token_bytes(token: str | bytes | None) -> bytes | None:
    """The token as bytes (UTF-8 for str); ``None`` stays ``None``; empty tokens are refused."""
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode()
    if not isinstance(token, bytes) or not token:
        raise ValueError("the token must be a non-empty str or bytes")
    return token
