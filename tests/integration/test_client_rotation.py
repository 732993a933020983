"""The Python clients (asyncio and sync) survive rotation of their certificate files.

Short-lived certificates (SPIRE, cert-manager) are replaced on disk while the
client runs. The client must use the new files for new connections without a
restart, let calls in flight on the old channel finish, and keep the old
certificate when the new files cannot be used. Against the real service over
mutual TLS (which refuses an expired client certificate), and against the
scripted fake server where the test needs to see which certificate a
connection presented.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_client import IntegrationsClient, IntegrationsClientSync, ProviderCredentials, TlsConfig, Unavailable
from tests.client_fixtures import SK, FakeServer, start_fake_server, until
from tests.harness import Running, new_org, start_service
from tests.processes import free_port
from tests.tls_fixtures import CertificateAuthority, replace_file

COMMERCE = "commerce.internal"
ROTATED = "rotated.internal"
# A SPIFFE ID: the one kind of name every policy format of the service takes as `identity`.
COMMERCE_ID = "spiffe://integrations.test/commerce"
POLICY = f'[[callers]]\nidentity = "{COMMERCE_ID}"\nrole = "commerce"\n'
# A bit more than the clients' one stat per second.
NOTICED = 1.3


@dataclass
class Client:
    """One interface over both clients; the sync one runs in a thread, so the event loop (and servers) go on."""

    get_config: Callable[[str, str], Awaitable[ProviderCredentials]]
    list_providers: Callable[[], Awaitable[object]]
    close: Callable[[], Awaitable[None]]


def open_client(kind: str, target: str, tls: TlsConfig, timeout: float = 5, channels: int = 1) -> Client:
    if kind == "aio":
        aio = IntegrationsClient(target, tls=tls, cache_ttl=0, timeout=timeout, channels=channels)
        return Client(aio.get_config, aio.list_providers, aio.close)
    sync = IntegrationsClientSync(target, tls=tls, cache_ttl=0, timeout=timeout, channels=channels)
    return Client(
        lambda org, provider: asyncio.to_thread(sync.get_config, org, provider),
        lambda: asyncio.to_thread(sync.list_providers),
        lambda: asyncio.to_thread(sync.close),
    )


@dataclass(frozen=True)
class Pki:
    authority: CertificateAuthority
    ca: Path
    server_cert: Path
    server_key: Path

    def issue(self, name: str, not_after: datetime.datetime | None = None) -> tuple[bytes, bytes]:
        """A client certificate (PEM chain, key): common name `name`, and the commerce SPIFFE ID."""
        pair = self.authority.issue(name, uris=(COMMERCE_ID,), not_after=not_after)
        return pair.cert_pem, pair.key_pem

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.server_key.read_bytes(), self.server_cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=True,
        )


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority.create()
    (folder / "ca.pem").write_bytes(authority.cert_pem)
    return Pki(authority, folder / "ca.pem", *authority.issue_server().write(folder, "server"))


def client_files(pki: Pki, folder: Path, name: str, not_after: datetime.datetime | None = None) -> TlsConfig:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = pki.issue(name, not_after)
    (folder / "client.pem").write_bytes(cert)
    (folder / "client.key").write_bytes(key)
    return TlsConfig(pki.ca, folder / "client.pem", folder / "client.key")


def rotate_files(pki: Pki, tls: TlsConfig, name: str, not_after: datetime.datetime | None = None) -> None:
    """What cert-manager or a SPIRE helper does: replace the certificate, then the key (two renames)."""
    cert, key = pki.issue(name, not_after)
    replace_file(Path(tls.cert_file), cert)
    replace_file(Path(tls.key_file), key)


# --- against the real service: the old certificate expires ---------------------------------------------


async def start_tls_service(pki: Pki, tmp_path: Path, address: str) -> Running:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    return await start_service(
        f"sqlite:///{tmp_path / 'store.sqlite3'}",
        tmp_path,
        {
            "INTEGRATIONS_LISTEN_ADDRESS": address,
            "INTEGRATIONS_TLS_CERT": str(pki.server_cert),
            "INTEGRATIONS_TLS_KEY": str(pki.server_key),
            "INTEGRATIONS_TLS_CLIENT_CA": str(pki.ca),
            "INTEGRATIONS_AUTHZ_POLICY": str(policy),
            "STRIPE_SECRET_KEY": SK,
        },
    )


async def test_clients_keep_working_after_their_first_certificate_expires(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    address = f"127.0.0.1:{free_port()}"
    service = await start_tls_service(pki, tmp_path, address)
    # Long enough for the first calls below, even on a loaded machine; the test then waits for it to pass.
    expires = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(seconds=8)
    tls = client_files(pki, tmp_path / "client", COMMERCE, not_after=expires)
    expired_copy = client_files(pki, tmp_path / "expired", COMMERCE, not_after=expires)
    clients = [open_client(kind, address, tls) for kind in ("aio", "sync")]
    org = new_org()
    try:
        for client in clients:
            assert (await client.get_config(org, "stripe"))["secretKey"] == SK

        rotate_files(pki, tls, COMMERCE, datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1))
        await asyncio.sleep(NOTICED)
        for client in clients:
            assert (await client.get_config(org, "stripe"))["secretKey"] == SK

        left = (expires - datetime.datetime.now(datetime.UTC)).total_seconds()
        await asyncio.sleep(left + 1.5)
        # A restart drops every connection: each client must handshake again, after its first certificate expired.
        await service.close()
        service = await start_tls_service(pki, tmp_path, address)
        for client in clients:
            assert (await client.get_config(org, "stripe"))["secretKey"] == SK

        # The server does refuse the expired certificate: without the rotation these calls would fail.
        stale = IntegrationsClient(address, tls=expired_copy, timeout=2, wait_for_ready=False, cache_ttl=0)
        try:
            with pytest.raises(Unavailable):
                await stale.get_config(org, "stripe")
        finally:
            await stale.close()
    finally:
        for client in clients:
            await client.close()
        await service.close()


# --- against the fake server: which certificate each connection presented ------------------------------


@pytest.fixture
async def pki_and_fake(tmp_path: Path) -> AsyncIterator[tuple[Pki, FakeServer]]:
    pki = make_pki(tmp_path / "pki")
    server = await start_fake_server(pki.server_credentials())
    yield pki, server
    await server.stop()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["aio", "sync"])
async def test_new_files_serve_new_connections_and_calls_in_flight_finish(
    kind: str, channels: int, pki_and_fake: tuple[Pki, FakeServer], tmp_path: Path
) -> None:
    pki, server = pki_and_fake
    tls = client_files(pki, tmp_path / "client", COMMERCE)
    client = open_client(kind, server.target, tls, channels=channels)
    try:
        assert (await client.get_config("org_1", "stripe"))["secretKey"] == SK
        server.script.delays["ListProviders"] = 2.0
        slow = asyncio.ensure_future(client.list_providers())  # in flight on the first channel
        await asyncio.sleep(0.3)

        rotate_files(pki, tls, ROTATED)
        await asyncio.sleep(NOTICED)
        for _ in range(channels):  # every channel: all of them were replaced
            assert (await client.get_config("org_1", "stripe"))["secretKey"] == SK

        await slow  # finished on the old channel, not cancelled by the swap
        assert server.script.peers == [
            ("GetProviderConfig", COMMERCE),
            ("ListProviders", COMMERCE),
            *[("GetProviderConfig", ROTATED)] * channels,
        ]
    finally:
        await client.close()


@pytest.mark.parametrize("kind", ["aio", "sync"])
async def test_broken_new_files_keep_the_old_certificate_and_say_why(
    kind: str, pki_and_fake: tuple[Pki, FakeServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki, server = pki_and_fake
    tls = client_files(pki, tmp_path / "client", COMMERCE)
    old_key = await asyncio.to_thread(Path(tls.key_file).read_bytes)
    client = open_client(kind, server.target, tls)
    caplog.set_level(logging.INFO, logger="integrations_client")
    try:
        await client.get_config("org_1", "stripe")

        # A half-written certificate, then a certificate whose key has not arrived yet.
        replace_file(Path(tls.cert_file), b"-----BEGIN CERTIFICATE-----\nMIIB\n")
        await asyncio.sleep(NOTICED)
        await client.get_config("org_1", "stripe")
        new_cert, new_key = pki.issue(ROTATED)
        replace_file(Path(tls.cert_file), new_cert)
        await asyncio.sleep(NOTICED)
        await client.get_config("org_1", "stripe")
        # Still the old certificate, on every call.
        assert {peer for _, peer in server.script.peers} == {COMMERCE}

        warnings = [r for r in caplog.records if r.name == "integrations_client" and r.levelno == logging.WARNING]
        assert len(warnings) == 2, [r.getMessage() for r in warnings]
        assert all("keeping the previous certificate" in r.getMessage() for r in warnings)
        assert all("cert_file" in r.getMessage() for r in warnings)
        assert "KEY_VALUES_MISMATCH" in warnings[1].getMessage()
        logged = caplog.text
        for secret in (old_key, new_key):
            body = b"".join(secret.splitlines()[1:-1]).decode()
            assert body[:40] not in logged

        # The key arrives: the next connection presents the new certificate.
        replace_file(Path(tls.key_file), new_key)
        await asyncio.sleep(NOTICED)
        await client.get_config("org_1", "stripe")
        assert server.script.peers[-1] == ("GetProviderConfig", ROTATED)
        assert any(r.getMessage().startswith("the TLS files changed: new connections") for r in caplog.records)
    finally:
        await client.close()


@pytest.mark.parametrize("kind", ["aio", "sync"])
async def test_the_cache_watch_moves_to_the_new_certificate(
    kind: str, pki_and_fake: tuple[Pki, FakeServer], tmp_path: Path
) -> None:
    pki, server = pki_and_fake
    stream: asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None] = asyncio.Queue()
    server.script.watch = stream
    stream.put_nowait(pb.WatchConfigChangesResponse(started=pb.WatchStarted()))
    tls = client_files(pki, tmp_path / "client", COMMERCE)
    aio = IntegrationsClient(server.target, tls=tls, timeout=5) if kind == "aio" else None
    sync = IntegrationsClientSync(server.target, tls=tls, timeout=5) if kind == "sync" else None
    client = aio or sync
    assert client is not None

    async def get_config(org: str) -> ProviderCredentials:
        return await aio.get_config(org, "stripe") if aio else await asyncio.to_thread(sync.get_config, org, "stripe")  # type: ignore[union-attr]

    try:
        await get_config("org_1")
        assert client.cache_stats.watching
        rotate_files(pki, tls, ROTATED)
        await asyncio.sleep(NOTICED)
        # The new channel's watch gets a stream of its own: the old one, still open a moment, must not take its
        # `started` (a shared queue let it, under load).
        moved: asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None] = asyncio.Queue()
        server.script.watch = moved
        await get_config("org_2")  # the call that notices the new files moves the watch too
        moved.put_nowait(pb.WatchConfigChangesResponse(started=pb.WatchStarted()))
        await until(lambda: client.cache_stats.watch_subscriptions == 2, "the watch on the new channel")
        watches = [peer for method, peer in server.script.peers if method == "WatchConfigChanges"]
        assert watches == [COMMERCE, ROTATED]
        # Nothing holds the old channel open any more.
        await until(lambda: not client._retired, "the old channel to close")
    finally:
        if aio:
            await aio.close()
        if sync:
            await asyncio.to_thread(sync.close)


async def test_a_public_stream_on_a_retired_channel_ends_with_unavailable(
    pki_and_fake: tuple[Pki, FakeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clients/python/README.md: the stream ends with Unavailable when its old channel closes, not with an
    asyncio.CancelledError in a consumer task nobody cancelled."""
    monkeypatch.setattr("integrations_client.aio.RETIRED_CHANNEL_GRACE", 0.2)
    pki, server = pki_and_fake
    stream: asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None] = asyncio.Queue()
    server.script.watch = stream
    stream.put_nowait(pb.WatchConfigChangesResponse(started=pb.WatchStarted()))
    tls = client_files(pki, tmp_path / "client", COMMERCE)
    async with IntegrationsClient(server.target, tls=tls, timeout=5, watch=False) as client:
        changes = client.watch_changes()
        await changes.__anext__()  # WatchStarted
        following = asyncio.ensure_future(changes.__anext__())
        rotate_files(pki, tls, ROTATED)
        await asyncio.sleep(NOTICED)
        await client.list_providers()  # notices the new files: the stream's channel is retired
        with pytest.raises(Unavailable, match="subscribe again"):
            await asyncio.wait_for(following, 5)
        assert not following.cancelled()
