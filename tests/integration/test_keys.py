"""The keyring against the data: the start-up key check, key sources, the nonce budget, moved values.

Tests that register keys get a store of their own (a fresh SQLite file or a
fresh PostgreSQL database), so the keys they leave behind never reach the
shared per-run database the other tests start services on.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_service.config import load_settings
from integrations_service.crypto import EncryptionKey
from integrations_service.errors import ConfigurationError
from tests.harness import OTHER_KEY, TEST_KEY, Running, new_org, rich_error, save, start_service, values_of
from tests.integration.raw_rows import overwrite_config, service_url, stored_config
from tests.processes import clean_env, run_cli

KEY_A = TEST_KEY
KEY_B = OTHER_KEY
ANY_PORT = {"INTEGRATIONS_LISTEN_ADDRESS": "127.0.0.1:0"}
DECRYPTED = pb.CONFIG_VIEW_DECRYPTED
SK = "sk_test_51KeysTestSecret000001"


def key_forms(text: str) -> tuple[str, str]:
    """A key as given (base64) and as hex: neither may appear in a message."""
    return text, EncryptionKey.from_text(text).material.hex()


FORBIDDEN = (*key_forms(KEY_A), *key_forms(KEY_B))

Location = tuple[str, str]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def _make_fresh_location(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Awaitable[Location]]:
    # Sync, like store_location: getfixturevalue cannot run inside the event loop.
    if request.param == "sqlite":

        async def sqlite_file() -> Location:
            return "sqlite", str(tmp_path / "keys.sqlite3")

        return sqlite_file
    factory = request.getfixturevalue("postgres_database_factory")

    async def postgres_database() -> Location:
        return "postgres", await factory()

    return postgres_database


@pytest.fixture
async def fresh(_make_fresh_location: Callable[[], Awaitable[Location]]) -> Location:
    """(kind, where) of an empty store nobody else uses."""
    return await _make_fresh_location()


def key_env(**env: str) -> dict[str, str]:
    """Harness settings with the given key source(s) instead of the harness's INTEGRATION_ENCRYPTION_KEY."""
    return {"INTEGRATION_ENCRYPTION_KEY": "", **env}


async def start_and_stop(url: str, tmp_path: Path, env: dict[str, str]) -> None:
    running = await start_service(url, tmp_path, env)
    await running.close()


async def clear_values(running: Running, org: str) -> dict[str, str]:
    reply = await running.stub.GetProviderConfig(
        pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=DECRYPTED)
    )
    values = values_of(reply.config).items()
    return {key: value for key, (value, source) in values if source == pb.VALUE_SOURCE_ORGANIZATION}


async def encryption_counts(kind: str, where: str) -> dict[str, int]:
    """key id -> stored encryption count, read behind the service's back."""
    sql = "SELECT key_id, encryptions FROM encryption_keys"
    if kind == "postgres":
        conn = await asyncpg.connect(where)
        try:
            return {r["key_id"]: r["encryptions"] for r in await conn.fetch(sql)}
        finally:
            await conn.close()

    def read() -> dict[str, int]:
        with closing(sqlite3.connect(where)) as conn:
            return dict(conn.execute(sql).fetchall())

    return await asyncio.to_thread(read)


# --- the start-up key check ---------------------------------------------------------------------------


async def test_a_different_key_under_the_same_id_stops_the_start(fresh: Location, tmp_path: Path) -> None:
    kind, where = fresh
    url = service_url(kind, where)
    org = new_org()
    first = await start_service(url, tmp_path, key_env(INTEGRATION_ENCRYPTION_KEY=KEY_A))
    try:
        await save(first, org, secretKey=SK)
    finally:
        await first.close()

    with pytest.raises(ConfigurationError) as caught:
        await start_service(url, tmp_path, key_env(INTEGRATION_ENCRYPTION_KEY=KEY_B))
    message = str(caught.value)
    assert "'default'" in message
    assert "check value differs" in message
    assert not any(secret in message for secret in FORBIDDEN)

    # The same through the real command: a start-up error naming the key id, never the key.
    result = run_cli(
        ["serve"],
        tmp_path,
        clean_env({**ANY_PORT, "DATABASE_URL": url, "INTEGRATION_ENCRYPTION_KEY": KEY_B}),
        timeout=20,
    )
    assert result.returncode != 0
    assert "'default'" in result.stderr
    assert "check value differs" in result.stderr
    assert not any(secret in result.stdout + result.stderr for secret in FORBIDDEN)

    # The refused starts changed nothing: the right key still reads what it wrote.
    again = await start_service(url, tmp_path, key_env(INTEGRATION_ENCRYPTION_KEY=KEY_A))
    try:
        assert await clear_values(again, org) == {"secretKey": SK}
    finally:
        await again.close()


