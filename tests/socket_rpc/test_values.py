"""Round trips of every supported value, bit-exact; refusal of everything else at the sender."""

from __future__ import annotations

import ctypes
import enum
import json
import math
import socket

import numpy as np
import pytest
import torch

from socket_rpc import Client, EncodeError, RemoteError
from socket_rpc.arrays import NUMPY_DTYPES, TORCH_DTYPES
from socket_rpc.codec import Decoder, Encoder
from socket_rpc.limits import Limits
from socket_rpc.wire import PREFIX, Channel, Packed, pack, pack_text, to_json

from .conftest import Calls


def _torch_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""


def _random_torch(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = math.prod(shape) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def _random_numpy(name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    dtype = np.dtype(NUMPY_DTYPES[name])
    if name == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    n = math.prod(shape) * dtype.itemsize
    return rng.integers(0, 256, n, dtype=np.uint8).view(dtype).reshape(shape)


PLAIN_VALUES = [
    None,
    True,
    False,
    0,
    -7,
    2**200,
    -(2**64) - 1,
    0.1,
    -0.0,
    float("inf"),
    float("-inf"),
    1e-310,
    "",
    "héllo ☃ \x00 \ud800",
    b"",
    b"\x00\xffbytes",
    [],
    (),
    {},
    [1, [2, [3, (4, {"k": [None]})]]],
    (1, "a", b"b", [2.5], ()),
    {"tuple": [1, 2], "dict": {"bytes": 3}, "ndarray": None, "": {}},
]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=repr)
def test_plain_values_round_trip_with_their_types(client: Client, value: object) -> None:
    back = client.echo(value)
    assert back == value
    assert repr(back) == repr(value)  # same types all the way down (tuple stays tuple, ...)


def test_nan_round_trips(client: Client) -> None:
    assert math.isnan(client.echo(float("nan")))


def test_args_and_kwargs_arrive_as_sent(client: Client) -> None:
    expected = ([1, (2,)], {"key": b"v", "other": [None]})
    assert client.echo(1, (2,), key=b"v", other=[None]) == expected


def test_subclasses_of_plain_types_are_sent_as_the_plain_type(client: Client) -> None:
    class Color(enum.IntEnum):
        RED = 3

    assert client.echo([Color.RED, np.float64(0.5)]) == [3, 0.5]
    assert type(client.echo(Color.RED)) is int


@pytest.mark.parametrize("name", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (), (0,), (2, 0, 3), (1, 1, 1, 7)])
def test_numpy_arrays_of_every_dtype_round_trip_bit_exact(
    client: Client, name: str, shape: tuple[int, ...]
) -> None:
    x = _random_numpy(name, shape)
    y = client.echo(x)
    assert type(y) is np.ndarray
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.tobytes() == x.tobytes()


AVAILABLE_TORCH_DTYPES = [
    n for n in TORCH_DTYPES if isinstance(getattr(torch, n, None), torch.dtype)
]


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("name", AVAILABLE_TORCH_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (), (0,), (2, 0, 3)])
def test_torch_tensors_of_every_dtype_round_trip_bit_exact(
    client: Client, name: str, shape: tuple[int, ...]
) -> None:
    x = _random_torch(getattr(torch, name), shape)
    y = client.echo(x)
    assert isinstance(y, torch.Tensor)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device.type == "cpu"
    assert _torch_bytes(y) == _torch_bytes(x)


def test_bfloat16_values_survive(client: Client) -> None:
    x = torch.tensor([1.0, -2.5, 3.140625, float("inf")], dtype=torch.bfloat16)
    y = client.echo(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, x)


def test_non_contiguous_views_send_only_their_own_bytes(client: Client) -> None:
    base = _random_numpy("float32", (64, 64))
    view = base[::4, 1::8]
    assert not view.flags.c_contiguous
    assert np.array_equal(client.echo(view), view)
    tbase = _random_torch(torch.bfloat16, (64, 64))
    tview = tbase.t()[3:9, ::5]
    assert not tview.is_contiguous()
    assert _torch_bytes(client.echo(tview)) == _torch_bytes(tview)

    for value, whole in ((view, base.nbytes), (tview, tbase.numel() * 2)):
        encoder = Encoder()
        tree = encoder.encode(value)
        message = pack({"value": tree}, encoder.buffers)
        assert (
            sum(b.nbytes for b in encoder.buffers) == value.nbytes
            if isinstance(value, np.ndarray)
            else value.numel() * 2
        )
        assert message.size < whole // 4  # the base's storage never travels


