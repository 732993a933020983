"""Hostile requests against the real service: oversized and control-character identifiers, undecodable bytes,
absurd page tokens, error statuses too big for a client's metadata limit, and calls that end by deadline or
cancellation. What a caller sees, what the store and the log keep, and what the metrics count.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import sqlite3
import urllib.error
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_client import IntegrationsClient
from integrations_client import errors as client_errors
from integrations_service.logs import TextFormatter
from tests.harness import Running, new_org, refused, rich_error, start_service
from tests.integration.test_metrics import sample, scrape
from tests.integration.test_mtls import StartMtls
from tests.integration.test_mtls import start_mtls as start_mtls  # the fixture

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SERVICE = "/integrations.v1.IntegrationService"
# The whole status a client gets back must fit every client's default metadata limit (8 KiB) with room to spare.
MAX_MESSAGE_BYTES = 1024
MAX_TRAILER_BYTES = 4096


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    pairs = error.trailing_metadata() or ()
    return sum(len(key) + len(value) for key, value in pairs) + len((error.details() or "").encode())


class _FormattedBytes(logging.Handler):
    """Counts the bytes the service's text log format writes (what lands in the log file)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(TextFormatter())
        self.total = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.total += len(self.format(record).encode()) + 1


@contextmanager
def log_bytes() -> Iterator[_FormattedBytes]:
    handler = _FormattedBytes()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


async def store_bytes(kind: str, where: str) -> int:
    if kind == "sqlite":
        return sum(p.stat().st_size for p in Path(where).parent.glob(Path(where).name + "*"))
    conn = await asyncpg.connect(where)
    try:
        return int(await conn.fetchval("SELECT pg_total_relation_size('audit_events')"))
    finally:
        await conn.close()


# --- §5 bounded identifiers --------------------------------------------------------------------------------


async def test_megabyte_organization_ids_from_a_caller_with_no_role_grow_store_and_log_by_little(
    store_location: tuple[str, str], start_mtls: StartMtls
) -> None:
    kind, where = store_location
    mtls = await start_mtls(f"sqlite:///{where}" if kind == "sqlite" else where)
    stranger = mtls.ca.issue("stranger", uris=("spiffe://integrations.local/stranger",))
    stub = mtls.stub(stranger)
    huge = "o" * 1_000_000
    await mtls.running.service.audit.flush()
    before = await store_bytes(kind, where)
    with log_bytes() as logged:
        for _ in range(20):
            error = await refused(
                stub.GetProviderConfig(
                    pb.GetProviderConfigRequest(organization_id=huge, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED),
                    timeout=10,
                )
            )
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED
            assert len((error.details() or "").encode()) < MAX_MESSAGE_BYTES
        await mtls.running.service.audit.flush()
    grown = await store_bytes(kind, where) - before
    assert mtls.running.service.audit.buffered == 0, "the denials were audited and stored"
    assert grown + logged.total < 2_000_000, (grown, logged.total)
    assert logged.total < 100_000, logged.total


async def test_oversized_and_malformed_identifiers_are_refused_naming_the_field(svc: Running) -> None:
    org = new_org()
    cases = {
        "organization_id": pb.GetProviderConfigRequest(organization_id="o" * 129, provider="stripe"),
        "provider": pb.GetProviderConfigRequest(organization_id=org, provider="p" * 65),
    }
    for field, request in cases.items():
        error = rich_error(await refused(svc.stub.GetProviderConfig(request)))
        assert error.code is INVALID, field
        assert field in error.violations, error
    for provider in ("Stripe", "stripe\n", "str ipe", "stripe\x00"):
        error = rich_error(
            await refused(
                svc.stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider=provider))
            )
        )
        assert (error.code, list(error.violations)) == (INVALID, ["provider"]), provider
    for organization_id in ("org\nx", "org\x00", "org\x7f", "org x", "org\u2028"):
        error = rich_error(
            await refused(
                svc.stub.GetProviderConfig(
                    pb.GetProviderConfigRequest(organization_id=organization_id, provider="stripe")
                )
            )
        )
        assert (error.code, list(error.violations)) == (INVALID, ["organization_id"]), organization_id
        assert "\n" not in error.message


# --- §5 values with control characters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "key", "value"),
    [
        ("easypay", "baseUrl", "https://api.easypay.pt\r\nX: y"),
        ("smtp", "fromAddress", "Shop\r\nBcc: victim@example.com"),
        ("stripe", "secretKey", "sk_test_abc\x00def"),
        ("stripe", "secretKey", "sk_test_abc\tdef"),
        ("stripe", "secretKey", "sk_test_abc\x7f"),
        ("resend", "apiKey", "re_abc\x1b[2J"),
        ("smtp", "fromAddress", "Shop\x85Bcc: victim@example.com <a@shop.example>"),
        ("smtp", "username", "shop\u2028RCPT TO:<victim@example.com>"),
        ("resend", "apiKey", "re_abc\x9b2J"),
    ],
)
async def test_values_with_control_characters_are_refused_and_nothing_is_stored(
    svc: Running, provider: str, key: str, value: str
) -> None:
    org = new_org()
    error = rich_error(
        await refused(
            svc.stub.SaveIntegration(
                pb.SaveIntegrationRequest(organization_id=org, provider=provider, values={key: value})
            )
        )
    )
    assert error.code is INVALID
    assert list(error.violations) == [f"values.{key}"]
    assert "control character" in error.violations[f"values.{key}"]
    assert value not in error.message
    config = await svc.stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider=provider))
    assert config.config.etag == "", "a refused save stored nothing"


