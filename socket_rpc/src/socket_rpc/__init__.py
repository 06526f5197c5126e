"""socket_rpc."""
