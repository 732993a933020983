"""The settings reader: defaults, flags over env, every problem named by its env var, key sources."""

from __future__ import annotations

import argparse
import base64
from collections.abc import Mapping
from pathlib import Path

import pytest

from integrations_service.config import (
    ENCRYPTION_KEY_ENV,
    ENCRYPTION_KEY_FILE_ENV,
    ENCRYPTION_KEYS_ENV,
    Mode,
    TlsFiles,
    add_flags,
    load_settings,
)
from integrations_service.crypto import DEFAULT_KEY_ID
from integrations_service.errors import ConfigurationError
from integrations_service.sealing import LegacyValues
from tests.harness import OTHER_KEY, TEST_KEY

TLS = {
    "INTEGRATIONS_TLS_CERT": "/etc/integrations/tls/server.crt",
    "INTEGRATIONS_TLS_KEY": "/etc/integrations/tls/server.key",
    "INTEGRATIONS_TLS_CLIENT_CA": "/etc/integrations/tls/clients.pem",
}
PRODUCTION = {
    "INTEGRATIONS_MODE": "production",
    "DATABASE_URL": "postgresql://integrations@db.internal/integrations",
    ENCRYPTION_KEY_ENV: TEST_KEY,
    "INTEGRATIONS_AUTHZ_POLICY": "/etc/integrations/authz-policy.toml",
    "INTEGRATIONS_LISTEN_ADDRESS": "0.0.0.0:50051",
    **TLS,
}


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(list(argv))


def problems(environ: Mapping[str, str], args: argparse.Namespace | None = None, serving: bool = True) -> list[str]:
    """The problem lines of the refusal, each `<ENV VAR> <what is wrong>`."""
    with pytest.raises(ConfigurationError) as refused:
        load_settings(args, environ, serving=serving)
    header, *lines = str(refused.value).splitlines()
    assert header == "invalid configuration:"
    return [line.strip() for line in lines]


def envs_named(lines: list[str]) -> list[str]:
    return [line.split(" ", 1)[0] for line in lines]


DEFAULTS: list[tuple[str, object]] = [
    ("listen_address", "127.0.0.1:50051"),
    ("metrics_address", "127.0.0.1:9464"),
    ("database_url", None),
    ("mode", Mode.DEVELOPMENT),
    ("data_dir", Path(".data")),
    ("json_logs", False),
    ("reflection", True),
    ("shutdown_grace", 10.0),
    ("db_pool_size", 10),
    ("db_timeout", 5.0),
    ("keyring", None),
    ("tls", None),
    ("authz_policy", None),
    ("legacy_values", LegacyValues.READ),
    ("key_source", None),
    ("provider_defaults", {}),
    ("watch_queue_size", 1000),
    ("keepalive_time", 60.0),
    ("keepalive_timeout", 20.0),
]