@pytest.mark.parametrize(
    ("provider", "values", "field"),
    [
        ("easypay", {"baseUrl": "https://api.easypay.pt@attacker.example/2.0"}, "values.baseUrl"),
        ("easypay", {"baseUrl": "https://169.254.169.254/latest/meta-data"}, "values.baseUrl"),
        ("easypay", {"baseUrl": "javascript:alert(1)"}, "values.baseUrl"),
        ("easypay", {"baseUrl": "https://api.easypay.pt:65536/"}, "values.baseUrl"),
        ("smtp", {"host": "10.0.0.5", "password": "own-password-0001"}, "values.host"),
        ("smtp", {"host": "mx.attacker.example:25"}, "values.host"),
        ("smtp", {"port": "99999"}, "values.port"),
        ("smtp", {"fromAddress": "evil@x.example, Shop <orders@shop.example>"}, "values.fromAddress"),
    ],
)
async def test_hostile_endpoints_and_senders_are_refused_and_change_nothing(
    svc: Running, provider: str, values: dict[str, str], field: str
) -> None:
    org = new_org()
    error = rich_error(
        await refused(
            svc.stub.SaveIntegration(pb.SaveIntegrationRequest(organization_id=org, provider=provider, values=values))
        )
    )
    assert error.code is INVALID
    assert list(error.violations) == [field]
    assert all(value not in error.message for value in values.values())
    assert len(error.message.encode()) <= 600
    config = await svc.stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider=provider))
    assert config.config.etag == "", "a refused save stored nothing"


async def test_unknown_field_keys_are_echoed_bounded(svc: Running) -> None:
    key = "k\n" + "x" * 5000
    error = rich_error(
        await refused(
            svc.stub.SaveIntegration(
                pb.SaveIntegrationRequest(
                    organization_id=new_org(), provider="stripe", values={key: "v"}, clear_fields=[key + "y"]
                )
            )
        )
    )
    assert error.code is INVALID
    assert len(error.violations) == 2
    for field, description in error.violations.items():
        assert len(field) + len(description) < 600, (field, description)
        assert "\n" not in field + description
    assert len(error.message.encode()) < MAX_MESSAGE_BYTES


# --- §5 statuses every client can read ---------------------------------------------------------------------


async def test_fifty_unknown_fields_reach_the_python_client_as_invalid_argument(svc: Running) -> None:
    values = {f"unknownField{i:02d}_{'x' * 40}": "v" for i in range(50)}
    async with IntegrationsClient(svc.target) as client:
        with pytest.raises(client_errors.InvalidArgument) as caught:
            await client.save(new_org(), "stripe", values)
    assert len(str(caught.value).encode()) < MAX_MESSAGE_BYTES + 200
    assert "more" in str(caught.value)
    raw = await refused(
        svc.stub.SaveIntegration(pb.SaveIntegrationRequest(organization_id=new_org(), provider="stripe", values=values))
    )
    assert raw.code() is INVALID
    assert len((raw.details() or "").encode()) < MAX_MESSAGE_BYTES
    assert trailer_bytes(raw) < MAX_TRAILER_BYTES, trailer_bytes(raw)
    assert "and 4" in rich_error(raw).message  # "… and 4x more"


async def test_five_thousand_character_provider_reaches_the_python_client_as_invalid_argument(
    svc: Running,
) -> None:
    async with IntegrationsClient(svc.target) as client:
        with pytest.raises(client_errors.InvalidArgument) as caught:
            await client.get_masked_config(new_org(), "p" * 5000)
    assert "provider" in caught.value.fields
    raw = await refused(
        svc.stub.DeleteIntegration(pb.DeleteIntegrationRequest(organization_id=new_org(), provider="p" * 5000))
    )
    assert raw.code() is INVALID
    assert trailer_bytes(raw) < MAX_TRAILER_BYTES


async def test_five_thousand_digit_page_token_is_invalid_argument(svc: Running) -> None:
    digits = base64.urlsafe_b64encode(b"before:" + b"9" * 5000).decode().rstrip("=")
    for token in (digits, "9" * 5000, "A" * 100_000):
        error = rich_error(await refused(svc.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_token=token))))
        assert (error.code, list(error.violations)) == (INVALID, ["page_token"])


# --- §5 requests that do not decode -------------------------------------------------------------------------

_BAD_UTF8 = b"\xff\xfe"


def _len_field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