def test_torch_views_with_storage_offset_grad_conj_and_neg(client: Client) -> None:
    t = torch.arange(20, dtype=torch.float32)[5:9]
    assert torch.equal(client.echo(t), t)
    p = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(client.echo(p), torch.ones(3))
    c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()
    assert torch.equal(client.echo(c), c.resolve_conj())
    n = torch.tensor([1 + 2j], dtype=torch.complex64).conj().imag
    assert torch.equal(client.echo(n), torch.tensor([-2.0]))


def test_big_endian_numpy_arrays_arrive_with_the_same_values(client: Client) -> None:
    x = np.arange(6, dtype=">i4").reshape(2, 3)
    y = client.echo(x)
    assert y.dtype == np.dtype("<i4")
    assert np.array_equal(y, x)


def test_received_arrays_wrap_the_received_buffer_and_are_writable(client: Client) -> None:
    y = client.echo(np.arange(100_000, dtype=np.float64))
    assert not y.flags.owndata  # a view on the received body, not a copy
    y[0] = 42.0
    t = client.echo(torch.arange(100_000, dtype=torch.float64))
    t[0] = 42.0
    assert t[0] == 42.0


def test_kept_results_are_never_overwritten_by_later_replies(client: Client) -> None:
    # Large bodies reuse a buffer once nothing references it: results still held must not change.
    first = client.echo(np.full(1 << 20, 1, dtype=np.uint8))
    second = client.echo(np.full(1 << 20, 2, dtype=np.uint8))
    third_t = client.echo(torch.full((1 << 20,), 3, dtype=torch.uint8))
    del second
    fourth = client.echo(np.full(1 << 20, 4, dtype=np.uint8))
    assert (first == 1).all() and bool((third_t == 3).all()) and (fourth == 4).all()


@pytest.mark.parametrize(
    "value",
    [
        object(),
        {1: "int key"},
        {1.5},
        frozenset(),
        bytearray(b"x"),
        1 + 2j,
        np.float32(1.0),
        np.ma.masked_array([1, 2], mask=[0, 1]),
        np.array(["text"]),
        np.zeros(2, dtype=[("a", "<i4")]),
        torch.zeros(2).to_sparse(),
        [1, [2, {"deep": object()}]],
    ],
    ids=lambda v: type(v).__name__,
)
def test_unsupported_values_are_refused_at_the_sender(
    client: Client, calls: Calls, value: object
) -> None:
    with pytest.raises(EncodeError):
        client.echo(value)
    assert calls.count == 0
    assert client.echo(1) == 1  # the connection is still fine


