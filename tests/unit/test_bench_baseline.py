"""bench/empty_server.py, the benchmark's do-nothing baseline, runs with the real server's gRPC options."""

from __future__ import annotations

from bench import empty_server
from integrations_service.api.server import Keepalive


def test_the_baseline_server_has_the_real_servers_options() -> None:
    # The service's options as `serve` builds them with the default settings (keepalive 60 s / 20 s).
    assert empty_server.server_options() == Keepalive().options()
