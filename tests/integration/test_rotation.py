"""Online key rotation (`integrations-service rotate` / `retire-key`) against a real PostgreSQL.

Every test gets a FRESH database (postgres_database_factory), so report counts
and raw-row checks are exact. The rotate and retire-key commands run as real
processes; the concurrent writer and reader talk to a real in-process service
over a socket. Rows of the legacy dashboard (plaintext and `enc:v1:`) are
inserted with raw SQL, the way the dashboard wrote them.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_service.crypto import EncryptionKey, seal_v1
from integrations_service.errors import ConfigurationError
from integrations_service.store.postgres import PostgresStore
from tests.conftest import CreateDatabase
from tests.harness import OTHER_KEY, TEST_KEY, Running, rich_error, start_service, values_of
from tests.integration.raw_rows import tampered
from tests.integration.test_store_outage import TcpProxy, _with_address
from tests.processes import SERVICE, clean_env

pytestmark = pytest.mark.postgres

# The dashboard's old single key: `enc:v1:` values are read with the key whose id is "default".
V1_KEY = OTHER_KEY
# The key the service wrote with before the rotation, id k1.
K1_KEY = TEST_KEY
# The new key, id k2 (fixed test material, never used outside tests).
K2_KEY = base64.b64encode(b"k2-rotation-test-key-of-32-bytes").decode()
assert len(base64.b64decode(K2_KEY)) == 32

BEFORE = f"k1:{K1_KEY}"
ROTATING = f"k2:{K2_KEY},k1:{K1_KEY},default:{V1_KEY}"
WITHOUT_K1 = f"k2:{K2_KEY},default:{V1_KEY}"
ALL_KEY_TEXTS = (V1_KEY, K1_KEY, K2_KEY)

ORG = pb.VALUE_SOURCE_ORGANIZATION
DECRYPTED = pb.CONFIG_VIEW_DECRYPTED
BATCH = "3"


@pytest.fixture
async def database(postgres_database_factory: CreateDatabase) -> str:
    """A fresh, empty (and migrated) database of its own."""
    url = await postgres_database_factory()
    store = await PostgresStore.connect(url)
    await store.close()
    return url


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def report(self) -> dict[str, object]:
        parsed = json.loads(self.stdout)
        assert isinstance(parsed, dict)
        return parsed


async def cli(args: Sequence[str], url: str, keys: str, cwd: Path, seconds: float = 60) -> CliResult:
    """`integrations-service <args>` as a real process, without blocking the event loop (the service runs in it)."""
    env = clean_env({"DATABASE_URL": url, "INTEGRATION_ENCRYPTION_KEYS": keys, "INTEGRATIONS_LOG_FORMAT": "text"})
    process = await asyncio.create_subprocess_exec(
        str(SERVICE),
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    result = CliResult(process.returncode, stdout.decode(), stderr.decode())
    for key in ALL_KEY_TEXTS:
        assert key not in result.stdout + result.stderr, "a CLI command printed key material"
    return result


async def start(url: str, keys: str, tmp_path: Path) -> Running:
    return await start_service(url, tmp_path, {"INTEGRATION_ENCRYPTION_KEY": "", "INTEGRATION_ENCRYPTION_KEYS": keys})


async def insert_rows(url: str, rows: Sequence[tuple[str, str, str, Mapping[str, str]]]) -> None:
    """(id, organization, provider, config) the way the dashboard inserts them: its own columns, now()."""
    conn = await asyncpg.connect(url)
    try:
        await conn.executemany(
            "INSERT INTO integration_config (id, organization_id, provider, config, created_at, updated_at) "
            "VALUES ($1, $2, $3, $4::jsonb, now(), now())",
            [(row_id, org, provider, json.dumps(dict(config))) for row_id, org, provider, config in rows],
        )
    finally:
        await conn.close()


async def raw_rows(url: str) -> list[dict[str, object]]:
    """Every row as the database holds it, config as its stored JSON text, in id order."""
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch(
            "SELECT id, organization_id, provider, config::text AS config, version, created_at, updated_at "
            'FROM integration_config ORDER BY id COLLATE "C"'
        )
    finally:
        await conn.close()
    return [dict(record.items()) for record in records]


def stored_values(rows: Sequence[Mapping[str, object]]) -> dict[tuple[str, str], str]:
    """(row id, field) -> stored string."""
    return {(str(row["id"]), name): value for row in rows for name, value in json.loads(str(row["config"])).items()}


def v1(plaintext: str) -> str:
    return seal_v1(EncryptionKey.from_text(V1_KEY), plaintext, os.urandom(12))


async def read_clear(running: Running, org: str, provider: str) -> dict[str, str]:
    reply = await running.stub.GetProviderConfig(
        pb.GetProviderConfigRequest(organization_id=org, provider=provider, view=DECRYPTED)
    )
    return {key: value for key, (value, source) in values_of(reply.config).items() if source == ORG}


async def etag_of(running: Running, org: str, provider: str) -> str:
    reply = await running.stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider=provider))
    return reply.config.etag


# --- rotation under load ----------------------------------------------------------------------------


@dataclass
class Seed:
    # org -> (provider, the clear values it must keep)
    expected: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    from_keys: dict[str, int] = field(default_factory=lambda: {"plaintext": 0, "default": 0, "k1": 0})


async def seed(url: str, running_k1: Running) -> tuple[Seed, list[str]]:
    """Legacy plaintext rows, legacy enc:v1 rows, mixed rows, rows saved under k1, and the writers' rows."""
    result = Seed()
    raw: list[tuple[str, str, str, Mapping[str, str]]] = []
    for i in range(60):
        org, clear = f"legacy_plain_{i:03d}", {"secretKey": f"sk_test_plain_{i:04d}", "publishableKey": f"pk_{i}"}
        raw.append((f"plain-{i:03d}", org, "stripe", clear))
        result.expected[org] = ("stripe", clear)
        result.from_keys["plaintext"] += 2
    for i in range(60):
        org, clear = f"legacy_v1_{i:03d}", {"accountId": f"acc-v1-{i:04d}", "apiKey": f"easypay-key-v1-{i:04d}"}
        raw.append((f"v1-{i:03d}", org, "easypay", {k: v1(v) for k, v in clear.items()}))
        result.expected[org] = ("easypay", clear)
        result.from_keys["default"] += 2
    for i in range(20):
        org = f"legacy_mixed_{i:03d}"
        clear = {"antiPhishingKey": f"anti-mixed-{i:04d}", "mbKey": f"MB-mixed-{i:04d}"}
        raw.append(
            (
                f"mixed-{i:03d}",
                org,
                "ifthenpay",
                {"antiPhishingKey": v1(clear["antiPhishingKey"]), "mbKey": clear["mbKey"]},
            )
        )
        result.expected[org] = ("ifthenpay", clear)
        result.from_keys["default"] += 1
        result.from_keys["plaintext"] += 1
    await insert_rows(url, raw)

    for i in range(10):
        org = f"k1_org_{i:03d}"
        clear = {"secretKey": f"sk_test_k1_{i:04d}_abcdef", "publishableKey": f"pk_test_k1_{i:04d}"}
        await running_k1.stub.SaveIntegration(
            pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values=clear)
        )
        result.expected[org] = ("stripe", clear)
        result.from_keys["k1"] += 2
    # The writers' rows: antiPhishingKey under k1 (the writer never touches it, so rotation rewraps it
    # exactly once); the writer saves mbKey, always under the active key.
    writers = [f"writer_{i:02d}" for i in range(6)]
    for org in writers:
        clear = {"antiPhishingKey": f"anti-writer-{org}"}
        await running_k1.stub.SaveIntegration(
            pb.SaveIntegrationRequest(organization_id=org, provider="ifthenpay", values=clear)
        )
        result.expected[org] = ("ifthenpay", clear)
        result.from_keys["k1"] += 1
    return result, writers