UNDECODABLE = {
    "organization_id invalid UTF-8": ("GetProviderConfig", _len_field(1, b"org" + _BAD_UTF8)),
    "provider invalid UTF-8": ("GetProviderConfig", _len_field(1, b"org") + _len_field(2, _BAD_UTF8)),
    "values key invalid UTF-8": ("SaveIntegration", _len_field(3, _len_field(1, _BAD_UTF8) + _len_field(2, b"v"))),
    "values value invalid UTF-8": ("SaveIntegration", _len_field(3, _len_field(1, b"k") + _len_field(2, _BAD_UTF8))),
    "clear_fields invalid UTF-8": ("SaveIntegration", _len_field(4, _BAD_UTF8)),
    "etag invalid UTF-8": ("DeleteIntegration", _len_field(4, _BAD_UTF8)),
    "page_token invalid UTF-8": ("ListAuditEvents", _len_field(3, _BAD_UTF8)),
    "truncated varint": ("ListAuditEvents", bytes([2 << 3 | 0, 0xFF])),
    "length beyond the end": ("GetProviderConfig", bytes([1 << 3 | 2, 50]) + b"org"),
    "wire type 7": ("ListProviders", bytes([1 << 3 | 7, 1])),
    "field number 0": ("ListProviders", bytes([0 << 3 | 0, 1])),
}


@pytest.mark.parametrize("shape", list(UNDECODABLE))
async def test_undecodable_request_is_invalid_argument_logged_and_counted(
    svc: Running, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="integrations.rpc")
    rpc, body = UNDECODABLE[shape]
    method = f"{SERVICE}/{rpc}"
    call = svc.channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    error = await refused(call(body, timeout=10))
    rich = rich_error(error)
    assert rich.code is INVALID, (shape, rich)
    assert rich.violations == {"request": f"the request is not a valid {rpc}Request protobuf"}
    assert "Error" not in rich.message
    assert "Exception" not in rich.message
    assert rich.request_id
    # The server writes its log line after the status is on its way: give it a moment.
    for _ in range(50):
        lines = [r for r in caplog.records if getattr(r, "rpc", None) == method]
        if lines:
            break
        await asyncio.sleep(0.02)
    assert [(getattr(r, "code", None), getattr(r, "request_id", None)) for r in lines] == [
        ("INVALID_ARGUMENT", rich.request_id)
    ]
    text = await scrape(svc)
    assert sample(text, "integrations_rpc_requests_total", method=method, code="INVALID_ARGUMENT") == 1


# --- §6 deadlines and cancellation --------------------------------------------------------------------------


@asynccontextmanager
async def row_locked(kind: str, where: str, organization_id: str) -> AsyncIterator[None]:
    """The (organization, stripe) row (SQLite: the whole file) locked by another client, as a long transaction would."""
    if kind == "sqlite":
        with closing(sqlite3.connect(where, isolation_level=None)) as conn:
            conn.execute("BEGIN EXCLUSIVE")
            try:
                yield
            finally:
                conn.execute("ROLLBACK")
        return
    conn = await asyncpg.connect(where)
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT 1 FROM integration_config WHERE organization_id = $1 AND provider = 'stripe' FOR UPDATE",
                organization_id,
            )
            yield
    finally:
        await conn.close()


async def test_timed_out_and_cancelled_saves_are_counted_as_such(svc: Running, store_location: tuple[str, str]) -> None:
    save = f"{SERVICE}/SaveIntegration"
    org = new_org()
    request = pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": "sk_test_1"})
    await svc.stub.SaveIntegration(request)
    async with row_locked(*store_location, org):
        for _ in range(5):
            error = await refused(svc.stub.SaveIntegration(request, timeout=0.3))
            assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        call = svc.stub.SaveIntegration(request, timeout=30)
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.5)  # the server notices the cancellation
    await svc.stub.SaveIntegration(request, timeout=10)  # the abandoned saves left the store usable
    # A handler counts its call as it ends, which on a busy machine can be just after the client gave up.
    for _ in range(50):
        text = await scrape(svc)
        if sample(text, "integrations_rpc_requests_total", method=save, code="DEADLINE_EXCEEDED") >= 5:
            break
        await asyncio.sleep(0.1)
    counted = [
        line for line in text.splitlines() if line.startswith("integrations_rpc_requests_total") and save in line
    ]
    assert sample(text, "integrations_rpc_requests_total", method=save, code="DEADLINE_EXCEEDED") == 5, counted
    assert sample(text, "integrations_rpc_requests_total", method=save, code="CANCELLED") == 1
    assert sample(text, "integrations_rpc_requests_total", method=save, code="OK") == 2, "the first and last saves"


# --- §6 the metrics server stops with the service -------------------------------------------------------------


async def test_stop_also_stops_the_metrics_server(tmp_path: Path) -> None:
    svc = await start_service(f"sqlite:///{tmp_path / 'store.sqlite3'}", tmp_path / "data")
    await scrape(svc)
    await svc.close()
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        await scrape(svc)
