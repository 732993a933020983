"""Every setting of the service: its flag, its env var, its default, its check.

`load_settings` reads flags first, then the environment, then defaults, and
reports every missing or invalid setting at once, by its env var name.
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from integrations_service.crypto import InvalidKey, Keyring
from integrations_service.domain.audit import ReadAudit
from integrations_service.domain.registry import all_env_vars
from integrations_service.errors import ConfigurationError
from integrations_service.sealing.legacy import LEGACY_VALUES_ENV, LegacyValues

ENCRYPTION_KEY_ENV = "INTEGRATION_ENCRYPTION_KEY"
ENCRYPTION_KEYS_ENV = "INTEGRATION_ENCRYPTION_KEYS"
ENCRYPTION_KEY_FILE_ENV = "INTEGRATION_ENCRYPTION_KEY_FILE"
# Dropped from os.environ once read, so child processes and crash dumps don't inherit them.
KEY_MATERIAL_ENVS = (ENCRYPTION_KEY_ENV, ENCRYPTION_KEYS_ENV)


class Mode(enum.Enum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


@dataclass(frozen=True)
class Setting:
    env: str
    flag: str
    default: str | None
    help: str


LISTEN_ADDRESS = Setting(
    "INTEGRATIONS_LISTEN_ADDRESS",
    "--listen-address",
    "127.0.0.1:50051",
    "host:port the gRPC server listens on (plaintext only on loopback)",
)
DATABASE_URL = Setting(
    "DATABASE_URL",
    "--database-url",
    None,
    "postgresql://… for PostgreSQL, sqlite:///path for a SQLite file; unset: the embedded store in the data folder",
)
MODE = Setting(
    "INTEGRATIONS_MODE",
    "--mode",
    "development",
    "development (generates a local key if none is set; plaintext on loopback) or production (refuses to "
    "start without a key, INTEGRATION_ENCRYPTION_KEY_FILE (or _KEYS or _KEY), and DATABASE_URL; serve also "
    "needs INTEGRATIONS_TLS_CERT, INTEGRATIONS_TLS_KEY, INTEGRATIONS_TLS_CLIENT_CA and INTEGRATIONS_AUTHZ_POLICY)",
)
DATA_DIR = Setting(
    "INTEGRATIONS_DATA_DIR", "--data-dir", ".data", "folder of the embedded store and of the development key file"
)
LOG_FORMAT = Setting(
    "INTEGRATIONS_LOG_FORMAT", "--log-format", None, "json or text; default text in development, json in production"
)
REFLECTION = Setting("INTEGRATIONS_REFLECTION", "--reflection", "true", "serve gRPC server reflection (true/false)")
SHUTDOWN_GRACE = Setting(
    "INTEGRATIONS_SHUTDOWN_GRACE", "--shutdown-grace", "10", "seconds in-flight RPCs get to finish on SIGTERM/SIGINT"
)
DB_POOL_SIZE = Setting("INTEGRATIONS_DB_POOL_SIZE", "--db-pool-size", "10", "largest number of PostgreSQL connections")
DB_TIMEOUT = Setting(
    "INTEGRATIONS_DB_TIMEOUT",
    "--db-timeout",
    "5",
    "seconds a store call may wait in all (queue, connection, locks, statements) before answering UNAVAILABLE",
)
TLS_CERT = Setting(
    "INTEGRATIONS_TLS_CERT",
    "--tls-cert",
    None,
    "server certificate chain (PEM); with the key and client CA, serves mutual TLS",
)
TLS_KEY = Setting("INTEGRATIONS_TLS_KEY", "--tls-key", None, "server private key (PEM)")
TLS_CLIENT_CA = Setting(
    "INTEGRATIONS_TLS_CLIENT_CA", "--tls-client-ca", None, "CA bundle (PEM) that client certificates must chain to"
)
AUTHZ_POLICY = Setting(
    "INTEGRATIONS_AUTHZ_POLICY",
    "--authz-policy",
    None,
    "TOML file mapping caller identities to roles (required with TLS)",
)
INSECURE_PLAINTEXT = Setting(
    "INTEGRATIONS_INSECURE_PLAINTEXT_ANY_ADDRESS",
    "--insecure-plaintext-any-address",
    "false",
    "DANGER: serve plaintext, trusting every caller, on a non-loopback address (development mode only)",
)
METRICS_ADDRESS = Setting(
    "INTEGRATIONS_METRICS_ADDRESS",
    "--metrics-address",
    "127.0.0.1:9464",
    "host:port of the Prometheus /metrics endpoint; empty turns it off",
)
LEGACY_VALUES = Setting(
    LEGACY_VALUES_ENV,
    "--legacy-values",
    "read",
    "read (serve legacy plaintext and enc:v1 values, counted) or refuse (answer DATA_LOSS for them: "
    "switch once `rotate` reports none left)",
)
AUDIT_READS = Setting(
    "INTEGRATIONS_AUDIT_READS",
    "--audit-reads",
    "buffered",
    "buffered (a decrypted read's audit record is stored within about 1 s, lost if the process dies first) or "
    "strict (a decrypted value is returned only once its record is stored; UNAVAILABLE when it cannot be)",
)
CACHE_TTL = Setting(
    "INTEGRATIONS_CACHE_TTL",
    "--cache-ttl",
    "5",
    "seconds a cached stored row (ciphertext) may be served at most, however the change feed fares; 0 turns "
    "the row cache off",
)
WATCH_QUEUE_SIZE = Setting(
    "INTEGRATIONS_WATCH_QUEUE_SIZE",
    "--watch-queue-size",
    "1000",
    "change events a WatchConfigChanges stream may have waiting for its consumer; one more and the stream is "
    "sent a resync instead (memory per stream stays bounded)",
)
KEEPALIVE_TIME = Setting(
    "INTEGRATIONS_KEEPALIVE_TIME",
    "--keepalive-time",
    "60",
    "seconds of quiet on a connection after which the server pings the client (HTTP/2 keepalive), so a dead "
    "watcher's stream is closed; clients may ping every 20 s or more, even without a call",
)
KEEPALIVE_TIMEOUT = Setting(
    "INTEGRATIONS_KEEPALIVE_TIMEOUT",
    "--keepalive-timeout",
    "20",
    "seconds the server waits for a keepalive ping's answer before closing the connection",
)
WORKERS = Setting(
    "INTEGRATIONS_WORKERS",
    "--workers",
    "1",
    "server processes sharing the listen port under a supervisor (SO_REUSEPORT); above 1 needs PostgreSQL "
    "and a fixed port",
)

SETTINGS = (
    LISTEN_ADDRESS,
    METRICS_ADDRESS,
    DATABASE_URL,
    MODE,
    DATA_DIR,
    LOG_FORMAT,
    REFLECTION,
    SHUTDOWN_GRACE,
    DB_POOL_SIZE,
    DB_TIMEOUT,
    TLS_CERT,
    TLS_KEY,
    TLS_CLIENT_CA,
    AUTHZ_POLICY,
    INSECURE_PLAINTEXT,
    LEGACY_VALUES,
    AUDIT_READS,
    CACHE_TTL,
    WATCH_QUEUE_SIZE,
    KEEPALIVE_TIME,
    KEEPALIVE_TIMEOUT,
    WORKERS,
)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class Settings:
    listen_address: str
    database_url: str | None
    mode: Mode
    data_dir: Path
    json_logs: bool
    reflection: bool
    shutdown_grace: float
    db_pool_size: int
    db_timeout: float
    # None in development when no key is set: the wiring then uses the dev key file.
    keyring: Keyring | None
    # None: plaintext (loopback, development only, unless the insecure setting says otherwise).
    tls: TlsFiles | None
    authz_policy: Path | None
    # None: no metrics endpoint.
    metrics_address: str | None
    audit_reads: ReadAudit
    provider_defaults: Mapping[str, str] = field(repr=False)
    legacy_values: LegacyValues = LegacyValues.READ
    # Seconds; 0: no row cache.
    cache_ttl: float = 5.0
    # The env var the keys came from (None: none set, development key file).
    key_source: str | None = None
    # Above 1: `serve` runs this many server processes under a supervisor (supervisor.py).
    workers: int = 1
    # Events a watch stream may have queued before it is told to resync.
    watch_queue_size: int = 1000
    # HTTP/2 keepalive of the server, seconds.
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0

    @property
    def dev_key_path(self) -> Path:
        return self.data_dir / "dev-encryption.key"


def add_flags(parser: argparse.ArgumentParser) -> None:
    for setting in SETTINGS:
        default = f" (default: {setting.default})" if setting.default else ""
        parser.add_argument(
            setting.flag, dest=_dest(setting), default=None, help=f"{setting.help}; env {setting.env}{default}"
        )


def load_settings(args: argparse.Namespace | None, environ: Mapping[str, str], serving: bool = True) -> Settings:
    """All settings; `serving=False` (migrate, rotate, retire-key) skips what only a server needs (TLS, policy)."""
    reader = _Reader(args, environ)
    mode = reader.choice(MODE, Mode)
    legacy_values = reader.choice(LEGACY_VALUES, LegacyValues)
    production = mode is Mode.PRODUCTION
    keyring = reader.keyring(required=production)
    database_url = reader.database_url(required=production)
    tls = reader.tls_files(required=production and serving)
    policy = reader.text(AUTHZ_POLICY) or None
    if (tls or (production and serving)) and not policy:
        reader.problem(AUTHZ_POLICY.env, "is required with TLS and in production mode: it says who may do what")
    settings = Settings(
        listen_address=reader.listen_address(plaintext=tls is None, production=production),
        database_url=database_url,
        mode=mode or Mode.DEVELOPMENT,
        data_dir=Path(reader.text(DATA_DIR)),
        json_logs=reader.log_format(mode),
        reflection=reader.boolean(REFLECTION),
        shutdown_grace=reader.number(SHUTDOWN_GRACE, float, minimum=0),
        db_pool_size=int(reader.number(DB_POOL_SIZE, int, minimum=1)),
        db_timeout=reader.number(DB_TIMEOUT, float, minimum=0.1),
        keyring=keyring,
        tls=tls,
        authz_policy=Path(policy) if policy else None,
        metrics_address=reader.metrics_address(),
        audit_reads=reader.choice(AUDIT_READS, ReadAudit) or ReadAudit.BUFFERED,
        provider_defaults={var: environ[var] for var in all_env_vars() if environ.get(var)},
        legacy_values=legacy_values or LegacyValues.READ,
        cache_ttl=reader.number(CACHE_TTL, float, minimum=0),
        key_source=reader.key_source(),
        workers=reader.workers(database_url) if serving else 1,
        watch_queue_size=int(reader.number(WATCH_QUEUE_SIZE, int, minimum=1)),
        keepalive_time=reader.number(KEEPALIVE_TIME, float, minimum=1),
        keepalive_timeout=reader.number(KEEPALIVE_TIMEOUT, float, minimum=1),
    )
    reader.raise_problems()
    return settings


def json_logs_wanted(args: argparse.Namespace | None, environ: Mapping[str, str]) -> bool:
    """The log format `load_settings` would choose, read alone: for reporting what else is wrong with the settings.

    In JSON mode every line on stderr is a JSON object (docs/operations.md), the settings' own errors included:
    a container's log pipeline would otherwise split that message into lines it cannot parse.
    """
    reader = _Reader(args, environ)  # its problems are not raised: `load_settings` already reports them
    return reader.log_format(reader.choice(MODE, Mode))


HEALTHCHECK_CA_ENV = "INTEGRATIONS_HEALTHCHECK_CA"
HEALTHCHECK_CERT_ENV = "INTEGRATIONS_HEALTHCHECK_CERT"
HEALTHCHECK_KEY_ENV = "INTEGRATIONS_HEALTHCHECK_KEY"
HEALTHCHECK_SERVER_NAME_ENV = "INTEGRATIONS_HEALTHCHECK_SERVER_NAME"
HEALTHCHECK_FILE_ENVS = (HEALTHCHECK_CA_ENV, HEALTHCHECK_CERT_ENV, HEALTHCHECK_KEY_ENV)


@dataclass(frozen=True)
class HealthcheckTls:
    """The health checker's own client certificate, and the name it verifies on the server's."""

    ca: Path
    cert: Path
    key: Path
    # None: the first DNS name of `server_cert`, else the dialled host.
    server_name: str | None
    server_cert: Path


@dataclass(frozen=True)
class HealthcheckSettings:
    """What `integrations-service healthcheck` needs (env only: the container's HEALTHCHECK sets no flags)."""

    address: str
    # None: the service serves plaintext (no INTEGRATIONS_TLS_CERT).
    tls: HealthcheckTls | None


def load_healthcheck_settings(address: str | None, environ: Mapping[str, str]) -> HealthcheckSettings:
    """`address` (the --address flag) else INTEGRATIONS_LISTEN_ADDRESS; problems reported by env var name."""
    reader = _Reader(None, environ)
    address = address or reader.text(LISTEN_ADDRESS)
    try:
        split_address(address)
    except ValueError:
        reader.problem(LISTEN_ADDRESS.env, f"(or --address) must be host:port, got {address!r}")
    server_cert = reader.text(TLS_CERT)
    tls = None
    if server_cert:
        files = [(env, environ.get(env, "")) for env in HEALTHCHECK_FILE_ENVS]
        for env, path in files:
            if not path:
                reader.problem(env, f"is required when the service serves TLS ({TLS_CERT.env} is set)")
        if all(path for _, path in files):
            ca, cert, key = (Path(path) for _, path in files)
            server_name = environ.get(HEALTHCHECK_SERVER_NAME_ENV) or None
            tls = HealthcheckTls(ca, cert, key, server_name, Path(server_cert))
    reader.raise_problems()
    return HealthcheckSettings(address, tls)


def _dest(setting: Setting) -> str:
    return setting.flag.removeprefix("--").replace("-", "_")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    # isascii: str.isdigit also takes other scripts' digits, which int() reads but a socket address does not.
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port")
    return host, int(port)


_Choice = TypeVar("_Choice", bound=enum.Enum)


class _Reader:
    """Reads settings, collecting problems instead of stopping at the first."""

    def __init__(self, args: argparse.Namespace | None, environ: Mapping[str, str]) -> None:
        self._args = args
        self._environ = environ
        self._problems: list[str] = []

    def problem(self, env: str, text: str) -> None:
        self._problems.append(f"{env} {text}")

    def raise_problems(self) -> None:
        if self._problems:
            raise ConfigurationError("invalid configuration:\n  " + "\n  ".join(self._problems))

    def text(self, setting: Setting, empty_is_a_value: bool = False) -> str:
        """Flag, else env, else default. An empty env var counts as unset unless `empty_is_a_value`."""
        from_flag = getattr(self._args, _dest(setting), None) if self._args else None
        if from_flag is not None:
            return str(from_flag)
        if empty_is_a_value and setting.env in self._environ:
            return self._environ[setting.env]
        return self._environ.get(setting.env) or setting.default or ""

    def choice(self, setting: Setting, kind: type[_Choice]) -> _Choice | None:
        raw = self.text(setting)
        try:
            return kind(raw)
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            self.problem(setting.env, f"must be one of {allowed}, got {raw!r}")
            return None

    def boolean(self, setting: Setting) -> bool:
        raw = self.text(setting).lower()
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        self.problem(setting.env, f"must be true or false, got {raw!r}")
        return False

    def number(self, setting: Setting, kind: type[float] | type[int], minimum: float) -> float:
        raw = self.text(setting)
        try:
            value = kind(raw)
        except ValueError:
            self.problem(setting.env, f"must be a number, got {raw!r}")
            return minimum
        if not math.isfinite(value):
            # float() takes nan and inf: nan compares false with any minimum, inf never times out.
            self.problem(setting.env, f"must be a finite number, got {raw!r}")
            return minimum
        if value < minimum:
            self.problem(setting.env, f"must be at least {minimum}, got {raw!r}")
        return value

    def listen_address(self, plaintext: bool, production: bool) -> str:
        address = self.text(LISTEN_ADDRESS)
        try:
            host, _ = split_address(address)
        except ValueError:
            self.problem(LISTEN_ADDRESS.env, f"must be host:port, got {address!r}")
            return address
        insecure_anywhere = self.boolean(INSECURE_PLAINTEXT)
        if insecure_anywhere and production:
            self.problem(INSECURE_PLAINTEXT.env, "is refused in production mode")
        elif plaintext and not is_loopback(host) and not insecure_anywhere:
            self.problem(
                LISTEN_ADDRESS.env,
                f"is {address!r}: without TLS the service only listens on a loopback "
                f"address (127.0.0.1, ::1, localhost); set {TLS_CERT.env}, "
                f"{TLS_KEY.env} and {TLS_CLIENT_CA.env}",
            )
        return address

    def database_url(self, required: bool) -> str | None:
        url = self.text(DATABASE_URL)
        if not url:
            if required:
                self.problem(DATABASE_URL.env, "is required in production mode (PostgreSQL is the production store)")
            return None
        if not url.lower().startswith(("postgresql://", "postgres://", "sqlite:///")):
            # Only a plain scheme is repeated: the rest of the URL may hold a password.
            scheme, sep, _ = url.partition("://")
            got = f" (got scheme {scheme!r})" if sep and scheme.replace("+", "").isalnum() else ""
            self.problem(DATABASE_URL.env, f"must start with postgresql://, postgres:// or sqlite:///{got}")
        return url

    def workers(self, database_url: str | None) -> int:
        workers = int(self.number(WORKERS, int, minimum=1))
        if workers <= 1:
            return workers
        if not (database_url or "").lower().startswith(("postgresql://", "postgres://")):
            # Each worker would open its own embedded store on the same files: writers that do not see each other.
            self.problem(
                WORKERS.env,
                f"is {workers}, but the embedded SQLite store serves one process only: set {WORKERS.env}=1, "
                f"or set {DATABASE_URL.env} to a postgresql:// URL to run several workers",
            )
        address = self.text(LISTEN_ADDRESS)
        if address.endswith(":0"):
            self.problem(
                WORKERS.env,
                f"is {workers}, but {LISTEN_ADDRESS.env} asks for any free port (:0): the workers must share one "
                "fixed port",
            )
        return workers

    def metrics_address(self) -> str | None:
        address = self.text(METRICS_ADDRESS, empty_is_a_value=True)  # empty turns the endpoint off
        if not address:
            return None
        try:
            split_address(address)
        except ValueError:
            self.problem(METRICS_ADDRESS.env, f"must be host:port or empty, got {address!r}")
        return address

    def tls_files(self, required: bool) -> TlsFiles | None:
        paths = {setting: self.text(setting) for setting in (TLS_CERT, TLS_KEY, TLS_CLIENT_CA)}
        if all(paths.values()):
            return TlsFiles(*(Path(p) for p in paths.values()))
        if any(paths.values()) or required:
            why = "is required in production mode" if required else "is required with the other TLS settings"
            for setting, path in paths.items():
                if not path:
                    self.problem(setting.env, f"{why} (mutual TLS needs certificate, key and client CA)")
        return None

    def log_format(self, mode: Mode | None) -> bool:
        raw = self.text(LOG_FORMAT) or ("json" if mode is Mode.PRODUCTION else "text")
        if raw not in ("json", "text"):
            self.problem(LOG_FORMAT.env, f"must be json or text, got {raw!r}")
        return raw == "json"

    def key_source(self) -> str | None:
        given = self._key_sources()
        return given[0] if given else None

    def _key_sources(self) -> list[str]:
        """The key variables that are set, the preferred source first."""
        sources = (ENCRYPTION_KEY_FILE_ENV, ENCRYPTION_KEYS_ENV, ENCRYPTION_KEY_ENV)
        return [env for env in sources if self._environ.get(env)]

    def keyring(self, required: bool) -> Keyring | None:
        """From a key file (preferred), INTEGRATION_ENCRYPTION_KEYS, or the single INTEGRATION_ENCRYPTION_KEY."""
        given = self._key_sources()
        if len(given) > 1:
            self.problem(given[0], f"and {', '.join(given[1:])} are both set: set only one source of keys")
            return None
        if not given:
            if required:
                self.problem(
                    ENCRYPTION_KEY_FILE_ENV,
                    f"(or {ENCRYPTION_KEYS_ENV} or {ENCRYPTION_KEY_ENV}) is required "
                    "in production mode: a dedicated key (create one with `integrations-service gen-key`)",
                )
            return None
        env = given[0]
        try:
            text = self._key_file_text(self._environ[env]) if env == ENCRYPTION_KEY_FILE_ENV else self._environ[env]
            keyring = Keyring.parse(text) if text is not None else None
        except InvalidKey as error:
            self.problem(env, f"is invalid: {error}")
            return None
        if keyring is not None and required:  # production: a key anyone can know protects nothing
            for key_id, why in keyring.weak_keys().items():
                self.problem(
                    env, f"holds a weak key ({key_id!r}): {why}; create one with `integrations-service gen-key`"
                )
        return keyring

    def _key_file_text(self, path_text: str) -> str | None:
        path = Path(path_text)
        try:
            mode = path.stat().st_mode
            # Group read is how a Kubernetes Secret reaches a non-root pod (defaultMode 0440 + fsGroup).
            if mode & 0o027:
                self.problem(
                    ENCRYPTION_KEY_FILE_ENV,
                    f"names {path}, which is readable by others or group-writable: chmod 600 it (or 0440)",
                )
                return None
            return path.read_text()
        except OSError as error:
            self.problem(ENCRYPTION_KEY_FILE_ENV, f"names {path}, which cannot be read: {error.strerror}")
            return None
