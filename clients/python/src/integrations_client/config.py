"""Connection settings: TLS files, the environment, and the gRPC channel options every client uses."""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from integrations_client.errors import ConfigurationError

__all__ = ["ENV_CA", "ENV_CERT", "ENV_KEY", "ENV_TARGET", "ENV_WATCH", "TlsConfig"]

ENV_TARGET = "INTEGRATIONS_SERVICE_TARGET"
ENV_CA = "INTEGRATIONS_CLIENT_CA"
ENV_CERT = "INTEGRATIONS_CLIENT_CERT"
ENV_KEY = "INTEGRATIONS_CLIENT_KEY"
ENV_WATCH = "INTEGRATIONS_CLIENT_WATCH"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

log = logging.getLogger("integrations_client")

# How often a call may look at the TLS files (three stat calls) for a new certificate.
TLS_CHECK_INTERVAL = 1.0
# The longest the asyncio client lets a replaced channel's calls finish before closing it (they have deadlines;
# the sync client counts them and closes the channel when the last one ends).
RETIRED_CHANNEL_GRACE = 60.0

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
        """Reads and checks the three files (ConfigurationError naming the one that cannot be used)."""
        ca = _read("ca_file", self.ca_file)
        key = _read("key_file", self.key_file)
        cert = _read("cert_file", self.cert_file)
        _check(self, ca)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def _paths(self) -> tuple[tuple[str, str | os.PathLike[str]], ...]:
        return (("ca_file", self.ca_file), ("cert_file", self.cert_file), ("key_file", self.key_file))


