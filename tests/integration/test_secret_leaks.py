"""No credential value, key or plaintext reaches a log line, an error message or the audit trail.

Distinctive secrets are planted everywhere a value can travel: valid saves,
refused saves whose bad value is itself a secret, environment fallbacks, the
encryption keys, rows tampered with behind the service's back (DATA_LOSS),
rows the service cannot read at all (error paths), a legacy plaintext value.
Then every byte the service logged is searched for the secrets, for each of
their 12-character pieces, and for the keys in each of their text forms; and
so is every error message a client was given, and the audit trail.

Twice: a real `integrations-service serve` process (JSON and text log
formats, stderr read in full after SIGTERM), and in-process with caplog at
DEBUG, which also sees the libraries' debug records. Positive controls (one
log line per RPC, in order, with its code and organization; a traceback for
the INTERNAL error; audit records for the organization) make sure each
search ran over a log that really captured the traffic.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service.crypto import EncryptionKey
from integrations_service.logs import JsonFormatter, TextFormatter
from tests.harness import Running, rich_error, start_service
from tests.processes import Processes, clean_env, own_store_location

OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
DATA_LOSS = grpc.StatusCode.DATA_LOSS
DECRYPTED = pb.CONFIG_VIEW_DECRYPTED
MASKED = pb.CONFIG_VIEW_MASKED

# Every planted secret is distinctive: each of its 12-character pieces holds a digit or a capital,
# so none is an ordinary word of a log line (checked below).
SK = "sk_live_PLANTED0secret0value0XYZ123"
WEBHOOK = "whsec_PLANTED0webhook0secret0ABC789"
PK = "pk_live_51PublicNotSecret0001"  # publishable: shown in clear by design, not planted
SMTP_PASSWORD = "PLANTED0smtp0password0HIJ159"
ANTI_PHISHING = "PLANTED0anti0phish0key0DEF456"
MB_KEY = "PLANTED0multibanco0key0NOP258"
ANTI_PHISHING_NEW = "PLANTED0anti0phish0new0QRS852"
MB_KEY_NEW = "PLANTED0multibanco0new0TUV963"
MBWAY_KEY = "PLANTED0mbway0refused0key0WXY741"
RESEND_KEY = "re_PLANTED0resend0org0key0ZAB357"
GA_SECRET = "PLANTED0ga0api0secret0CDE486"
# Environment fallbacks of providers the organization never saves.
ENV_FALLBACKS = {
    "EASYPAY_API_KEY": "PLANTED0easypay0env0apikey0GHI321",
    "RESEND_API_KEY": "re_PLANTED0resend0env0apikey0JKL654",
}
# Refused saves: the offending value is itself a secret.
WRONG_PREFIX = "pk_PLANTED0wrong0prefix0secret0MNO987"
TOO_LONG = "sk_live_" + "PLANTED0too0long0value0" * 200
MASKED_BACK = "••••••••PLANTED0masked0back0PQR147"
UNKNOWN_FIELD_VALUE = "PLANTED0unknown0field0value0STU258"
MIXED_MODE = "sk_test_PLANTED0mixed0mode0VWX369"
STALE_ETAG_VALUE = "sk_live_PLANTED0stale0etag0value0YZA470"
UNKNOWN_PROVIDER_VALUE = "PLANTED0unknown0provider0value0BCD581"
NO_ORGANIZATION_VALUE = "sk_live_PLANTED0no0org0id0EFG692"
# Planted into rows behind the service's back.
UNKNOWN_VERSION = "enc:v9:PLANTED0unknown0format0row0HIJ703"
LEGACY_PLAINTEXT = "PLANTED0legacy0plaintext0row0KLM814"
ARRAY_ROW_VALUE = "PLANTED0array0row0value0NOP925"
BROKEN_JSON_VALUE = "PLANTED0broken0json0row0QRS036"

PLANTED = (
    SK,
    WEBHOOK,
    SMTP_PASSWORD,
    ANTI_PHISHING,
    MB_KEY,
    ANTI_PHISHING_NEW,
    MB_KEY_NEW,
    MBWAY_KEY,
    RESEND_KEY,
    GA_SECRET,
    *ENV_FALLBACKS.values(),
    WRONG_PREFIX,
    TOO_LONG,
    MASKED_BACK,
    UNKNOWN_FIELD_VALUE,
    MIXED_MODE,
    STALE_ETAG_VALUE,
    UNKNOWN_PROVIDER_VALUE,
    NO_ORGANIZATION_VALUE,
    UNKNOWN_VERSION,
    LEGACY_PLAINTEXT,
    ARRAY_ROW_VALUE,
    BROKEN_JSON_VALUE,
)
PIECE = 12


def key_forms(key: EncryptionKey) -> list[str]:
    """A key as text in every form it could be written: base64 (both alphabets, with and without padding), hex."""
    raw = base64.b64decode(key.to_text())
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    return [standard, standard.rstrip("="), urlsafe, urlsafe.rstrip("="), raw.hex(), raw.hex().upper()]


def pieces(secret: str) -> set[str]:
    return {secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)} or {secret}


def leaked(text: str, secrets: tuple[str, ...] | list[str]) -> list[str]:
    """The secrets of which `text` holds the whole value or a piece of 12 characters or more."""
    return [secret[:40] for secret in secrets if any(piece in text for piece in pieces(secret))]


def test_the_leak_search_finds_what_it_looks_for() -> None:
    key = EncryptionKey.generate()
    assert leaked(f"x {SK} y", [SK]) == [SK]
    assert leaked(f"...{TOO_LONG[100:112]}...", [TOO_LONG]) == [TOO_LONG[:40]]
    assert leaked(f"key={base64.b64decode(key.to_text()).hex()}", key_forms(key))
    assert leaked(f"key={base64.urlsafe_b64encode(base64.b64decode(key.to_text())).decode()}", key_forms(key))
    assert not leaked(SK[: PIECE - 1], [SK])
    assert not leaked("sk_live_ whsec_ PLANTED enc:v9: organization_id antiPhishingKey", PLANTED)
    for secret in PLANTED:
        assert all(re.search(r"[0-9A-Z]", piece) for piece in pieces(secret)), secret


# --- keys ------------------------------------------------------------------------------------------------


@dataclass
class Keys:
    """The service's key settings and every key in them."""

    env: dict[str, str]
    keys: list[EncryptionKey]

    @property
    def secrets(self) -> list[str]:
        return [form for key in self.keys for form in key_forms(key)]

    @property
    def raw(self) -> list[bytes]:
        return [base64.b64decode(key.to_text()) for key in self.keys]