async def test_rotation_under_concurrent_writes_and_reads_rewraps_everything_and_loses_nothing(
    database: str, tmp_path: Path
) -> None:
    before = await start(database, BEFORE, tmp_path)
    try:
        seeded, writers = await seed(database, before)
    finally:
        await before.close()
    rows_before = await raw_rows(database)
    assert len(rows_before) == 156
    assert {v.split(":")[1] if v.startswith("enc:") else "plain" for v in stored_values(rows_before).values()} == {
        "plain",
        "v1",
        "v2",
    }

    running = await start(database, ROTATING, tmp_path)
    stop = asyncio.Event()
    last_written: dict[str, str] = {}
    writes = 0
    failures: list[str] = []
    reads = 0

    async def writer(org: str) -> None:
        nonlocal writes
        for n in itertools.count():
            value = f"MB-{org}-{n:06d}"
            try:
                await running.stub.SaveIntegration(
                    pb.SaveIntegrationRequest(organization_id=org, provider="ifthenpay", values={"mbKey": value})
                )
            except grpc.aio.AioRpcError as error:
                failures.append(f"write {org}: {error.code().name} {error.details()}")
                return
            last_written[org] = value
            writes += 1
            # Read-your-write: this writer is the only one of this org, so an acknowledged value that a
            # rotation batch overwrote with an older one (a lost write) shows up here.
            try:
                got = (await read_clear(running, org, "ifthenpay")).get("mbKey")
            except grpc.aio.AioRpcError as error:
                failures.append(f"read {org}: {error.code().name} {error.details()}")
                return
            if got != value:
                failures.append(f"lost write {org}: wrote {value}, read back {got}")
            if stop.is_set():
                return

    async def reader() -> None:
        nonlocal reads
        for org in itertools.cycle(list(seeded.expected)):
            if stop.is_set():
                return
            provider, clear = seeded.expected[org]
            try:
                got = await read_clear(running, org, provider)
            except grpc.aio.AioRpcError as error:
                failures.append(f"read {org}: {error.code().name} {error.details()}")
                continue
            reads += 1
            mb = got.pop("mbKey", None) if org in writers else None
            if got != clear or (mb is not None and not mb.startswith(f"MB-{org}-")):
                failures.append(f"read {org}: unexpected values for fields {sorted(got)}")

    try:
        etags_before = {org: await etag_of(running, org, p) for org, (p, _) in seeded.expected.items()}
        tasks = [asyncio.create_task(writer(org)) for org in writers]
        tasks += [asyncio.create_task(reader()) for _ in range(2)]
        await asyncio.sleep(0.05)  # writers and readers are under way before the rotation starts
        try:
            rotated = await cli(["rotate", "--batch-size", BATCH], database, ROTATING, tmp_path)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        assert rotated.returncode == 0, rotated.stderr

        assert failures == []
        assert reads > 0
        assert writes >= 2 * len(writers)
        # Zero lost writes: what each writer wrote last is what is read back.
        for org in writers:
            got = await read_clear(running, org, "ifthenpay")
            assert got == {"antiPhishingKey": f"anti-writer-{org}", "mbKey": last_written[org]}
        # Every other value is still what was seeded, and its etag did not change.
        for org, (provider, clear) in seeded.expected.items():
            if org in writers:
                continue
            assert await read_clear(running, org, provider) == clear
            assert await etag_of(running, org, provider) == etags_before[org], org
    finally:
        await running.close()

    report = rotated.report()
    assert report == {
        "rows_scanned": 156,
        "rows_rewrapped": 156,
        "values_rewrapped": sum(seeded.from_keys.values()),
        "from_keys": seeded.from_keys,
        "active_key_id": "k2",
        "undecryptable": [],
        # The dashboard's values, all rewrapped: INTEGRATIONS_LEGACY_VALUES=refuse can be switched on.
        "legacy_values": {"plaintext": seeded.from_keys["plaintext"], "v1": seeded.from_keys["default"]},
        "legacy_values_remaining": 0,
        "unreadable_rows": [],
    }
    assert seeded.from_keys == {"plaintext": 140, "default": 140, "k1": 26}

    rows_after = await raw_rows(database)
    values_after = stored_values(rows_after)
    not_rewrapped = sorted(key for key, value in values_after.items() if not value.startswith("enc:v2:k2:"))
    assert not_rewrapped == []
    assert len(values_after) == 306 + len(writers)  # plus each writer's mbKey
    # Rotation only changes ciphertext: version and update time stay (the writers' rows moved on by themselves).
    untouched_before = {r["id"]: (r["version"], r["updated_at"]) for r in rows_before}
    for row in rows_after:
        if row["organization_id"] not in writers:
            assert (row["version"], row["updated_at"]) == untouched_before[row["id"]], row["organization_id"]

    # The rotation batches and the writers' saves overlapped in time, so the test did test concurrency.
    conn = await asyncpg.connect(database)
    try:
        window = await conn.fetchrow(
            "SELECT min(time) AS first, max(time) AS last, count(*) AS batches "
            "FROM audit_events WHERE rpc = 'RotateKeys'"
        )
        overlapping = await conn.fetchval(
            "SELECT count(*) FROM audit_events WHERE rpc = 'SaveIntegration' AND outcome = 'OK' "
            "AND organization_id = ANY($1::text[]) AND time BETWEEN $2 AND $3",
            writers,
            window["first"],
            window["last"],
        )
        callers = await conn.fetch("SELECT DISTINCT caller FROM audit_events WHERE rpc = 'RotateKeys'")
    finally:
        await conn.close()
    assert window["batches"] == 52  # 156 rows in batches of 3, every batch had rows to rewrap
    assert overlapping > 0, "no save landed while the rotation was running"
    assert len(callers) == 1
    assert str(callers[0]["caller"]).startswith("cli:rotate@")

    # A second run changes nothing, byte for byte.
    again = await cli(["rotate", "--batch-size", BATCH], database, ROTATING, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.report() == {
        "rows_scanned": 156,
        "rows_rewrapped": 0,
        "values_rewrapped": 0,
        "from_keys": {},
        "active_key_id": "k2",
        "undecryptable": [],
        "legacy_values": {"plaintext": 0, "v1": 0},
        "legacy_values_remaining": 0,
        "unreadable_rows": [],
    }
    assert await raw_rows(database) == rows_after


# --- retiring the old key ---------------------------------------------------------------------------


async def test_retire_key_only_once_nothing_needs_it_and_restart_without_it(database: str, tmp_path: Path) -> None:
    before = await start(database, BEFORE, tmp_path)
    try:
        for i in range(4):
            await before.stub.SaveIntegration(
                pb.SaveIntegrationRequest(
                    organization_id=f"org_{i}", provider="stripe", values={"secretKey": f"sk_test_retire_{i:04d}"}
                )
            )
    finally:
        await before.close()
    await insert_rows(database, [("legacy-1", "org_legacy", "easypay", {"apiKey": v1("easypay-legacy-key")})])

    # Before rotation: k1 still encrypts 4 values.
    refused = await cli(["retire-key", "k1"], database, ROTATING, tmp_path)
    assert refused.returncode != 0
    assert "'k1'" in refused.stderr
    assert "still encrypts 4 stored values" in refused.stderr
    assert "rotate" in refused.stderr
    # ...and starting without k1 fails, naming it.
    with pytest.raises(ConfigurationError) as caught:
        await start(database, WITHOUT_K1, tmp_path)
    assert "'k1'" in str(caught.value)
    assert "not configured but not retired" in str(caught.value)
    assert not any(key in str(caught.value) for key in ALL_KEY_TEXTS)

    # The active key can never be retired.
    active = await cli(["retire-key", "k2"], database, ROTATING, tmp_path)
    assert active.returncode != 0
    assert "'k2' is the active key" in active.stderr

    rotated = await cli(["rotate", "--batch-size", BATCH], database, ROTATING, tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.report()["from_keys"] == {"k1": 4, "default": 1}

    # Rotated, but not retired yet: the store still says values may need k1.
    with pytest.raises(ConfigurationError, match="'k1'"):
        await start(database, WITHOUT_K1, tmp_path)

    retired = await cli(["retire-key", "k1"], database, ROTATING, tmp_path)
    assert retired.returncode == 0, retired.stderr

    after = await start(database, WITHOUT_K1, tmp_path)
    try:
        for i in range(4):
            assert await read_clear(after, f"org_{i}", "stripe") == {"secretKey": f"sk_test_retire_{i:04d}"}
        assert await read_clear(after, "org_legacy", "easypay") == {"apiKey": "easypay-legacy-key"}
    finally:
        await after.close()

    conn = await asyncpg.connect(database)
    try:
        keys = {
            r["key_id"]: r["retired"]
            for r in await conn.fetch("SELECT key_id, retired_at IS NOT NULL AS retired FROM encryption_keys")
        }
        retire_events = await conn.fetch(
            "SELECT caller, outcome, details::text AS details FROM audit_events WHERE rpc = 'RetireKey'"
        )
    finally:
        await conn.close()
    assert keys == {"k1": True, "k2": False, "default": False}
    assert len(retire_events) == 1
    assert retire_events[0]["outcome"] == "OK"
    assert json.loads(retire_events[0]["details"]) == {"key_id": "k1"}


# --- values that cannot be decrypted ----------------------------------------------------------------


async def test_an_undecryptable_value_is_reported_and_the_rest_of_its_batch_still_rotates(
    database: str, tmp_path: Path
) -> None:
    clear = {
        f"row-{i:02d}": {"secretKey": f"sk_test_batch_{i:04d}", "publishableKey": f"pk_test_batch_{i:04d}"}
        for i in range(1, 10)
    }
    configs = {row_id: {k: v1(v) for k, v in values.items()} for row_id, values in clear.items()}
    bad = tampered(configs["row-05"]["secretKey"])
    configs["row-05"]["secretKey"] = bad
    # Batches of 3 by id: row-05 sits in the middle of the second batch.
    await insert_rows(database, [(row_id, f"org_{row_id}", "stripe", config) for row_id, config in configs.items()])

    result = await cli(["rotate", "--batch-size", BATCH], database, WITHOUT_K1, tmp_path)
    assert result.returncode != 0
    report = result.report()
    assert report["undecryptable"] == [{"row_id": "row-05", "field": "secretKey"}]
    assert report["rows_rewrapped"] == 9
    assert report["values_rewrapped"] == 17
    assert report["from_keys"] == {"default": 17}
    output = result.stdout + result.stderr
    assert bad not in output
    assert bad[len("enc:v1:") :][:16] not in output
    assert not any(value in output for values in clear.values() for value in values.values())

    values = stored_values(await raw_rows(database))
    assert values.pop(("row-05", "secretKey")) == bad  # left exactly as it was
    assert all(value.startswith("enc:v2:k2:") for value in values.values())

    running = await start(database, WITHOUT_K1, tmp_path)
    try:
        for row_id in ("row-04", "row-06", "row-09"):
            assert await read_clear(running, f"org_{row_id}", "stripe") == clear[row_id]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_clear(running, "org_row-05", "stripe")
        error = rich_error(caught.value)
        assert error.code is grpc.StatusCode.DATA_LOSS
        assert "secretKey" in error.message
    finally:
        await running.close()


async def test_a_damaged_value_under_the_active_key_is_reported_not_counted_as_rotated(
    database: str, tmp_path: Path
) -> None:
    clear = {f"row-{i:02d}": {"secretKey": f"sk_test_damaged_{i:04d}"} for i in range(1, 5)}
    await insert_rows(
        database, [(row_id, f"org_{row_id}", "stripe", {k: v1(v) for k, v in c.items()}) for row_id, c in clear.items()]
    )
    first = await cli(["rotate", "--batch-size", BATCH], database, WITHOUT_K1, tmp_path)
    assert first.returncode == 0, first.stderr
    values = stored_values(await raw_rows(database))
    # Both still start with enc:v2:k2: (the active key): one with a wrong tag, one moved from row-01 to row-03.
    bad = tampered(values[("row-02", "secretKey")])
    moved = values[("row-01", "secretKey")]
    conn = await asyncpg.connect(database)
    try:
        for row_id, value in (("row-02", bad), ("row-03", moved)):
            await conn.execute(
                "UPDATE integration_config SET config = $2::jsonb WHERE id = $1",
                row_id,
                json.dumps({"secretKey": value}),
            )
    finally:
        await conn.close()
    rows_before = await raw_rows(database)

    result = await cli(["rotate", "--batch-size", BATCH], database, WITHOUT_K1, tmp_path)

    assert result.returncode == 1
    report = result.report()
    assert report["undecryptable"] == [
        {"row_id": "row-02", "field": "secretKey"},
        {"row_id": "row-03", "field": "secretKey"},
    ]
    assert (report["rows_scanned"], report["rows_rewrapped"], report["values_rewrapped"]) == (4, 0, 0)
    assert "rotation incomplete" in result.stderr
    output = result.stdout + result.stderr
    for value in (bad, moved):
        assert value not in output
        assert value[len("enc:v2:k2:") :][:16] not in output
    assert await raw_rows(database) == rows_before  # nothing written, not even the etag or updated_at


async def test_retire_key_is_refused_while_a_row_is_unreadable_and_may_still_need_the_key(
    database: str, tmp_path: Path
) -> None:
    # A hand-written fix that double-encoded a row: its config is a JSON string holding the object, whose
    # value is under k1. Repairing it needs k1, so k1 must not be retired (and then dropped) meanwhile.
    inner = json.dumps({"secretKey": "enc:v2:k1:AAAA"})
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(
            "INSERT INTO integration_config (id, organization_id, provider, config, created_at, updated_at) "
            "VALUES ('double-encoded', 'org_x', 'stripe', $1::jsonb, now(), now())",
            json.dumps(inner),
        )
    finally:
        await conn.close()
    running = await start(database, ROTATING, tmp_path)  # registers k1, k2 and default
    await running.close()

    rotated = await cli(["rotate"], database, ROTATING, tmp_path)
    assert rotated.returncode == 1
    assert rotated.report()["unreadable_rows"] == ["double-encoded"]

    refused = await cli(["retire-key", "k1"], database, ROTATING, tmp_path)
    assert refused.returncode == 1
    assert "not a JSON object" in refused.stderr
    assert "'double-encoded'" in refused.stderr
    assert "AAAA" not in refused.stderr + refused.stdout
    conn = await asyncpg.connect(database)
    try:
        retired = await conn.fetchval("SELECT retired_at IS NOT NULL FROM encryption_keys WHERE key_id = 'k1'")
    finally:
        await conn.close()
    assert retired is False


@pytest.mark.parametrize("batch_size", ["0", "-5"])
async def test_a_batch_size_below_one_is_refused_not_a_rotation_of_nothing(
    database: str, tmp_path: Path, batch_size: str
) -> None:
    # With 0 rows per batch the scan found nothing: exit 0, rows_scanned 0, as if no value needed the old key.
    await insert_rows(database, [("plain-1", "org_plain", "stripe", {"secretKey": "sk_test_batch_size_0001"})])

    result = await cli(["rotate", "--batch-size", batch_size], database, ROTATING, tmp_path)

    assert result.returncode == 2
    assert "--batch-size" in result.stderr
    assert "at least 1" in result.stderr
    assert result.stdout == ""
    assert stored_values(await raw_rows(database)) == {("plain-1", "secretKey"): "sk_test_batch_size_0001"}


@pytest.mark.parametrize("mistaken", [f"k1:{K1_KEY}", K1_KEY, base64.b16encode(base64.b64decode(K1_KEY)).decode()])
async def test_retire_key_given_key_material_instead_of_an_id_never_repeats_it(
    database: str, tmp_path: Path, mistaken: str
) -> None:
    # `k1:<key>` is how a keyring names a key: pasted as the id, it was repeated in the refusal's log line.
    result = await cli(["retire-key", mistaken], database, ROTATING, tmp_path)

    assert result.returncode == 2
    assert "not a key id" in result.stderr
    output = result.stdout + result.stderr
    assert K1_KEY not in output
    assert K1_KEY[:12] not in output
    assert mistaken[-16:] not in output


# --- the store lost in the middle of a run ---------------------------------------------------------


async def test_rotate_cut_off_by_an_outage_says_it_stopped_part_way_and_a_second_run_finishes(
    database: str, tmp_path: Path
) -> None:
    total = 400
    await insert_rows(
        database,
        [(f"row-{i:04d}", f"org_{i:04d}", "stripe", {"secretKey": v1(f"sk_test_cut_{i:04d}")}) for i in range(total)],
    )
    parts = urlsplit(database)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    env = clean_env(
        {
            "DATABASE_URL": _with_address(database, "127.0.0.1", proxy.port),
            "INTEGRATION_ENCRYPTION_KEYS": WITHOUT_K1,
            "INTEGRATIONS_LOG_FORMAT": "text",
            "INTEGRATIONS_DB_TIMEOUT": "2",
        }
    )
    process = await asyncio.create_subprocess_exec(
        str(SERVICE),
        "rotate",
        "--batch-size",
        "1",
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while sum("rotation progress" in line for line in lines) < 3:
                line = (await process.stderr.readline()).decode()
                assert line, "rotate ended before the store was cut: " + "".join(lines)
                lines.append(line)
            await proxy.stop()  # the store goes away mid-run
            rest, stdout = await asyncio.gather(process.stderr.read(), process.stdout.read())
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = "".join(lines) + rest.decode()

    assert process.returncode == 1
    assert "cannot start" not in stderr
    assert "rotation stopped part-way" in stderr
    assert "run `integrations-service rotate` again to resume" in stderr
    assert stdout == b""  # no report: the run did not finish
    assert not any(key in stderr for key in ALL_KEY_TEXTS)
    found = re.search(r"(\d+) rows scanned, (\d+) rewrapped", stderr.split("rotation stopped part-way")[1])
    assert found is not None
    done = int(found[2])
    assert 3 <= done < total

    again = await cli(["rotate"], database, WITHOUT_K1, tmp_path)
    assert again.returncode == 0, again.stderr
    report = again.report()
    assert report["rows_scanned"] == total
    assert report["undecryptable"] == []
    # What was done is not done again (the batch in flight may have committed unacknowledged: at most one more).
    assert total - done - 1 <= report["rows_rewrapped"] <= total - done  # type: ignore[operator]
    assert all(value.startswith("enc:v2:k2:") for value in stored_values(await raw_rows(database)).values())