def _read(name: str, path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigurationError(f"TlsConfig.{name}: cannot read {os.fspath(path)!r}: {error.strerror}") from None


def _refuse_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


def _check(tls: TlsConfig, ca: bytes) -> None:
    """The CA parses, and the certificate and key load and belong together (gRPC itself only finds out in a handshake).

    The texts of ssl's errors name the problem (e.g. KEY_VALUES_MISMATCH), never key bytes.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as error:
        raise ConfigurationError(
            f"TlsConfig.ca_file: {os.fspath(tls.ca_file)!r} holds no usable CA certificate ({_why(error)})"
        ) from None
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_password)
    except (ssl.SSLError, OSError) as error:
        raise ConfigurationError(
            f"TlsConfig.cert_file/key_file: {os.fspath(tls.cert_file)!r} and {os.fspath(tls.key_file)!r} "
            f"are not a certificate and its private key ({_why(error)})"
        ) from None


def _why(error: Exception) -> str:
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None)
    return str(reason) if reason else type(error).__name__


_Stamp = tuple[tuple[int, int, int], ...]


class _StillChanging(Exception):
    """The files changed while they were read: read them again at the next check."""


class ReloadingTls:
    """The client's TLS files, re-read when they change; the last set that loaded stays in use.

    gRPC fixes credentials per channel, so the clients ask `changed()` before a
    call and, when it says so, open a new channel with `credentials` and retire
    the old one once its calls have finished. Looking costs three stat calls,
    at most once per `interval` seconds. A new set that does not load (a
    missing file, a certificate that does not match its key, a half-written
    file) is logged on "integrations_client" and ignored until the files change
    again: the previous certificate keeps working until it expires.
    """

    def __init__(
        self, tls: TlsConfig, interval: float = TLS_CHECK_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._tls = tls
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # A bad set at start-up raises ConfigurationError: there is nothing to keep using.
        self.credentials, self._loaded = self._load(racing_is_fine=True)
        self._refused: _Stamp | None = None
        self._last_refusal: tuple[_Stamp | None, str] | None = None
        self._next_check = clock() + interval

    def changed(self) -> bool:
        """True once each time a new, valid set of files has been loaded into `credentials`."""
        if self._clock() < self._next_check:
            return False
        with self._lock:
            now = self._clock()
            if now < self._next_check:
                return False
            self._next_check = now + self._interval
            try:
                stamp = self._stamp()
            except ConfigurationError as error:
                self._refuse(None, str(error))
                return False
            if stamp in (self._loaded, self._refused):
                return False
            try:
                credentials, stamp = self._load()
            except _StillChanging:
                return False
            except ConfigurationError as error:
                self._refuse(stamp, str(error))
                return False
            self.credentials, self._loaded, self._refused = credentials, stamp, None
        log.info(
            "the TLS files changed: new connections use the new certificate",
            extra={"event": "tls_reloaded", "cert_file": os.fspath(self._tls.cert_file)},
        )
        return True

    def _refuse(self, stamp: _Stamp | None, why: str) -> None:
        if (stamp, why) != self._last_refusal:  # once per new state of the files, not once a second
            log.warning(
                "the TLS files changed but cannot be used; keeping the previous certificate: %s",
                why,
                extra={"event": "tls_reload_failed"},
            )
        self._refused, self._last_refusal = stamp, (stamp, why)

    def _stamp(self) -> _Stamp:
        stamps = []
        for name, path in self._tls._paths():
            try:
                info = os.stat(path)
            except OSError as error:
                raise ConfigurationError(
                    f"TlsConfig.{name}: cannot read {os.fspath(path)!r}: {error.strerror}"
                ) from None
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
        return tuple(stamps)

    def _load(self, racing_is_fine: bool = False) -> tuple[grpc.ChannelCredentials, _Stamp]:
        before = self._stamp()
        credentials = self._tls.channel_credentials()
        if self._stamp() != before and not racing_is_fine:
            raise _StillChanging
        # The stamp from before the read: if the files changed during it, the next check loads them again.
        return credentials, before


# gRPC target prefixes of a local socket: no network in between.
_LOCAL_SCHEMES = ("unix:", "unix-abstract:")
_RESOLVER_SCHEMES = ("dns:///", "dns:", "ipv4:", "ipv6:", "passthrough:///")


def is_loopback_target(target: str) -> bool:
    """Whether `target` reaches this machine only: a loopback address (127.0.0.0/8, ::1, localhost) or a local
    socket. What the service itself serves plaintext on; anything else would carry credentials over a network."""
    rest = target.strip().lower()
    if rest.startswith(_LOCAL_SCHEMES):
        return True
    for scheme in _RESOLVER_SCHEMES:
        if rest.startswith(scheme):
            rest = rest[len(scheme) :]
            break
    if rest.startswith("["):  # [::1]:port
        host = rest[1:].partition("]")[0]
    else:
        host = rest.rpartition(":")[0] if rest.count(":") == 1 else rest
    if host == "localhost" or host == "::1":
        return True
    octets = host.split(".")
    return len(octets) == 4 and octets[0] == "127" and all(o.isdigit() and int(o) <= 255 for o in octets)


def check_plaintext(target: str, tls: TlsConfig | None, insecure_plaintext_any_address: bool) -> None:
    """Refuse plaintext to a target off this machine: TLS settings gone missing must not send (and receive)
    credentials in clear over the network. `insecure_plaintext_any_address=True` says it is meant."""
    if tls is None and not insecure_plaintext_any_address and not is_loopback_target(target):
        raise ConfigurationError(
            f"plaintext to {target[:200]!r}, which is not a loopback address: give tls=TlsConfig(...) (or set "
            f"{ENV_CA}, {ENV_CERT} and {ENV_KEY}); insecure_plaintext_any_address=True allows it, for a network "
            "you trust"
        )


def channel_options(tls: TlsConfig | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.service_config_disable_resolution", 1),  # this config, never one from DNS
        # The server accepts pings every 20 s or more, also between calls.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # gRPC core times a ping's ack out with this one, not keepalive_timeout: without it a silent partition
        # (the watch stream looking live while nothing arrives) would take a minute more to be noticed.
        ("grpc.http2.ping_timeout_ms", 10_000),
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


def env_watch(environ: Mapping[str, str] | None) -> bool | None:
    """INTEGRATIONS_CLIENT_WATCH: false/0/no/off turns the cache's watch off, true/1/yes/on keeps it; unset: None."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_WATCH, "").strip().lower()
    if not value:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{ENV_WATCH} must be true or false (1/0, yes/no, on/off), not {value!r}")