@pytest.mark.parametrize(("attribute", "default"), DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_every_setting_has_a_development_default(attribute: str, default: object) -> None:
    assert getattr(load_settings(None, {}), attribute) == default


# (setting's flag, its env var, a value for the env, another for the flag, the attribute, the flag's value as read)
PRECEDENCE: list[tuple[str, str, str, str, str, object]] = [
    ("--listen-address", "INTEGRATIONS_LISTEN_ADDRESS", "127.0.0.1:1", "127.0.0.1:2", "listen_address", "127.0.0.1:2"),
    ("--metrics-address", "INTEGRATIONS_METRICS_ADDRESS", "127.0.0.1:3", "", "metrics_address", None),
    ("--database-url", "DATABASE_URL", "sqlite:///env.db", "sqlite:///flag.db", "database_url", "sqlite:///flag.db"),
    ("--data-dir", "INTEGRATIONS_DATA_DIR", "/env", "/flag", "data_dir", Path("/flag")),
    ("--log-format", "INTEGRATIONS_LOG_FORMAT", "json", "text", "json_logs", False),
    ("--reflection", "INTEGRATIONS_REFLECTION", "false", "on", "reflection", True),
    ("--shutdown-grace", "INTEGRATIONS_SHUTDOWN_GRACE", "3", "0.5", "shutdown_grace", 0.5),
    ("--db-pool-size", "INTEGRATIONS_DB_POOL_SIZE", "7", "3", "db_pool_size", 3),
    ("--db-timeout", "INTEGRATIONS_DB_TIMEOUT", "9", "2.5", "db_timeout", 2.5),
    ("--legacy-values", "INTEGRATIONS_LEGACY_VALUES", "refuse", "read", "legacy_values", LegacyValues.READ),
    ("--authz-policy", "INTEGRATIONS_AUTHZ_POLICY", "/env.toml", "/flag.toml", "authz_policy", Path("/flag.toml")),
    ("--watch-queue-size", "INTEGRATIONS_WATCH_QUEUE_SIZE", "50", "20", "watch_queue_size", 20),
    ("--keepalive-time", "INTEGRATIONS_KEEPALIVE_TIME", "30", "10", "keepalive_time", 10.0),
    ("--keepalive-timeout", "INTEGRATIONS_KEEPALIVE_TIMEOUT", "5", "2", "keepalive_timeout", 2.0),
]


@pytest.mark.parametrize(
    ("flag", "env", "env_value", "flag_value", "attribute", "expected"), PRECEDENCE, ids=[p[1] for p in PRECEDENCE]
)
def test_a_flag_beats_its_env_var_and_the_env_var_beats_the_default(
    flag: str, env: str, env_value: str, flag_value: str, attribute: str, expected: object
) -> None:
    from_env = load_settings(flags(), {env: env_value})
    from_flag = load_settings(flags(f"{flag}={flag_value}"), {env: env_value})
    assert getattr(from_flag, attribute) == expected
    assert getattr(from_env, attribute) != expected
    assert getattr(from_env, attribute) != getattr(load_settings(flags(), {}), attribute)


def test_the_mode_flag_beats_the_environment() -> None:
    assert load_settings(flags("--mode=development"), {"INTEGRATIONS_MODE": "production"}).mode is Mode.DEVELOPMENT
    assert problems({"INTEGRATIONS_MODE": "development"}, flags("--mode=production"))  # production's requirements


INVALID: list[tuple[str, str]] = [
    ("INTEGRATIONS_MODE", "staging"),
    ("INTEGRATIONS_LEGACY_VALUES", "sometimes"),
    ("INTEGRATIONS_REFLECTION", "maybe"),
    ("INTEGRATIONS_SHUTDOWN_GRACE", "soon"),
    ("INTEGRATIONS_SHUTDOWN_GRACE", "-1"),
    ("INTEGRATIONS_DB_POOL_SIZE", "0"),
    ("INTEGRATIONS_DB_POOL_SIZE", "2.5"),
    ("INTEGRATIONS_DB_TIMEOUT", "0.05"),
    ("INTEGRATIONS_WATCH_QUEUE_SIZE", "0"),
    ("INTEGRATIONS_WATCH_QUEUE_SIZE", "many"),
    ("INTEGRATIONS_KEEPALIVE_TIME", "0.5"),
    ("INTEGRATIONS_KEEPALIVE_TIMEOUT", "0"),
    ("INTEGRATIONS_LOG_FORMAT", "xml"),
    ("INTEGRATIONS_LISTEN_ADDRESS", "localhost"),
    ("INTEGRATIONS_LISTEN_ADDRESS", "127.0.0.1:99999"),
    ("INTEGRATIONS_LISTEN_ADDRESS", "0.0.0.0:50051"),  # plaintext off loopback
    ("INTEGRATIONS_LISTEN_ADDRESS", "10.1.2.3:50051"),
    ("INTEGRATIONS_METRICS_ADDRESS", "metrics"),
    ("DATABASE_URL", "mysql://integrations@db/integrations"),
    ("INTEGRATIONS_TLS_CERT", "/only/the/cert.pem"),  # reported as the two missing ones, below
    (ENCRYPTION_KEY_ENV, "too-short"),
    (ENCRYPTION_KEYS_ENV, f"k1:{TEST_KEY},k1:{OTHER_KEY}"),
    (ENCRYPTION_KEY_FILE_ENV, "/no/such/key/file"),
]


@pytest.mark.parametrize(("env", "value"), INVALID, ids=[f"{env}={value}" for env, value in INVALID])
def test_each_invalid_value_is_reported_by_its_env_var(env: str, value: str) -> None:
    lines = problems({env: value})
    expected = ["INTEGRATIONS_TLS_KEY", "INTEGRATIONS_TLS_CLIENT_CA"] if env == "INTEGRATIONS_TLS_CERT" else [env]
    assert sorted(envs_named(lines)) == sorted(expected), lines


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "env",
    [
        "INTEGRATIONS_DB_TIMEOUT",
        "INTEGRATIONS_SHUTDOWN_GRACE",
        "INTEGRATIONS_KEEPALIVE_TIME",
        "INTEGRATIONS_KEEPALIVE_TIMEOUT",
    ],
)
def test_a_number_setting_must_be_finite(env: str, value: str) -> None:
    assert envs_named(problems({env: value})) == [env]