def keys_for(source: str, directory: Path) -> Keys:
    active, old = EncryptionKey.generate(), EncryptionKey.generate()
    if source == "single":
        return Keys({"INTEGRATION_ENCRYPTION_KEY": active.to_text()}, [active])
    if source == "keyring":  # active as base64, a decrypt-only one as hex
        hex_old = base64.b64decode(old.to_text()).hex()
        return Keys({"INTEGRATION_ENCRYPTION_KEYS": f"k2:{active.to_text()},k1:{hex_old}"}, [active, old])
    assert source == "file"
    path = directory / "keyring"
    path.write_text(f"# newest first\nk2:{active.to_text()}\nk1:{old.to_text()}\n")
    path.chmod(0o600)
    return Keys({"INTEGRATION_ENCRYPTION_KEY_FILE": str(path)}, [active, old])


# --- raw rows --------------------------------------------------------------------------------------------


@dataclass
class RawRows:
    """The store's tables, read and written with plain SQL behind the service's back."""

    kind: str
    where: str

    async def _fetch(self, sql: str, *args: str) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            # On a thread: the in-process service shares this event loop, and an audit flush it has begun
            # (holding the file's write lock) can only finish while the loop runs.
            def fetch() -> list[tuple[Any, ...]]:
                with closing(sqlite3.connect(self.where, timeout=10)) as conn:
                    return list(conn.execute(sql.replace("$1", "?").replace("$2", "?"), args).fetchall())

            return await asyncio.to_thread(fetch)
        conn = await asyncpg.connect(self.where)
        try:
            return [tuple(record) for record in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    async def config(self, organization_id: str, provider: str) -> dict[str, str]:
        cast = "" if self.kind == "sqlite" else "::text"
        rows = await self._fetch(
            f"SELECT config{cast} FROM integration_config WHERE organization_id = $1 AND provider = $2",
            organization_id,
            provider,
        )
        assert len(rows) == 1, f"no row for {organization_id}/{provider}"
        return json.loads(rows[0][0])  # type: ignore[no-any-return]

    async def set_config_text(self, organization_id: str, provider: str, text: str) -> None:
        if self.kind == "sqlite":

            def update() -> int:  # on a thread, as in _fetch
                with closing(sqlite3.connect(self.where, timeout=10)) as conn, conn:
                    return int(
                        conn.execute(
                            "UPDATE integration_config SET config = ? WHERE organization_id = ? AND provider = ?",
                            (text, organization_id, provider),
                        ).rowcount
                    )

            changed = await asyncio.to_thread(update)
        else:
            conn = await asyncpg.connect(self.where)
            try:
                status = await conn.execute(
                    "UPDATE integration_config SET config = $3::jsonb WHERE organization_id = $1 AND provider = $2",
                    organization_id,
                    provider,
                    text,
                )
            finally:
                await conn.close()
            changed = int(status.split()[-1])
        assert changed == 1

    async def set_value(self, organization_id: str, provider: str, key: str, value: str) -> None:
        config = await self.config(organization_id, provider)
        config[key] = value
        await self.set_config_text(organization_id, provider, json.dumps(config, ensure_ascii=False))

    async def audit_rows(self) -> list[str]:
        """Every audit record, each as the text of all its columns."""
        if self.kind == "sqlite":
            return [repr(row) for row in await self._fetch("SELECT * FROM audit_events")]
        return [str(row[0]) for row in await self._fetch("SELECT row_to_json(a)::text FROM audit_events a")]


def tampered(stored: str) -> str:
    """The stored ciphertext with one base64 character changed (inside the sealed bytes, not the padding)."""
    index = len(stored.rstrip("=")) - 6
    assert stored[index].isalnum() or stored[index] in "+/", stored
    return stored[:index] + ("A" if stored[index] != "A" else "B") + stored[index + 1 :]


# --- the scenario ----------------------------------------------------------------------------------------


@dataclass
class Call:
    rpc: str
    organization_id: str
    code: grpc.StatusCode
    told: str  # everything the client was told on failure: message, violated fields and their descriptions
    request_id: str = ""


@dataclass
class Client:
    stub: pb_grpc.IntegrationServiceStub
    calls: list[Call] = field(default_factory=list)

    async def __call__(self, rpc: str, request: Any, expect: grpc.StatusCode | tuple[grpc.StatusCode, ...] = OK) -> Any:
        expected = expect if isinstance(expect, tuple) else (expect,)
        organization_id = request.organization_id
        try:
            reply = await getattr(self.stub, rpc)(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            rich = rich_error(error)
            told = "\n".join([rich.message, *rich.violations, *rich.violations.values()])
            self.calls.append(Call(rpc, organization_id, rich.code, told, rich.request_id))
            assert rich.code in expected, f"{rpc}: {rich}"
            assert rich.request_id, f"{rpc}: no request id in {rich}"
            return rich
        self.calls.append(Call(rpc, organization_id, OK, ""))
        assert OK in expected, f"{rpc} succeeded, expected {expected}"
        return reply


def save(organization_id: str, provider: str, etag: str = "", **values: str) -> pb.SaveIntegrationRequest:
    return pb.SaveIntegrationRequest(organization_id=organization_id, provider=provider, values=values, etag=etag)


def get(organization_id: str, provider: str, view: int = pb.CONFIG_VIEW_UNSPECIFIED) -> pb.GetProviderConfigRequest:
    return pb.GetProviderConfigRequest(organization_id=organization_id, provider=provider, view=view)  # type: ignore[arg-type]


def delete(
    organization_id: str, provider: str, etag: str = "", allow_missing: bool = False
) -> pb.DeleteIntegrationRequest:
    return pb.DeleteIntegrationRequest(
        organization_id=organization_id, provider=provider, etag=etag, allow_missing=allow_missing
    )


def assert_masked(reply: Any) -> None:
    assert not leaked(str(reply), PLANTED), reply


def masked(secret: str) -> str:
    return "••••••••" + secret[-4:]


async def run_scenario(call: Client, rows: RawRows, org: str) -> None:
    """Every RPC, refusal and error path, with planted secrets. Asserts the replies as it goes."""
    await call("ListProviders", pb.ListProvidersRequest(organization_id=org))

    saved = await call("SaveIntegration", save(org, "stripe", secretKey=SK, webhookSecret=WEBHOOK, publishableKey=PK))
    assert_masked(saved)
    assert saved.config.values["secretKey"].value == masked(SK)
    assert_masked(await call("GetProviderConfig", get(org, "stripe")))
    assert_masked(await call("GetProviderConfig", get(org, "stripe", MASKED)))
    clear = (await call("GetProviderConfig", get(org, "stripe", DECRYPTED))).config
    assert (clear.values["secretKey"].value, clear.values["webhookSecret"].value) == (SK, WEBHOOK)

    # Environment fallbacks: in clear only in the decrypted view.
    easypay = (await call("GetProviderConfig", get(org, "easypay", DECRYPTED))).config
    assert easypay.values["apiKey"].value == ENV_FALLBACKS["EASYPAY_API_KEY"]
    assert easypay.values["apiKey"].source == pb.VALUE_SOURCE_ENVIRONMENT
    resend = (await call("GetProviderConfig", get(org, "resend"))).config
    # The platform's secret: the mask alone, not even its last 4 characters.
    assert (resend.values["apiKey"].value, resend.values["apiKey"].source) == ("••••••••", pb.VALUE_SOURCE_ENVIRONMENT)
    assert_masked(resend)

    assert_masked(
        await call(
            "SaveIntegration",
            save(
                org, "smtp", host="smtp.example.com", port="587", password=SMTP_PASSWORD, fromAddress="shop@example.com"
            ),
        )
    )
    assert_masked(await call("SaveIntegration", save(org, "ifthenpay", antiPhishingKey=ANTI_PHISHING, mbKey=MB_KEY)))

    # Refused saves whose offending value is a secret: nothing stored, nothing echoed.
    for values in (
        {"secretKey": WRONG_PREFIX},
        {"secretKey": TOO_LONG},
        {"secretKey": MASKED_BACK},
        {"nope": UNKNOWN_FIELD_VALUE},
        {"secretKey": MIXED_MODE},  # a test key next to the stored live publishable key
        {"secretKey": WRONG_PREFIX, "webhookSecret": MASKED_BACK, "publishableKey": MIXED_MODE},
    ):
        await call("SaveIntegration", save(org, "stripe", **values), INVALID_ARGUMENT)
    await call("SaveIntegration", save(org, "stripe", "0" * 18, secretKey=STALE_ETAG_VALUE), grpc.StatusCode.ABORTED)
    await call("SaveIntegration", save(org, "paypal", apiKey=UNKNOWN_PROVIDER_VALUE), grpc.StatusCode.NOT_FOUND)
    await call("SaveIntegration", save("", "stripe", secretKey=NO_ORGANIZATION_VALUE), INVALID_ARGUMENT)
    after = (await call("GetProviderConfig", get(org, "stripe", DECRYPTED))).config
    assert after.values["secretKey"].value == SK
    assert after.etag == saved.config.etag

    # DATA_LOSS: a tampered ciphertext. Reads, and saves of other fields, are refused naming the field.
    stored = await rows.config(org, "ifthenpay")
    await rows.set_value(org, "ifthenpay", "antiPhishingKey", tampered(stored["antiPhishingKey"]))
    for view in (MASKED, DECRYPTED):
        error = await call("GetProviderConfig", get(org, "ifthenpay", view), DATA_LOSS)
        assert "antiPhishingKey" in error.message
        assert org in error.message
    await call("SaveIntegration", save(org, "ifthenpay", mbwayKey=MBWAY_KEY), DATA_LOSS)
    # ...and a value in a format the service does not know, holding planted text.
    await rows.set_value(org, "ifthenpay", "mbKey", UNKNOWN_VERSION)
    await call("SaveIntegration", save(org, "ifthenpay", antiPhishingKey=ANTI_PHISHING_NEW), DATA_LOSS)
    await call("GetProviderConfig", get(org, "ifthenpay", DECRYPTED), DATA_LOSS)
    # Saving new values repairs the row.
    await call("SaveIntegration", save(org, "ifthenpay", antiPhishingKey=ANTI_PHISHING_NEW, mbKey=MB_KEY_NEW))
    repaired = (await call("GetProviderConfig", get(org, "ifthenpay", DECRYPTED))).config
    assert (repaired.values["antiPhishingKey"].value, repaired.values["mbKey"].value) == (ANTI_PHISHING_NEW, MB_KEY_NEW)

    # A legacy (dashboard-era) plaintext value: masked on read, kept by a save of another field.
    await rows.set_value(org, "smtp", "password", LEGACY_PLAINTEXT)
    smtp = (await call("GetProviderConfig", get(org, "smtp"))).config
    assert smtp.values["password"].value == masked(LEGACY_PLAINTEXT)
    assert_masked(smtp)
    assert_masked(await call("SaveIntegration", save(org, "smtp", host="smtp2.example.com")))
    smtp = (await call("GetProviderConfig", get(org, "smtp", DECRYPTED))).config
    assert smtp.values["password"].value == LEGACY_PLAINTEXT

    # Error paths: rows the service cannot read at all.
    await call("SaveIntegration", save(org, "resend", apiKey=RESEND_KEY, fromAddress="Shop <shop@example.com>"))
    await rows.set_config_text(org, "resend", json.dumps([ARRAY_ROW_VALUE]))
    await call("GetProviderConfig", get(org, "resend", DECRYPTED), DATA_LOSS)
    await call("ListProviders", pb.ListProvidersRequest(organization_id=org))
    await call("DeleteIntegration", delete(org, "resend"))  # deleting is the repair
    if rows.kind == "sqlite":  # PostgreSQL's jsonb cannot hold broken JSON
        await call("SaveIntegration", save(org, "google_analytics", measurementId="G-LEAKS0001", apiSecret=GA_SECRET))
        await rows.set_config_text(org, "google_analytics", '{"apiSecret": "' + BROKEN_JSON_VALUE)
        await call(
            "GetProviderConfig",
            get(org, "google_analytics", DECRYPTED),
            DATA_LOSS,
        )

    # Deletes: a stale etag, the current one, then a missing row.
    await call("DeleteIntegration", delete(org, "stripe", etag="0" * 18), grpc.StatusCode.ABORTED)
    await call("DeleteIntegration", delete(org, "stripe", etag=after.etag))
    await call("DeleteIntegration", delete(org, "stripe"), grpc.StatusCode.NOT_FOUND)
    await call("DeleteIntegration", delete(org, "stripe", allow_missing=True))
    gone = (await call("GetProviderConfig", get(org, "stripe", DECRYPTED))).config
    assert gone.values["secretKey"].source == pb.VALUE_SOURCE_UNSET

    # The audit trail, as an admin reads it.
    trail = await call("ListAuditEvents", pb.ListAuditEventsRequest(organization_id=org, page_size=500))
    assert trail.events
    assert not leaked(str(trail), PLANTED), "the audit trail holds a planted value"

    failures = [c for c in call.calls if c.code is not OK]
    assert len(failures) >= 15
    for failure in failures:
        assert not leaked(failure.told, PLANTED), f"{failure.rpc} {failure.code.name} told the client: {failure.told}"


async def check_audit_table(rows: RawRows, org: str, secrets: list[str]) -> None:
    """After shutdown (buffered records written): the stored trail holds no value, and does hold the traffic."""
    audit = await rows.audit_rows()
    assert sum(org in row for row in audit) >= 10
    assert any("fingerprint." in row for row in audit)
    for row in audit:
        assert not leaked(row, secrets), f"audit record holds a secret: {row[:300]}"


def database_url(kind: str, where: str) -> str:
    return f"sqlite:///{where}" if kind == "sqlite" else where


def new_org() -> str:
    return f"org_leaks_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def own_store(store_location: tuple[str, str], request: pytest.FixtureRequest) -> tuple[str, str]:
    # Keys of the test's own: PostgreSQL needs a database of its own (the service checks its keys).
    return own_store_location(store_location, request)


# --- a real process, its whole output --------------------------------------------------------------------


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as started:
        yield started


RPC_PREFIX = "/integrations.v1.IntegrationService/"
TEXT_RPC_LINE = re.compile(r"rpc finished rpc=(\S+) code=(\w+)")


def rpc_lines(log: str, json_lines: bool) -> list[tuple[str, str, str]]:
    """(rpc, code, whole line) of each per-RPC log line of the IntegrationService."""
    found = []
    for line in log.splitlines():
        if json_lines:
            entry = json.loads(line)  # every line is one JSON object
            rpc, code = entry.get("rpc"), entry.get("code")
        else:
            match = TEXT_RPC_LINE.search(line)
            rpc, code = match.groups() if match else (None, None)
        if rpc and code and rpc.startswith(RPC_PREFIX):
            found.append((rpc.removeprefix(RPC_PREFIX), code, line))
    return found


@pytest.mark.parametrize(("log_format", "key_source"), [("json", "keyring"), ("text", "file")])
async def test_a_serving_process_logs_no_secret(
    own_store: tuple[str, str], log_format: str, key_source: str, tmp_path: Path, processes: Processes
) -> None:
    kind, where = own_store
    keys = keys_for(key_source, tmp_path)
    env = clean_env(
        {
            "INTEGRATIONS_LOG_FORMAT": log_format,
            "DATABASE_URL": database_url(kind, where),
            **keys.env,
            **ENV_FALLBACKS,
        }
    )
    server = processes.serve(tmp_path / "work", env)
    org = new_org()
    rows = RawRows(kind, where)
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = Client(pb_grpc.IntegrationServiceStub(channel))
        await run_scenario(call, rows, org)
    assert server.terminate() == 0

    log = server.output()
    assert not leaked(log, [*PLANTED, *keys.secrets]), "a secret reached the log"
    raw_output = server.stderr_path.read_bytes() + server.stdout_path.read_bytes()
    assert not any(raw in raw_output for raw in keys.raw)

    # Positive controls: the log really holds the traffic, one line per RPC, in order, with its code.
    lines = rpc_lines(log, json_lines=log_format == "json")
    assert [(rpc, code) for rpc, code, _ in lines] == [(c.rpc, c.code.name) for c in call.calls]
    assert [org in line for _, _, line in lines] == [c.organization_id == org for c in call.calls]
    assert "shutting down" in log
    for internal in (c for c in call.calls if c.code is grpc.StatusCode.INTERNAL):
        # Logged with its request id and stack trace, which were searched too.
        assert "Traceback" in log
        assert internal.request_id in internal.told
        assert sum(internal.request_id in line for line in log.splitlines()) >= 2
    await check_audit_table(rows, org, [*PLANTED, *keys.secrets])


# --- in-process, every record at DEBUG ---------------------------------------------------------------------


@dataclass
class InProcess:
    running: Running
    rows: RawRows
    keys: Keys
    closed: bool = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.running.close()


@pytest.fixture
async def in_process(own_store: tuple[str, str], tmp_path: Path) -> AsyncIterator[InProcess]:
    kind, where = own_store
    keys = keys_for("single", tmp_path)
    running = await start_service(database_url(kind, where), tmp_path, {**keys.env, **ENV_FALLBACKS})
    service = InProcess(running, RawRows(kind, where), keys)
    try:
        yield service
    finally:
        await service.close()


def record_texts(record: logging.LogRecord) -> list[str]:
    """Everything a handler could write of a record: message, exception, stack, and both service formats."""
    texts = [record.getMessage(), record.name]
    formatter = logging.Formatter()
    if record.exc_info:
        texts.append(formatter.formatException(record.exc_info))
    if record.exc_text:
        texts.append(record.exc_text)
    if record.stack_info:
        texts.append(formatter.formatStack(record.stack_info))
    texts += [JsonFormatter().format(record), TextFormatter().format(record)]
    return texts


async def test_no_log_record_holds_a_secret_even_at_debug(
    in_process: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    org = new_org()
    caplog.set_level(logging.DEBUG)
    call = Client(in_process.running.stub)
    await run_scenario(call, in_process.rows, org)
    await in_process.close()  # the buffered audit records are written, and logged, at shutdown

    secrets = [*PLANTED, *in_process.keys.secrets]
    for record in caplog.records:
        for text in record_texts(record):
            found = leaked(text, secrets)
            assert not found, f"{record.name} {record.levelname}: {text[:300]}"

    # Positive controls: one record per RPC of the organization, in order, with its code; the INTERNAL traceback.
    # (By organization: the session's event loop may run other tests' services, whose records land here too.)
    per_rpc = [
        (str(r.rpc).removeprefix(RPC_PREFIX), str(r.code))  # type: ignore[attr-defined]
        for r in caplog.records
        if str(getattr(r, "rpc", "")).startswith(RPC_PREFIX) and getattr(r, "organization_id", None) == org
    ]
    assert per_rpc == [(c.rpc, c.code.name) for c in call.calls if c.organization_id == org]
    assert len(per_rpc) == len(call.calls) - 1  # all but the organization-less save
    for internal in (c for c in call.calls if c.code is grpc.StatusCode.INTERNAL):
        assert any(r.exc_info and getattr(r, "request_id", None) == internal.request_id for r in caplog.records)
    await check_audit_table(in_process.rows, org, secrets)