async def test_an_extra_decrypt_only_key_is_accepted_and_then_needed_until_retired(
    fresh: Location, tmp_path: Path
) -> None:
    kind, where = fresh
    url = service_url(kind, where)
    org = new_org()
    first = await start_service(url, tmp_path, key_env(INTEGRATION_ENCRYPTION_KEY=KEY_A))
    try:
        await save(first, org, secretKey=SK)
    finally:
        await first.close()

    # The lone key has the id "default"; a keyring naming it so, plus an extra key, reads and writes as before.
    extra = await start_service(url, tmp_path, key_env(INTEGRATION_ENCRYPTION_KEYS=f"default:{KEY_A},extra:{KEY_B}"))
    try:
        assert await clear_values(extra, org) == {"secretKey": SK}
        await save(extra, org, publishableKey="pk_test_51KeysTestPublishable01")
    finally:
        await extra.close()
    stored = await stored_config(kind, where, org, "stripe")
    assert all(value.startswith("enc:v2:default:") for value in stored.values())

    # Once registered, the extra key is one the data may need: leaving it out is refused until it is retired.
    with pytest.raises(ConfigurationError, match="'extra'"):
        await start_service(url, tmp_path, key_env(INTEGRATION_ENCRYPTION_KEY=KEY_A))
    env = clean_env({"DATABASE_URL": url, "INTEGRATION_ENCRYPTION_KEYS": f"default:{KEY_A},extra:{KEY_B}"})
    retired = run_cli(["retire-key", "extra"], tmp_path, env, timeout=30)
    assert retired.returncode == 0, retired.stderr
    last = await start_service(url, tmp_path, key_env(INTEGRATION_ENCRYPTION_KEY=KEY_A))
    try:
        assert await clear_values(last, org) == {"secretKey": SK, "publishableKey": "pk_test_51KeysTestPublishable01"}
    finally:
        await last.close()


async def test_a_retired_key_cannot_become_the_active_key_again(fresh: Location, tmp_path: Path) -> None:
    kind, where = fresh
    url = service_url(kind, where)
    first = await start_service(url, tmp_path, key_env(INTEGRATION_ENCRYPTION_KEYS=f"k2:{KEY_B},k1:{KEY_A}"))
    await first.close()
    env = clean_env({"DATABASE_URL": url, "INTEGRATION_ENCRYPTION_KEYS": f"k2:{KEY_B},k1:{KEY_A}"})
    retired = run_cli(["retire-key", "k1"], tmp_path, env, timeout=30)
    assert retired.returncode == 0, retired.stderr

    with pytest.raises(ConfigurationError, match="'k1'"):
        await start_and_stop(url, tmp_path, key_env(INTEGRATION_ENCRYPTION_KEYS=f"k1:{KEY_A},k2:{KEY_B}"))


def test_retiring_an_unknown_key_id_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    env = clean_env({"DATABASE_URL": url, "INTEGRATION_ENCRYPTION_KEYS": f"k2:{KEY_B},k1:{KEY_A}"})
    result = run_cli(["retire-key", "k3"], tmp_path, env, timeout=30)  # a typo of k2 or k1
    assert result.returncode != 0
    assert "'k3'" in result.stderr