def test_a_port_of_non_ascii_digits_is_reported_by_its_env_var() -> None:
    assert envs_named(problems({"INTEGRATIONS_LISTEN_ADDRESS": "127.0.0.1:\u0665\u0660\u0660\u0665\u0661"})) == [
        "INTEGRATIONS_LISTEN_ADDRESS"
    ]


def test_several_problems_are_reported_at_once() -> None:
    lines = problems(
        {
            "INTEGRATIONS_DB_POOL_SIZE": "none",
            "INTEGRATIONS_REFLECTION": "perhaps",
            "INTEGRATIONS_METRICS_ADDRESS": "nowhere",
            "DATABASE_URL": "redis://cache",
        }
    )
    assert sorted(envs_named(lines)) == [
        "DATABASE_URL",
        "INTEGRATIONS_DB_POOL_SIZE",
        "INTEGRATIONS_METRICS_ADDRESS",
        "INTEGRATIONS_REFLECTION",
    ]


def test_a_database_url_refused_never_repeats_its_password() -> None:
    [line] = problems({"DATABASE_URL": "mysql://integrations:hunter2-db-password@db/integrations"})
    assert "hunter2" not in line
    assert "'mysql'" in line


def test_a_bad_key_is_reported_without_its_text() -> None:
    broken = TEST_KEY[:-6]
    [line] = problems({ENCRYPTION_KEY_ENV: broken})
    assert line.startswith(ENCRYPTION_KEY_ENV)
    assert broken not in line


def test_production_requires_keys_a_database_tls_and_a_policy() -> None:
    lines = problems({"INTEGRATIONS_MODE": "production"})
    assert sorted(envs_named(lines)) == sorted(
        [ENCRYPTION_KEY_FILE_ENV, "DATABASE_URL", *TLS, "INTEGRATIONS_AUTHZ_POLICY"]
    )


def test_production_commands_that_do_not_serve_need_only_keys_and_a_database() -> None:
    lines = problems({"INTEGRATIONS_MODE": "production"}, serving=False)
    assert sorted(envs_named(lines)) == sorted([ENCRYPTION_KEY_FILE_ENV, "DATABASE_URL"])


def test_a_complete_production_configuration() -> None:
    settings = load_settings(None, PRODUCTION)
    assert settings.mode is Mode.PRODUCTION
    assert settings.tls == TlsFiles(*(Path(p) for p in TLS.values()))
    assert settings.json_logs  # json logs by default in production
    assert settings.keyring is not None
    assert settings.keyring.ids == (DEFAULT_KEY_ID,)
    assert settings.key_source == ENCRYPTION_KEY_ENV


@pytest.mark.parametrize("missing", ["DATABASE_URL", ENCRYPTION_KEY_ENV, "INTEGRATIONS_AUTHZ_POLICY", *TLS])
def test_production_without_one_requirement_names_it(missing: str) -> None:
    environ = {k: v for k, v in PRODUCTION.items() if k != missing}
    expected = [ENCRYPTION_KEY_FILE_ENV if missing == ENCRYPTION_KEY_ENV else missing]
    if missing in TLS:
        expected.append("INTEGRATIONS_LISTEN_ADDRESS")  # without TLS, 0.0.0.0 would be plaintext off loopback
    assert sorted(envs_named(problems(environ))) == sorted(expected)


def test_plaintext_anywhere_is_refused_in_production() -> None:
    environ = PRODUCTION | {"INTEGRATIONS_INSECURE_PLAINTEXT_ANY_ADDRESS": "true"}
    assert envs_named(problems(environ)) == ["INTEGRATIONS_INSECURE_PLAINTEXT_ANY_ADDRESS"]


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "[::1]:50051", "localhost:50051"])
def test_plaintext_listens_on_loopback(address: str) -> None:
    assert load_settings(None, {"INTEGRATIONS_LISTEN_ADDRESS": address}).listen_address == address


def test_plaintext_off_loopback_needs_the_insecure_setting_in_development() -> None:
    environ = {"INTEGRATIONS_LISTEN_ADDRESS": "0.0.0.0:50051", "INTEGRATIONS_INSECURE_PLAINTEXT_ANY_ADDRESS": "true"}
    assert load_settings(None, environ).listen_address == "0.0.0.0:50051"


@pytest.mark.parametrize(
    ("environ", "args"),
    [
        ({"INTEGRATIONS_METRICS_ADDRESS": ""}, None),
        ({"INTEGRATIONS_METRICS_ADDRESS": "127.0.0.1:1"}, ["--metrics-address="]),
    ],
    ids=["env", "flag"],
)
def test_an_empty_metrics_address_turns_the_endpoint_off(environ: dict[str, str], args: list[str] | None) -> None:
    assert load_settings(flags(*args) if args is not None else None, environ).metrics_address is None