def test_an_unsendable_return_value_is_a_remote_error(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.unsendable()
    assert info.value.type_name == "EncodeError"
    assert "object" in info.value.remote_message


def test_nesting_deeper_than_the_limit_is_refused(client: Client) -> None:
    value: list = []
    for _ in range(100):
        value = [value]
    with pytest.raises(EncodeError):
        client.echo(value)


class _Small(enum.IntEnum):
    ONE = 1


WRITTEN_VALUES = [
    *PLAIN_VALUES,
    float("nan"),
    [_Small.ONE, np.float64(0.5), "x"],
    np.arange(6, dtype=np.float32),
    np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian: sent little-endian
    np.zeros((2, 0, 3), dtype=np.complex64),
    np.float64(2.5) * np.ones(()),  # 0-d
    np.arange(16, dtype=np.uint8).reshape(4, 4)[:, ::2],  # not contiguous
    torch.arange(5, dtype=torch.bfloat16),
    torch.nn.Parameter(torch.ones(2, 3)),
    torch.zeros(0, 4),
    ([np.ones(3), {"k": (torch.ones(2), b"raw")}], {"nested": [np.zeros(1, dtype=bool)]}),
]


@pytest.mark.parametrize("value", WRITTEN_VALUES, ids=lambda v: type(v).__name__)
def test_written_json_is_the_json_of_the_encoded_tree(value: object) -> None:
    # The client and server write headers as JSON text directly: the same bytes as the tree.
    tree_encoder, text_encoder = Encoder(), Encoder()
    tree = tree_encoder.encode(value)
    written = text_encoder.write(value)
    assert written == to_json(tree)
    assert [bytes(b) for b in text_encoder.buffers] == [bytes(b) for b in tree_encoder.buffers]
    packed_tree = pack({"kind": "result", "id": 3, "value": tree}, tree_encoder.buffers)
    packed_text = pack_text('{"kind":"result","id":3,"value":' + written, text_encoder.buffers)
    assert packed_text.head == packed_tree.head
    assert [bytes(p) for p in packed_text.parts] == [bytes(p) for p in packed_tree.parts]


@pytest.mark.parametrize(
    "value",
    [object(), {1: "x"}, [[[[1]]]], np.array(["text"]), 10**5000, torch.zeros(2).to_sparse()],
    ids=lambda v: type(v).__name__,
)
def test_written_json_refuses_what_the_tree_refuses(value: object) -> None:
    with pytest.raises(EncodeError) as tree_error:
        pack({"value": Encoder(max_depth=3).encode(value)})
    with pytest.raises(EncodeError) as text_error:
        Encoder(max_depth=3).write(value)
    assert str(text_error.value) == str(tree_error.value)


def test_the_client_writes_the_call_header_pack_would(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[Packed] = []
    real_send = Channel.send

    def recording_send(self: Channel, message: Packed, deadline: float | None = None) -> None:
        if message.head.startswith(b'{"kind":"call"', PREFIX.size):  # not the server's replies
            sent.append(message)
        real_send(self, message, deadline)

    monkeypatch.setattr(Channel, "send", recording_send)
    x, t = np.arange(3, dtype=np.float32), torch.ones(2, dtype=torch.bfloat16)
    for args, kwargs in [((), {}), ((x,), {}), ((1, "é"), {"k": t, "b": b"raw"})]:
        client.echo(*args, **kwargs)
        encoder = Encoder()
        header = {"kind": "call", "id": None, "function": "echo"}
        header["args"] = [encoder.encode(a) for a in args]
        if kwargs:
            header["kwargs"] = encoder.encode(kwargs)
        message = sent[-1]
        header["id"] = json.loads(message.head[PREFIX.size :])["id"]
        expected = pack(header, encoder.buffers)
        assert message.head == expected.head
        assert [bytes(p) for p in message.parts] == [bytes(p) for p in expected.parts]


def test_small_results_kept_or_dropped_never_change(client: Client) -> None:
    # Small bodies arrive through the channel's staging buffer: a result still held must never
    # be overwritten by a later reply.
    kept = []
    for i in range(30):
        y = client.echo(np.full(4096, i, dtype=np.float32))
        t = client.echo(torch.full((100,), i, dtype=torch.int32))
        if i % 4 == 0:
            kept.append((i, y, t))
        del y, t
    for i, y, t in kept:
        assert (y == i).all() and bool((t == i).all())


def test_a_channel_never_writes_into_a_buffer_a_received_array_views() -> None:
    a, b = socket.socketpair()
    channel = Channel(b, Limits())
    kept = []
    try:
        for batch in range(4):
            messages = []
            for i in range(5):  # sent together: one receive stages several messages
                encoder = Encoder()
                tree = encoder.encode(np.full(1000, batch * 10 + i, dtype=np.int64))
                message = pack({"v": tree}, encoder.buffers)
                messages.append(message.head + b"".join(bytes(p) for p in message.parts))
            a.sendall(b"".join(messages))
            for i in range(5):
                frame = channel.receive()
                assert frame is not None
                value = Decoder(frame.buffers, Limits()).decode(frame.header["v"])
                del frame
                if (batch + i) % 3 == 0:
                    kept.append((batch * 10 + i, value))
                del value
        for expected, value in kept:
            assert (value == expected).all()
    finally:
        a.close()
        channel.close()