# --- where keys come from -----------------------------------------------------------------------------


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# the service's keys\nk1:{KEY_A}\n")
    key_file.chmod(0o644)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(None, {"INTEGRATION_ENCRYPTION_KEY_FILE": str(key_file)})
    assert "INTEGRATION_ENCRYPTION_KEY_FILE" in str(caught.value)
    assert "chmod 600" in str(caught.value)
    assert not any(secret in str(caught.value) for secret in FORBIDDEN)

    result = run_cli(["serve", "--check"], tmp_path, clean_env({"INTEGRATION_ENCRYPTION_KEY_FILE": str(key_file)}))
    assert result.returncode != 0
    assert "INTEGRATION_ENCRYPTION_KEY_FILE" in result.stderr
    assert "readable by others" in result.stderr
    assert not any(secret in result.stdout + result.stderr for secret in FORBIDDEN)

    key_file.chmod(0o600)
    result = run_cli(["serve", "--check"], tmp_path, clean_env({"INTEGRATION_ENCRYPTION_KEY_FILE": str(key_file)}))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("mode", [0o604, 0o602, 0o601, 0o660, 0o444])
def test_a_key_file_open_to_others_or_writable_by_its_group_is_refused(tmp_path: Path, mode: int) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"k1:{KEY_A}\n")
    key_file.chmod(mode)
    result = run_cli(["serve", "--check"], tmp_path, clean_env({"INTEGRATION_ENCRYPTION_KEY_FILE": str(key_file)}))
    assert result.returncode != 0
    assert "readable by others or group-writable" in result.stderr


@pytest.mark.parametrize("mode", [0o440, 0o640, 0o400])
def test_a_key_file_from_a_kubernetes_secret_with_fsgroup_is_accepted(tmp_path: Path, mode: int) -> None:
    # The kubelet's layout: the file sits in a timestamped folder, reached through ..data symlinks.
    mount = tmp_path / "secret"
    version = mount / "..2026_12_01_08_00_00.000000001"
    version.mkdir(parents=True)
    (version / "keyring").write_text(f"k1:{KEY_A}\n")
    (version / "keyring").chmod(mode)
    (mount / "..data").symlink_to(version.name)
    (mount / "keyring").symlink_to("..data/keyring")
    env = clean_env({"INTEGRATION_ENCRYPTION_KEY_FILE": str(mount / "keyring")})
    result = run_cli(["serve", "--check"], tmp_path, env)
    assert result.returncode == 0, result.stderr


async def test_a_private_key_file_serves(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"k2:{KEY_B}\nk1:{KEY_A}\n")
    key_file.chmod(0o600)
    where = tmp_path / "store.sqlite3"
    org = new_org()
    running = await start_service(
        f"sqlite:///{where}", tmp_path, key_env(INTEGRATION_ENCRYPTION_KEY_FILE=str(key_file))
    )
    try:
        await save(running, org, secretKey=SK)
        assert await clear_values(running, org) == {"secretKey": SK}
    finally:
        await running.close()
    assert (await stored_config("sqlite", str(where), org, "stripe"))["secretKey"].startswith("enc:v2:k2:")


@pytest.mark.parametrize(
    "sources",
    [
        ("INTEGRATION_ENCRYPTION_KEY", "INTEGRATION_ENCRYPTION_KEYS"),
        ("INTEGRATION_ENCRYPTION_KEY_FILE", "INTEGRATION_ENCRYPTION_KEY"),
        ("INTEGRATION_ENCRYPTION_KEY_FILE", "INTEGRATION_ENCRYPTION_KEYS"),
    ],
)
def test_two_key_sources_at_once_are_refused(tmp_path: Path, sources: tuple[str, str]) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"k1:{KEY_A}\n")
    key_file.chmod(0o600)
    given = {
        "INTEGRATION_ENCRYPTION_KEY": KEY_A,
        "INTEGRATION_ENCRYPTION_KEYS": f"k1:{KEY_A}",
        "INTEGRATION_ENCRYPTION_KEY_FILE": str(key_file),
    }
    with pytest.raises(ConfigurationError) as caught:
        load_settings(None, {name: given[name] for name in sources})
    message = str(caught.value)
    assert all(name in message for name in sources)
    assert "only one source" in message
    assert not any(secret in message for secret in FORBIDDEN)