def test_provider_defaults_are_the_registry_variables_that_are_set() -> None:
    environ = {"STRIPE_SECRET_KEY": "from-env", "SMTP_HOST": "", "UNRELATED_SECRET": "x", "GA4_API_SECRET": "ga"}
    assert load_settings(None, environ).provider_defaults == {"STRIPE_SECRET_KEY": "from-env", "GA4_API_SECRET": "ga"}


# --- key sources ----------------------------------------------------------------------------------------


def key_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(f"# the service's keys, newest first\nk2:{OTHER_KEY}\nk1:{TEST_KEY}\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o440, 0o640], ids=oct)
def test_a_private_key_file_is_read(tmp_path: Path, mode: int) -> None:
    settings = load_settings(None, {ENCRYPTION_KEY_FILE_ENV: str(key_file(tmp_path, mode))})
    assert settings.keyring is not None
    assert (settings.keyring.ids, settings.keyring.active_id) == (("k2", "k1"), "k2")
    assert settings.key_source == ENCRYPTION_KEY_FILE_ENV


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o660, 0o444], ids=oct)
def test_a_key_file_open_to_others_or_writable_by_its_group_is_refused(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path, mode)
    [line] = problems({ENCRYPTION_KEY_FILE_ENV: str(path)})
    assert line.startswith(ENCRYPTION_KEY_FILE_ENV)
    assert str(path) in line
    assert TEST_KEY not in line


@pytest.mark.parametrize(
    ("environ", "ids"),
    [
        ({ENCRYPTION_KEY_ENV: TEST_KEY}, (DEFAULT_KEY_ID,)),
        ({ENCRYPTION_KEYS_ENV: f"k2:{OTHER_KEY},k1:{TEST_KEY}"}, ("k2", "k1")),
        ({ENCRYPTION_KEYS_ENV: f"k2:{OTHER_KEY}\nk1:{TEST_KEY}"}, ("k2", "k1")),
    ],
    ids=["single key", "keyring, commas", "keyring, lines"],
)
def test_keys_from_the_environment(environ: dict[str, str], ids: tuple[str, ...]) -> None:
    settings = load_settings(None, environ)
    assert settings.keyring is not None
    assert (settings.keyring.ids, settings.keyring.active_id) == (ids, ids[0])
    assert settings.key_source == next(iter(environ))


def test_two_key_sources_at_once_are_refused(tmp_path: Path) -> None:
    lines = problems({ENCRYPTION_KEY_FILE_ENV: str(key_file(tmp_path, 0o600)), ENCRYPTION_KEY_ENV: TEST_KEY})
    assert len(lines) == 1
    assert lines[0].startswith(ENCRYPTION_KEY_FILE_ENV)
    assert ENCRYPTION_KEY_ENV in lines[0]


def test_settings_never_show_provider_defaults() -> None:
    assert "from-env-secret" not in repr(load_settings(None, {"STRIPE_SECRET_KEY": "from-env-secret"}))


@pytest.mark.parametrize(
    "weak",
    [
        pytest.param("00" * 32, id="all zero"),
        pytest.param("ff" * 32, id="all ones"),
        pytest.param(base64.b64encode(bytes(32)).decode(), id="all zero, base64"),
        pytest.param("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f", id="the test-vector key"),
        pytest.param("3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", id="the docs' example keyring key"),
        pytest.param("abab" * 16, id="two distinct bytes"),
    ],
)
def test_production_refuses_a_weak_or_published_key_without_repeating_it(weak: str) -> None:
    """A key copied from the docs or left at zero is known to everyone: refused in production, not in development."""
    [line] = problems(PRODUCTION | {ENCRYPTION_KEY_ENV: weak})
    assert line.startswith(ENCRYPTION_KEY_ENV)
    assert "weak" in line
    assert weak not in line
    keyring = PRODUCTION | {ENCRYPTION_KEY_ENV: "", ENCRYPTION_KEYS_ENV: f"k1:{TEST_KEY}\nk0:{weak}"}
    [line] = problems(keyring)
    assert line.startswith(ENCRYPTION_KEYS_ENV)
    assert "'k0'" in line
    assert weak not in line
    assert load_settings(None, {ENCRYPTION_KEY_ENV: weak}).keyring is not None  # development: allowed


def test_the_mode_flags_help_names_what_production_requires() -> None:
    """`serve --help` is where a new engineer reads what production mode needs: every variable it refuses to
    start without, not just the key and the database."""
    from integrations_service.config import MODE

    for env in envs_named(problems({"INTEGRATIONS_MODE": "production"})):
        assert env in MODE.help, env
