"""A tensor of 256 MiB goes there and back intact (memory: about three copies of it in all)."""

from __future__ import annotations

import torch

from socket_rpc import Client


def test_a_256_mib_tensor_round_trips(client: Client) -> None:
    x = torch.arange(64 << 20, dtype=torch.int32)  # 256 MiB, every element distinct
    x[::4097] = -7
    y = client.echo(x)
    assert y.dtype == torch.int32 and y.shape == x.shape
    assert torch.equal(y, x)
    del y
    # A second one, reusing the server's and the client's receive buffers, still intact.
    z = client.echo(x.view(torch.bfloat16)[1:].view(-1, 7))
    assert z.dtype == torch.bfloat16
    assert torch.equal(z.view(torch.int16), x.view(torch.int16)[1:].view(-1, 7))