# A process that runs the CLI's main, then reports which key variables it and a child it spawns still see.
_ENV_PROBE = """
import json, os, subprocess, sys
from integrations_service.cli import main
code = main(["serve", "--check"])
child = subprocess.run(
    [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
    capture_output=True, text=True, check=True,
)
print(json.dumps({"code": code, "own": dict(os.environ), "child": json.loads(child.stdout)}))
"""


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"INTEGRATION_ENCRYPTION_KEY": KEY_A}, 0),
        ({"INTEGRATION_ENCRYPTION_KEYS": f"k2:{KEY_B},k1:{KEY_A}"}, 0),
        # Refused settings (two sources) are dropped just the same.
        ({"INTEGRATION_ENCRYPTION_KEY": KEY_A, "INTEGRATION_ENCRYPTION_KEYS": f"k1:{KEY_B}"}, 2),
    ],
)
def test_the_cli_drops_key_material_from_its_environment(tmp_path: Path, env: dict[str, str], code: int) -> None:
    # /proc/<pid>/environ shows a process's initial environment only, so the probe reports os.environ
    # after main() and what a child process it spawns inherits.
    probe = subprocess.run(
        [sys.executable, "-c", _ENV_PROBE],
        cwd=tmp_path,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["code"] == code
    for environment in (report["own"], report["child"]):
        assert "INTEGRATION_ENCRYPTION_KEY" not in environment
        assert "INTEGRATION_ENCRYPTION_KEYS" not in environment
        assert not any(secret in value for value in environment.values() for secret in FORBIDDEN)


# --- the nonce budget -----------------------------------------------------------------------------------


async def test_encryption_counts_reach_the_store_at_shutdown(fresh: Location, tmp_path: Path) -> None:
    kind, where = fresh
    url = service_url(kind, where)
    first = await start_service(url, tmp_path)
    try:
        for _ in range(5):
            await save(first, new_org(), secretKey=SK)  # one value: one encryption
        await save(first, new_org(), secretKey=SK, publishableKey="pk_test_51KeysTestPublishable01")  # two
    finally:
        await first.close()  # well within the 10 s flush interval: counted by the flush at shutdown
    after_first = (await encryption_counts(kind, where))["default"]
    assert after_first >= 7

    second = await start_service(url, tmp_path)
    try:
        for _ in range(3):
            await save(second, new_org(), secretKey=SK)
        assert second.service.key_usage.totals()["default"] >= after_first + 3
    finally:
        await second.close()
    assert (await encryption_counts(kind, where))["default"] >= after_first + 3


# --- values moved between rows ----------------------------------------------------------------------------


async def test_a_value_copied_into_another_organization_is_data_loss(store_location: Location, tmp_path: Path) -> None:
    kind, where = store_location
    # No row cache: the rows are rewritten behind the service's back and read at once (SQLite never notifies
    # another process's write; the cache would serve the row it read before for up to its TTL).
    running = await start_service(service_url(kind, where), tmp_path, {"INTEGRATIONS_CACHE_TTL": "0"})
    try:
        alice, bob = new_org(), new_org()
        await save(running, alice, secretKey=SK, webhookSecret="whsec_alice_own_secret_0001")
        await save(running, bob, secretKey="sk_test_bobs_own_secret_000002")
        alices = await stored_config(kind, where, alice, "stripe")
        bobs = await stored_config(kind, where, bob, "stripe")
        # An operator (or an attacker with write access) copies Alice's stored secret key into Bob's row.
        await overwrite_config(kind, where, bob, "stripe", {**bobs, "secretKey": alices["secretKey"]})

        for view in (DECRYPTED, pb.CONFIG_VIEW_MASKED):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await running.stub.GetProviderConfig(
                    pb.GetProviderConfigRequest(organization_id=bob, provider="stripe", view=view)
                )
            error = rich_error(caught.value)
            assert error.code is grpc.StatusCode.DATA_LOSS
            assert bob in error.message
            assert "'stripe'" in error.message
            assert "'secretKey'" in error.message
            assert SK not in error.message
            assert alices["secretKey"] not in error.message
        # Alice's own row is untouched and still reads.
        assert (await clear_values(running, alice))["secretKey"] == SK

        # Moved into another field of the same row: refused the same way, naming that field.
        await overwrite_config(kind, where, alice, "stripe", {**alices, "webhookSecret": alices["secretKey"]})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await clear_values(running, alice)
        error = rich_error(caught.value)
        assert error.code is grpc.StatusCode.DATA_LOSS
        assert "'webhookSecret'" in error.message
        assert alice in error.message
    finally:
        await running.close()
