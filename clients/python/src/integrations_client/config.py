"""Connection settings: TLS files, the environment, and the gRPC channel options every client uses."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from integrations_client.errors import ConfigurationError

__all__ = ["ENV_CA", "ENV_CERT", "ENV_KEY", "ENV_TARGET", "TlsConfig"]

ENV_TARGET = "INTEGRATIONS_SERVICE_TARGET"
ENV_CA = "INTEGRATIONS_CLIENT_CA"
ENV_CERT = "INTEGRATIONS_CLIENT_CERT"
ENV_KEY = "INTEGRATIONS_CLIENT_KEY"

SERVICE_NAME = "integrations.v1.IntegrationService"
# Reads are safe to repeat; writes are never retried by the client (a lost reply
# would otherwise apply a save twice, or turn a delete into NOT_FOUND).
RETRIED_METHODS = ("ListProviders", "GetProviderConfig")
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE_NAME, "method": method} for method in RETRIED_METHODS],
            "retryPolicy": RETRY_POLICY,
        }
    ]
}


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS: the CA that signed the service's certificate, and this client's certificate and key (PEM files).

    `server_name_override` checks the service's certificate against that name
    instead of the target's host (for tests, or an address the certificate does not name).
    """

    ca_file: str | os.PathLike[str]
    cert_file: str | os.PathLike[str]
    key_file: str | os.PathLike[str]
    server_name_override: str | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Reads the three files (ConfigurationError naming the one that cannot be read)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read("ca_file", self.ca_file),
            private_key=_read("key_file", self.key_file),
            certificate_chain=_read("cert_file", self.cert_file),
        )


def _read(name: str, path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigurationError(f"TlsConfig.{name}: cannot read {os.fspath(path)!r}: {error.strerror}") from None


def channel_options(tls: TlsConfig | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.service_config_disable_resolution", 1),  # this config, never one from DNS
        # The server accepts pings every 20 s or more, also between calls.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Notice a restarted service within seconds, not the default two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.primary_user_agent", "integrations-client-python/1"),
    ]
    if tls is not None and tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", tls.server_name_override))
    return options


def env_settings(environ: Mapping[str, str] | None) -> tuple[str, TlsConfig | None]:
    """(target, tls) from INTEGRATIONS_SERVICE_TARGET and INTEGRATIONS_CLIENT_CA/_CERT/_KEY.

    TLS when the three files are set, plaintext when none is; an empty variable counts as unset.
    """
    env = os.environ if environ is None else environ
    target = env.get(ENV_TARGET, "").strip()
    if not target:
        raise ConfigurationError(f"{ENV_TARGET} is not set (host:port of the integrations service)")
    files = {name: env.get(name, "").strip() for name in (ENV_CA, ENV_CERT, ENV_KEY)}
    missing = [name for name, value in files.items() if not value]
    if len(missing) == len(files):
        return target, None
    if missing:
        raise ConfigurationError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: mutual TLS needs "
            f"{ENV_CA}, {ENV_CERT} and {ENV_KEY} together (or none of them for plaintext)"
        )
    return target, TlsConfig(ca_file=files[ENV_CA], cert_file=files[ENV_CERT], key_file=files[ENV_KEY])
