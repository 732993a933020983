"""What `integrations-service healthcheck` reads from its environment, and how it says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrations_service.config import HealthcheckTls, load_healthcheck_settings
from integrations_service.errors import ConfigurationError

TLS_ENV = {
    "INTEGRATIONS_TLS_CERT": "/tls/server.crt",
    "INTEGRATIONS_HEALTHCHECK_CA": "/tls/ca.crt",
    "INTEGRATIONS_HEALTHCHECK_CERT": "/tls/health.crt",
    "INTEGRATIONS_HEALTHCHECK_KEY": "/tls/health.key",
}


def test_plaintext_service_at_the_listen_address_or_the_flag() -> None:
    assert load_healthcheck_settings(None, {}).address == "127.0.0.1:50051"
    from_env = load_healthcheck_settings(None, {"INTEGRATIONS_LISTEN_ADDRESS": "0.0.0.0:7000"})
    assert (from_env.address, from_env.tls) == ("0.0.0.0:7000", None)
    assert load_healthcheck_settings("127.0.0.1:1", {"INTEGRATIONS_LISTEN_ADDRESS": "0.0.0.0:7000"}).address == (
        "127.0.0.1:1"
    )


def test_tls_service_takes_the_health_checkers_files_and_the_name_to_verify() -> None:
    settings = load_healthcheck_settings(None, {**TLS_ENV, "INTEGRATIONS_HEALTHCHECK_SERVER_NAME": "svc.internal"})
    assert settings.tls == HealthcheckTls(
        Path("/tls/ca.crt"), Path("/tls/health.crt"), Path("/tls/health.key"), "svc.internal", Path("/tls/server.crt")
    )
    assert load_healthcheck_settings(None, TLS_ENV).tls.server_name is None  # type: ignore[union-attr]


def test_every_problem_is_named_by_its_env_var_at_once() -> None:
    env = {
        "INTEGRATIONS_TLS_CERT": "/tls/server.crt",
        "INTEGRATIONS_HEALTHCHECK_CERT": "/tls/health.crt",
        "INTEGRATIONS_LISTEN_ADDRESS": "no-port",
    }
    with pytest.raises(ConfigurationError) as raised:
        load_healthcheck_settings(None, env)
    message = str(raised.value)
    assert "INTEGRATIONS_HEALTHCHECK_CA is required" in message
    assert "INTEGRATIONS_HEALTHCHECK_KEY is required" in message
    assert "INTEGRATIONS_HEALTHCHECK_CERT" not in message
    assert "INTEGRATIONS_LISTEN_ADDRESS (or --address) must be host:port, got 'no-port'" in message
