"""Mutual TLS end to end: real certificates on a real socket, the caller policy, rotation on disk, grpcurl,
and the start-up refusals of a half-configured TLS set-up.

The server is the in-process service of `tests.harness.start_service`, given the
TLS settings through its environment; certificates come from
`integrations_service.devcerts.make_dev_certs` (the CA, server and per-role
client certificates a developer gets) plus `tests.tls_fixtures` for the odd
ones (another CA, expired, unknown identity, DNS-only, CN-only).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service import app
from integrations_service.config import load_settings
from integrations_service.devcerts import Issued, make_dev_certs, spiffe_id
from integrations_service.errors import ConfigurationError
from tests.harness import TEST_KEY, Running, new_org, start_service
from tests.processes import GRPCURL, clean_env, run_cli
from tests.tls_fixtures import CertificateAuthority, Pair, replace_file

SERVICE = "integrations.v1.IntegrationService"
SK = "sk_test_51HxMutualTlsSecret4242"
WH = "whsec_mutual_tls_webhook_9191"
PK = "pk_test_51HxMutualTlsPublic0001"
SECRETS = (SK, WH, PK)
CALL_TIMEOUT = 10.0
DENIED = grpc.StatusCode.PERMISSION_DENIED
# Only the listed identities; each test channel its own subchannels (no connection sharing between channels).
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)

Client = str | Pair | None  # a dev-certs role name, a certificate pair, or no client certificate


@dataclass
class MtlsService:
    running: Running
    certs: Path
    dev: dict[str, Issued]
    ca: CertificateAuthority  # the dev CA: the server trusts client certificates it issues
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.running.target

    @property
    def server_ca_pem(self) -> bytes:
        return self.dev["ca"].cert.read_bytes()

    def channel(self, client: Client, root_pem: bytes | None = None) -> grpc.aio.Channel:
        key: bytes | None
        cert: bytes | None
        if isinstance(client, str):
            key, cert = self.dev[client].key.read_bytes(), self.dev[client].cert.read_bytes()
        elif isinstance(client, Pair):
            key, cert = client.key_pem, client.cert_pem
        else:
            key = cert = None
        credentials = grpc.ssl_channel_credentials(root_pem or self.server_ca_pem, key, cert)
        channel = grpc.aio.secure_channel(self.target, credentials, options=CHANNEL_OPTIONS)
        self.channels.append(channel)
        return channel

    def stub(self, client: Client, root_pem: bytes | None = None) -> pb_grpc.IntegrationServiceAsyncStub:
        return pb_grpc.IntegrationServiceStub(self.channel(client, root_pem))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        await self.running.close()


StartMtls = Callable[..., Awaitable[MtlsService]]
PolicyText = str | Callable[[CertificateAuthority], str]


@pytest.fixture
async def start_mtls(tmp_path: Path) -> AsyncIterator[StartMtls]:
    """Starts mutual-TLS services (dev-certs set, SQLite in tmp_path unless told); stops them after the test."""
    started: list[MtlsService] = []

    async def start(
        database_url: str | None = None, extra_policy: PolicyText = "", replace_policy: bool = False
    ) -> MtlsService:
        """`extra_policy` is added to the dev-certs policy (or replaces it); a function of the dev CA can issue
        the certificates it names (to pin a fingerprint)."""
        where = tmp_path / f"svc{len(started)}"
        certs = where / "certs"
        dev = make_dev_certs(certs)
        ca = CertificateAuthority.load(dev["ca"].cert, dev["ca"].key)
        policy = certs / "policy.toml"
        added = extra_policy(ca) if callable(extra_policy) else extra_policy
        if added or replace_policy:
            policy.write_text(added if replace_policy else policy.read_text() + added)
        env = {
            "INTEGRATIONS_TLS_CERT": str(dev["server"].cert),
            "INTEGRATIONS_TLS_KEY": str(dev["server"].key),
            "INTEGRATIONS_TLS_CLIENT_CA": str(dev["ca"].cert),
            "INTEGRATIONS_AUTHZ_POLICY": str(policy),
        }
        running = await start_service(database_url or f"sqlite:///{where / 'store.sqlite3'}", where / "data", env)
        service = MtlsService(running, certs, dev, ca)
        started.append(service)
        return service

    yield start
    for service in started:
        await service.close()


@pytest.fixture
async def mtls(start_mtls: StartMtls) -> MtlsService:
    return await start_mtls()


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def save_request(org: str, **values: str) -> pb.SaveIntegrationRequest:
    return pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values=values)


def get_request(org: str, decrypted: bool = False) -> pb.GetProviderConfigRequest:
    view = pb.CONFIG_VIEW_DECRYPTED if decrypted else pb.CONFIG_VIEW_MASKED
    return pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=view)


def delete_request(org: str) -> pb.DeleteIntegrationRequest:
    return pb.DeleteIntegrationRequest(organization_id=org, provider="stripe", allow_missing=True)


def values(config: pb.ProviderConfig) -> dict[str, str]:
    return {key: v.value for key, v in config.values.items()}


# --- the handshake ------------------------------------------------------------------------------------


async def test_handshake_needs_a_current_client_certificate_from_the_trusted_ca(mtls: MtlsService) -> None:
    reply = await mtls.stub("dashboard").ListProviders(pb.ListProvidersRequest(), timeout=CALL_TIMEOUT)
    assert reply.providers  # the control: a valid client certificate gets in

    other_ca = CertificateAuthority.create("some other CA")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    refused_clients: dict[str, Client] = {
        "no client certificate": None,
        "certificate from another CA": other_ca.issue(uris=(spiffe_id("admin"),), common_name="admin"),
        "expired certificate": mtls.ca.issue(
            "admin", uris=(spiffe_id("admin"),), not_before=past - datetime.timedelta(days=1), not_after=past
        ),
        "not yet valid certificate": mtls.ca.issue(
            "admin",
            uris=(spiffe_id("admin"),),
            not_before=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1),
            not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2),
        ),
        # Right CA, but a serverAuth-only certificate (here: the server's own) is no client certificate.
        "server certificate": Pair(mtls.dev["server"].cert.read_bytes(), mtls.dev["server"].key.read_bytes()),
    }
    for why, client in refused_clients.items():
        error = await refused(mtls.stub(client).ListProviders(pb.ListProvidersRequest(), timeout=CALL_TIMEOUT))
        assert error.code() is grpc.StatusCode.UNAVAILABLE, (why, error)

    # And the client side: a server certificate the client does not trust is refused too.
    error = await refused(
        mtls.stub("admin", root_pem=other_ca.cert_pem).ListProviders(pb.ListProvidersRequest(), timeout=CALL_TIMEOUT)
    )
    assert error.code() is grpc.StatusCode.UNAVAILABLE


# --- roles ---------------------------------------------------------------------------------------------


async def admin_events(
    admin: pb_grpc.IntegrationServiceAsyncStub, org: str, expected: set[tuple[str, str, str]]
) -> list[pb.AuditEvent]:
    """The organization's audit events once `expected` (action, outcome, caller) are all in (denials are
    flushed to the store about once a second)."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        reply = await admin.ListAuditEvents(
            pb.ListAuditEventsRequest(organization_id=org, page_size=500), timeout=CALL_TIMEOUT
        )
        seen = {(e.action, e.outcome, e.caller) for e in reply.events}
        if expected <= seen or asyncio.get_running_loop().time() > deadline:
            assert expected <= seen, sorted(expected - seen)
            return list(reply.events)
        await asyncio.sleep(0.1)


async def test_roles_from_client_certificates(start_mtls: StartMtls, store_location: tuple[str, str]) -> None:
    kind, where = store_location
    svc = await start_mtls(f"sqlite:///{where}" if kind == "sqlite" else where)
    dashboard, commerce, admin = svc.stub("dashboard"), svc.stub("commerce"), svc.stub("admin")
    org = new_org()
    deny_id = f"mtls-deny-{org}"

    # dashboard: catalog, write, masked read, delete; never clear text, never the audit trail.
    listed = await dashboard.ListProviders(pb.ListProvidersRequest(organization_id=org), timeout=CALL_TIMEOUT)
    assert listed.providers[0].id == "stripe"
    saved = await dashboard.SaveIntegration(
        save_request(org, secretKey=SK, webhookSecret=WH, publishableKey=PK), timeout=CALL_TIMEOUT
    )
    assert values(saved.config)["secretKey"] == "••••••••4242"
    masked = await dashboard.GetProviderConfig(get_request(org), timeout=CALL_TIMEOUT)
    assert values(masked.config)["secretKey"] == "••••••••4242"
    assert values(masked.config)["webhookSecret"] == "••••••••9191"
    error = await refused(
        dashboard.GetProviderConfig(
            get_request(org, decrypted=True), timeout=CALL_TIMEOUT, metadata=(("x-request-id", deny_id),)
        )
    )
    assert error.code() is DENIED
    assert "read decrypted" in (error.details() or "")
    assert SK not in str(error)
    error = await refused(
        dashboard.ListAuditEvents(pb.ListAuditEventsRequest(organization_id=org), timeout=CALL_TIMEOUT)
    )
    assert error.code() is DENIED

    # commerce: clear text, but no writes and no audit trail.
    clear = await commerce.GetProviderConfig(get_request(org, decrypted=True), timeout=CALL_TIMEOUT)
    assert values(clear.config) == {"secretKey": SK, "webhookSecret": WH, "publishableKey": PK}
    masked = await commerce.GetProviderConfig(get_request(org), timeout=CALL_TIMEOUT)
    assert values(masked.config)["secretKey"] == "••••••••4242"
    assert (await commerce.ListProviders(pb.ListProvidersRequest(), timeout=CALL_TIMEOUT)).providers
    for call in (
        commerce.SaveIntegration(save_request(org, secretKey="sk_test_commerce_must_not_write"), timeout=CALL_TIMEOUT),
        commerce.DeleteIntegration(delete_request(org), timeout=CALL_TIMEOUT),
        commerce.ListAuditEvents(pb.ListAuditEventsRequest(organization_id=org), timeout=CALL_TIMEOUT),
    ):
        assert (await refused(call)).code() is DENIED
    # The refused write changed nothing.
    again = await commerce.GetProviderConfig(get_request(org, decrypted=True), timeout=CALL_TIMEOUT)
    assert values(again.config)["secretKey"] == SK

    await dashboard.DeleteIntegration(delete_request(org), timeout=CALL_TIMEOUT)
    gone = await commerce.GetProviderConfig(get_request(org, decrypted=True), timeout=CALL_TIMEOUT)
    assert not gone.config.etag

    # admin reads the trail: every denial, with its caller, and no value anywhere.
    d, c = f"spiffe:{spiffe_id('dashboard')}", f"spiffe:{spiffe_id('commerce')}"
    expected = {
        ("SaveIntegration", "OK", d),
        ("GetProviderConfig", "PermissionDenied", d),
        ("ListAuditEvents", "PermissionDenied", d),
        ("GetProviderConfig", "OK", c),  # the decrypted read
        ("SaveIntegration", "PermissionDenied", c),
        ("DeleteIntegration", "PermissionDenied", c),
        ("ListAuditEvents", "PermissionDenied", c),
        ("DeleteIntegration", "OK", d),
    }
    events = await admin_events(admin, org, expected)
    denial = next(e for e in events if e.request_id == deny_id)
    assert (denial.action, denial.outcome, denial.caller) == ("GetProviderConfig", "PermissionDenied", d)
    assert d in denial.details["reason"]
    for event in events:
        text = text_format.MessageToString(event, as_utf8=True)
        for secret in (*SECRETS, "sk_test_commerce_must_not_write"):
            assert secret not in text, event
        if event.outcome == "PermissionDenied":
            assert event.caller in (d, c)
            assert event.request_id
            assert event.details["reason"]


# --- identities -----------------------------------------------------------------------------------------


async def test_identity_the_policy_does_not_name_gets_no_rpc_but_health_and_reflection(
    mtls: MtlsService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="integrations.rpc")
    stranger = mtls.ca.issue("stranger", uris=("spiffe://integrations.local/stranger",))
    channel = mtls.channel(stranger)
    stub = pb_grpc.IntegrationServiceStub(channel)
    org = new_org()
    calls: dict[str, Awaitable[Any]] = {
        "ListProviders": stub.ListProviders(pb.ListProvidersRequest(), timeout=CALL_TIMEOUT),
        "GetProviderConfig": stub.GetProviderConfig(get_request(org), timeout=CALL_TIMEOUT),
        "GetProviderConfig decrypted": stub.GetProviderConfig(get_request(org, decrypted=True), timeout=CALL_TIMEOUT),
        "SaveIntegration": stub.SaveIntegration(save_request(org, secretKey=SK), timeout=CALL_TIMEOUT),
        "DeleteIntegration": stub.DeleteIntegration(delete_request(org), timeout=CALL_TIMEOUT),
        "ListAuditEvents": stub.ListAuditEvents(pb.ListAuditEventsRequest(), timeout=CALL_TIMEOUT),
    }
    for rpc, call in calls.items():
        error = await refused(call)
        assert error.code() is DENIED, rpc
        assert "spiffe://integrations.local/stranger" in (error.details() or "")
        assert "no role in the policy" in (error.details() or "")
    denials = [r for r in caplog.records if getattr(r, "event", None) == "permission_denied"]
    assert len(denials) == len(calls)
    assert {getattr(r, "caller", None) for r in denials} == {"spiffe:spiffe://integrations.local/stranger"}
    assert SK not in caplog.text

    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    stream = reflection.ServerReflectionInfo(timeout=CALL_TIMEOUT)
    await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await stream.done_writing()
    response = await stream.read()
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


# The policy of the identity tests (added to the dev-certs one, which names the three SPIFFE IDs).
TYPED_POLICY = """
[[callers]]
dns = "billing.example.internal"
role = "commerce"

[[callers]]
common_name = "ops-console"
role = "dashboard"
"""


def typed(kind: str, value: str) -> str:
    """How logs, errors and the audit trail show a caller name of a kind."""
    return f"{kind}:{value}"


@dataclass
class Probe:
    """What a client certificate may do on `svc`, whose `org` holds SK for stripe."""

    svc: MtlsService
    org: str

    async def read(self, client: Client) -> tuple[grpc.StatusCode, str]:
        """A decrypted read: (OK, the secret key) or (the code, the details)."""
        try:
            reply = await self.svc.stub(client).GetProviderConfig(
                get_request(self.org, decrypted=True), timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, values(reply.config)["secretKey"]

    async def write(self, client: Client) -> tuple[grpc.StatusCode, str]:
        try:
            await self.svc.stub(client).SaveIntegration(save_request(self.org, publishableKey=PK), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""

    async def audit(self, client: Client) -> tuple[grpc.StatusCode, str]:
        try:
            await self.svc.stub(client).ListAuditEvents(pb.ListAuditEventsRequest(), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""


async def probe(svc: MtlsService) -> Probe:
    org = new_org()
    await svc.stub("dashboard").SaveIntegration(save_request(org, secretKey=SK), timeout=CALL_TIMEOUT)
    return Probe(svc, org)


async def test_names_of_other_kinds_never_pass_for_a_spiffe_id(start_mtls: StartMtls) -> None:
    svc = await start_mtls()  # the dev-certs policy: spiffe = "spiffe://integrations.local/<role>"
    p = await probe(svc)
    commerce_id, admin_id = spiffe_id("commerce"), spiffe_id("admin")
    assert await p.read("commerce") == (grpc.StatusCode.OK, SK)  # the control
    assert (await p.audit("admin"))[0] is grpc.StatusCode.OK

    # No SAN, and a common name that spells commerce's SPIFFE ID: a common name, with no role.
    cn_forgery = svc.ca.issue(commerce_id)
    code, details = await p.read(cn_forgery)
    assert (code, f"caller '{typed('cn', commerce_id)}' (no role in the policy)" in details) == (DENIED, True)

    # A DNS SAN that spells admin's SPIFFE ID: a DNS name, with no role.
    dns_forgery = svc.ca.issue(None, dns=(admin_id,))
    code, details = await p.audit(dns_forgery)
    assert (code, f"caller '{typed('dns', admin_id)}' (no role in the policy)" in details) == (DENIED, True)
    assert (await p.read(dns_forgery))[0] is DENIED

    # Two URI SANs: no SPIFFE ID at all (as gRPC's peer_spiffe_id), even when one of them is admin's.
    for uris in ((admin_id, commerce_id), (admin_id, "https://integrations.local/admin")):
        two_uris = svc.ca.issue(None, uris=uris)
        code, details = await p.audit(two_uris)
        assert (code, "caller 'sha256:" in details) == (DENIED, True), uris
        assert (await p.read(two_uris))[0] is DENIED
    # A URI SAN that is no valid SPIFFE ID (a trailing slash, an upper-case trust domain) names nobody either.
    for uri in (f"{admin_id}/", "spiffe://Integrations.local/admin", "spiffe://integrations.local"):
        assert (await p.audit(svc.ca.issue("admin", uris=(uri,))))[0] is DENIED, uri


async def test_legacy_identity_entries_keep_working_for_spiffe_ids_only(start_mtls: StartMtls) -> None:
    legacy = "".join(f'[[callers]]\nidentity = "{spiffe_id(r)}"\nrole = "{r}"\n\n' for r in ("dashboard", "commerce"))
    svc = await start_mtls(extra_policy=legacy, replace_policy=True)
    p = await probe(svc)  # the dashboard's save: its legacy entry works
    assert await p.read("commerce") == (grpc.StatusCode.OK, SK)
    code, details = await p.read(svc.ca.issue(spiffe_id("commerce")))
    assert (code, typed("cn", spiffe_id("commerce")) in details) == (DENIED, True)
    assert (await p.read(svc.ca.issue(None, dns=(spiffe_id("commerce"),))))[0] is DENIED


async def test_typed_policy_entries_match_names_of_their_own_kind_only(start_mtls: StartMtls) -> None:
    pinned: list[Pair] = []

    def policy(ca: CertificateAuthority) -> str:
        pinned.append(ca.issue(None))  # no SAN, no subject: only its fingerprint names it
        return f'{TYPED_POLICY}\n[[callers]]\nfingerprint = "sha256:{pinned[0].fingerprint.upper()}"\nrole = "admin"\n'

    svc = await start_mtls(extra_policy=policy)
    p = await probe(svc)
    billing, ops = "billing.example.internal", "ops-console"

    # dns = "billing.example.internal": a DNS SAN of that name is commerce; a common name of that name is nobody.
    dns_billing = svc.ca.issue(None, dns=(billing,))
    assert await p.read(dns_billing) == (grpc.StatusCode.OK, SK)
    code, details = await p.write(dns_billing)
    assert (code, f"caller '{typed('dns', billing)}' (role 'commerce')" in details) == (DENIED, True)
    code, details = await p.read(svc.ca.issue(billing))
    assert (code, f"caller '{typed('cn', billing)}' (no role in the policy)" in details) == (DENIED, True)
    # DNS names compare case-insensitively, as DNS does.
    assert await p.read(svc.ca.issue(None, dns=("Billing.Example.Internal",))) == (grpc.StatusCode.OK, SK)

    # common_name = "ops-console": the subject CN is dashboard; a DNS SAN of that name is nobody.
    cn_ops = svc.ca.issue(ops)
    assert (await p.write(cn_ops))[0] is grpc.StatusCode.OK
    code, details = await p.read(cn_ops)
    assert (code, f"caller '{typed('cn', ops)}' (role 'dashboard')" in details) == (DENIED, True)
    code, details = await p.write(svc.ca.issue(None, dns=(ops,)))
    assert (code, f"caller '{typed('dns', ops)}' (no role in the policy)" in details) == (DENIED, True)

    # A URI SAN the policy does not name (SPIFFE or not) does not hide the DNS name it does.
    for uri in ("urn:example:billing", "spiffe://integrations.local/stranger"):
        client = svc.ca.issue("unnamed-console", uris=(uri,), dns=(billing,))
        assert await p.read(client) == (grpc.StatusCode.OK, SK), uri

    # fingerprint = "sha256:…" pins one certificate: that one is admin, a nameless twin (another key) nobody.
    assert (await p.audit(pinned[0]))[0] is grpc.StatusCode.OK
    twin = svc.ca.issue(None)
    code, details = await p.audit(twin)
    assert (code, f"caller 'sha256:{twin.fingerprint}' (no role in the policy)" in details) == (DENIED, True)


async def test_names_the_policy_gives_different_roles_are_ambiguous_and_denied(
    start_mtls: StartMtls, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    svc = await start_mtls(extra_policy=TYPED_POLICY)
    p = await probe(svc)
    # admin by its SPIFFE ID, commerce by its DNS SAN: neither role is picked, not even for what both allow.
    both = svc.ca.issue("ops-console", uris=(spiffe_id("admin"),), dns=("billing.example.internal",))
    for code, details in (await p.audit(both), await p.read(both), await p.write(both)):
        assert code is DENIED
        assert "ambiguous" in details
        for role in ("admin", "commerce", "dashboard"):
            assert f"'{role}'" in details
        assert SK not in details
    ambiguous = [r for r in caplog.records if getattr(r, "event", None) == "ambiguous_caller"]
    assert ambiguous
    assert {getattr(r, "caller", None) for r in ambiguous} == {typed("spiffe", spiffe_id("admin"))}

    # Names that agree on the role are no ambiguity: the caller is shown by the first name that matched.
    agreeing = svc.ca.issue(None, uris=(spiffe_id("commerce"),), dns=("billing.example.internal",))
    assert await p.read(agreeing) == (grpc.StatusCode.OK, SK)
    code, details = await p.write(agreeing)
    assert (code, f"caller '{typed('spiffe', spiffe_id('commerce'))}' (role 'commerce')" in details) == (DENIED, True)


async def test_callers_are_shown_with_their_kind_in_logs_and_the_audit_trail(
    start_mtls: StartMtls, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="integrations")
    svc = await start_mtls(extra_policy=TYPED_POLICY)
    p = await probe(svc)
    forgery = svc.ca.issue(spiffe_id("commerce"))
    assert (await p.write(svc.ca.issue("ops-console")))[0] is grpc.StatusCode.OK
    assert (await p.read(forgery))[0] is DENIED
    assert (await p.read("commerce"))[0] is grpc.StatusCode.OK

    shown_forgery, shown_commerce = typed("cn", spiffe_id("commerce")), typed("spiffe", spiffe_id("commerce"))
    expected = {
        ("SaveIntegration", "OK", typed("spiffe", spiffe_id("dashboard"))),
        ("SaveIntegration", "OK", typed("cn", "ops-console")),
        ("GetProviderConfig", "PermissionDenied", shown_forgery),
        ("GetProviderConfig", "OK", shown_commerce),
    }
    events = await admin_events(svc.stub("admin"), p.org, expected)
    assert {e.caller for e in events} == {c for _, _, c in expected}

    finished = {getattr(r, "caller", None) for r in caplog.records if r.getMessage() == "rpc finished"}
    assert {typed("cn", "ops-console"), shown_forgery, shown_commerce} <= finished
    denied = [r for r in caplog.records if getattr(r, "event", None) == "permission_denied"]
    assert [getattr(r, "caller", None) for r in denied] == [shown_forgery]
    # Each call's audit record is on its "rpc finished" line.
    audit_lines = {getattr(r, "caller", None) for r in caplog.records if getattr(r, "event", None) == "audit"}
    assert {shown_forgery, shown_commerce} <= audit_lines


# --- certificate rotation on disk ------------------------------------------------------------------------


async def test_server_certificate_rotation_on_disk(mtls: MtlsService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="integrations.tls")
    request = pb.ListProvidersRequest()
    first = mtls.stub("commerce")  # trusts the dev CA, which signed server certificate A
    assert (await first.ListProviders(request, timeout=CALL_TIMEOUT)).providers

    ca_b = CertificateAuthority.create("rotation CA B")
    server_b = ca_b.issue_server()
    replace_file(mtls.dev["server"].key, server_b.key_pem)
    replace_file(mtls.dev["server"].cert, server_b.cert_pem)

    # New connections get certificate B: a client trusting only CA B gets in, one trusting only CA A does not.
    assert (await mtls.stub("commerce", root_pem=ca_b.cert_pem).ListProviders(request, timeout=CALL_TIMEOUT)).providers
    error = await refused(mtls.stub("commerce").ListProviders(request, timeout=CALL_TIMEOUT))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    # The connection made before the rotation goes on working.
    assert (await first.ListProviders(request, timeout=CALL_TIMEOUT)).providers
    assert any(r.getMessage() == "TLS files reloaded" for r in caplog.records if r.name == "integrations.tls")

    # A broken certificate file is refused; new connections still get B, old ones keep working.
    caplog.clear()
    garbage = b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n"
    replace_file(mtls.dev["server"].cert, garbage)
    assert (await mtls.stub("admin", root_pem=ca_b.cert_pem).ListProviders(request, timeout=CALL_TIMEOUT)).providers
    assert (await first.ListProviders(request, timeout=CALL_TIMEOUT)).providers
    failures = [r for r in caplog.records if r.name == "integrations.tls" and r.levelno == logging.ERROR]
    assert failures, caplog.text
    assert "new TLS files refused" in failures[0].getMessage()
    assert "INTEGRATIONS_TLS_CERT" in failures[0].getMessage()

    # A certificate that does not match the key is refused too, naming the key setting; B stays.
    caplog.clear()
    replace_file(mtls.dev["server"].cert, CertificateAuthority.create("C").issue_server().cert_pem)
    assert (await mtls.stub("admin", root_pem=ca_b.cert_pem).ListProviders(request, timeout=CALL_TIMEOUT)).providers
    failures = [r for r in caplog.records if r.name == "integrations.tls" and r.levelno == logging.ERROR]
    assert failures, caplog.text
    assert "INTEGRATIONS_TLS_KEY" in failures[0].getMessage()
    for record in caplog.records:
        assert "PRIVATE KEY" not in record.getMessage()


async def test_client_ca_rotation_on_disk(mtls: MtlsService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="integrations.tls")
    request = pb.ListProvidersRequest()
    before = mtls.stub("admin")
    assert (await before.ListProviders(request, timeout=CALL_TIMEOUT)).providers

    # INTEGRATIONS_TLS_CLIENT_CA names the dev CA file: it now holds only a new CA.
    new_client_ca = CertificateAuthority.create("new client CA")
    replace_file(mtls.dev["ca"].cert, new_client_ca.cert_pem)
    root = mtls.ca.cert_pem  # the server certificate is unchanged, still signed by the dev CA
    newcomer = new_client_ca.issue("admin", uris=(spiffe_id("admin"),))
    assert (await mtls.stub(newcomer, root_pem=root).ListProviders(request, timeout=CALL_TIMEOUT)).providers
    error = await refused(mtls.stub("admin", root_pem=root).ListProviders(request, timeout=CALL_TIMEOUT))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert (await before.ListProviders(request, timeout=CALL_TIMEOUT)).providers
    assert any(r.getMessage() == "TLS files reloaded" for r in caplog.records if r.name == "integrations.tls")


# --- grpcurl ------------------------------------------------------------------------------------------------


async def grpcurl(svc: MtlsService, client: str | Pair | None, *args: str) -> tuple[int, str, str]:
    tls = ["-cacert", str(svc.dev["ca"].cert)]
    if isinstance(client, str):
        tls += ["-cert", str(svc.dev[client].cert), "-key", str(svc.dev[client].key)]
    elif isinstance(client, Pair):
        cert, key = client.write(svc.certs, "grpcurl-client")
        tls += ["-cert", str(cert), "-key", str(key)]
    process = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        *tls,
        "-max-time",
        "10",
        *args[:-1],
        svc.target,
        args[-1],
        env=clean_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_grpcurl_over_mutual_tls(mtls: MtlsService) -> None:
    stranger = mtls.ca.issue("stranger", uris=("spiffe://integrations.local/stranger",))
    code, out, err = await grpcurl(mtls, stranger, "list")
    assert code == 0, err
    assert {SERVICE, "grpc.health.v1.Health"} <= set(out.split())

    code, _, err = await grpcurl(mtls, None, "list")
    assert code != 0

    org = new_org()
    body = json.dumps({"organization_id": org, "provider": "stripe", "values": {"secretKey": SK, "webhookSecret": WH}})
    code, out, err = await grpcurl(mtls, "dashboard", "-d", body, f"{SERVICE}/SaveIntegration")
    assert code == 0, err
    assert json.loads(out)["config"]["values"]["secretKey"]["value"] == "••••••••4242"
    assert SK not in out

    code, _, err = await grpcurl(mtls, "commerce", "-d", body, f"{SERVICE}/SaveIntegration")
    assert code != 0
    assert "PermissionDenied" in err

    read = json.dumps({"organization_id": org, "provider": "stripe", "view": "CONFIG_VIEW_DECRYPTED"})
    code, out, err = await grpcurl(mtls, "commerce", "-d", read, f"{SERVICE}/GetProviderConfig")
    assert code == 0, err
    config = json.loads(out)["config"]
    assert (config["values"]["secretKey"]["value"], config["values"]["webhookSecret"]["value"]) == (SK, WH)

    code, out, err = await grpcurl(mtls, "dashboard", "-d", read, f"{SERVICE}/GetProviderConfig")
    assert code != 0
    assert "PermissionDenied" in err
    assert SK not in out + err


# --- start-up refusals ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued]:
    return make_dev_certs(tmp_path_factory.mktemp("dev-certs"))


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
        "INTEGRATIONS_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite3'}",
        "INTEGRATIONS_LISTEN_ADDRESS": "127.0.0.1:0",
        **extra,
    }


def tls_env(certs: dict[str, Issued], **extra: str) -> dict[str, str]:
    return {
        "INTEGRATIONS_TLS_CERT": str(certs["server"].cert),
        "INTEGRATIONS_TLS_KEY": str(certs["server"].key),
        "INTEGRATIONS_TLS_CLIENT_CA": str(certs["ca"].cert),
        "INTEGRATIONS_AUTHZ_POLICY": str(certs["ca"].cert.parent / "policy.toml"),
        **extra,
    }


def configuration_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(None, environ)
    return str(caught.value)


def test_tls_certificate_without_key_is_refused(tmp_path: Path, dev_certs: dict[str, Issued]) -> None:
    env = base_env(tmp_path, INTEGRATIONS_TLS_CERT=str(dev_certs["server"].cert))
    message = configuration_error(env)
    assert "INTEGRATIONS_TLS_KEY" in message
    assert "INTEGRATIONS_TLS_CLIENT_CA" in message


def test_tls_without_policy_is_refused(tmp_path: Path, dev_certs: dict[str, Issued]) -> None:
    env = base_env(tmp_path, **tls_env(dev_certs))
    del env["INTEGRATIONS_AUTHZ_POLICY"]
    message = configuration_error(env)
    assert "INTEGRATIONS_AUTHZ_POLICY" in message
    assert "INTEGRATIONS_TLS" not in message


@pytest.mark.parametrize(
    ("broken", "named"),
    [
        ("key of another certificate", "INTEGRATIONS_TLS_KEY"),
        ("missing certificate file", "INTEGRATIONS_TLS_CERT"),
        ("garbage client CA", "INTEGRATIONS_TLS_CLIENT_CA"),
        ("policy with an unknown role", "INTEGRATIONS_AUTHZ_POLICY"),
    ],
)
async def test_bad_tls_files_stop_the_start_before_the_store_opens(
    tmp_path: Path, dev_certs: dict[str, Issued], broken: str, named: str
) -> None:
    env = base_env(tmp_path, **tls_env(dev_certs))
    if broken == "key of another certificate":
        env["INTEGRATIONS_TLS_KEY"] = str(dev_certs["admin"].key)
    elif broken == "missing certificate file":
        env["INTEGRATIONS_TLS_CERT"] = str(tmp_path / "nowhere.crt")
    elif broken == "garbage client CA":
        (tmp_path / "ca.pem").write_text("not a certificate\n")
        env["INTEGRATIONS_TLS_CLIENT_CA"] = str(tmp_path / "ca.pem")
    else:
        (tmp_path / "policy.toml").write_text(f'[[callers]]\nspiffe = "{spiffe_id("x")}"\nrole = "superuser"\n')
        env["INTEGRATIONS_AUTHZ_POLICY"] = str(tmp_path / "policy.toml")
    settings = load_settings(None, env)  # the settings are complete; the files are what is wrong
    with pytest.raises(ConfigurationError) as caught:
        await app.start(settings)
    assert named in str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value)
    assert not (tmp_path / "store.sqlite3").exists()


@pytest.mark.parametrize(
    ("identity", "suggested"),
    [
        ("commerce.internal", ('dns = "commerce.internal"', 'common_name = "commerce.internal"')),
        ("Ops Console", ('common_name = "Ops Console"',)),
        ("x509-sha256:" + "ab" * 32, ('fingerprint = "sha256:' + "ab" * 32 + '"',)),
        ("development-plaintext", ("plaintext development callers are trusted without a policy",)),
        ("spiffe://integrations.local/admin/", ("not a valid SPIFFE ID",)),
    ],
)
async def test_an_identity_entry_that_is_not_a_spiffe_id_stops_the_start(
    tmp_path: Path, dev_certs: dict[str, Issued], identity: str, suggested: tuple[str, ...]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[[callers]]\nspiffe = "{spiffe_id("admin")}"\nrole = "admin"\n\n'
        f'[[callers]]\nidentity = "{identity}"\nrole = "commerce"\n'
    )
    settings = load_settings(None, base_env(tmp_path, **tls_env(dev_certs, INTEGRATIONS_AUTHZ_POLICY=str(policy))))
    with pytest.raises(ConfigurationError) as caught:
        await app.start(settings)
    message = str(caught.value)
    assert "INTEGRATIONS_AUTHZ_POLICY" in message
    assert "callers[1]" in message
    for text in suggested:
        assert text in message, message
    assert not (tmp_path / "store.sqlite3").exists()


PRODUCTION_REQUIREMENTS = (
    "INTEGRATIONS_TLS_CERT",
    "INTEGRATIONS_TLS_KEY",
    "INTEGRATIONS_TLS_CLIENT_CA",
    "INTEGRATIONS_AUTHZ_POLICY",
    "DATABASE_URL",
    "INTEGRATION_ENCRYPTION_KEY_FILE",
    "INTEGRATION_ENCRYPTION_KEYS",
    "INTEGRATION_ENCRYPTION_KEY",
)


def test_production_with_nothing_set_lists_every_missing_setting_at_once() -> None:
    message = configuration_error({"INTEGRATIONS_MODE": "production"})
    for name in PRODUCTION_REQUIREMENTS:
        assert name in message, name
    lines = message.splitlines()
    assert len(lines) == 1 + 6  # the heading, then one line per problem (the three key sources are one)


def test_production_refusal_from_the_command_line(tmp_path: Path) -> None:
    result = run_cli(["serve", "--check"], cwd=tmp_path, env=clean_env({"INTEGRATIONS_MODE": "production"}))
    assert result.returncode == 2, result.stderr
    for name in PRODUCTION_REQUIREMENTS:
        assert name in result.stderr, name


def test_serve_check_validates_the_tls_files_and_the_policy(tmp_path: Path, dev_certs: dict[str, Issued]) -> None:
    env = base_env(tmp_path, **tls_env(dev_certs, INTEGRATIONS_TLS_KEY=str(dev_certs["admin"].key)))
    result = run_cli(["serve", "--check"], cwd=tmp_path, env=clean_env(env))
    assert result.returncode != 0, result.stderr
    assert "INTEGRATIONS_TLS_KEY" in result.stderr


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "[::]:50051", "192.0.2.10:50051", "example.com:50051"])
def test_plaintext_only_listens_on_loopback(tmp_path: Path, address: str) -> None:
    env = base_env(tmp_path, INTEGRATIONS_LISTEN_ADDRESS=address)
    message = configuration_error(env)
    assert "INTEGRATIONS_LISTEN_ADDRESS" in message
    assert "INTEGRATIONS_TLS_CERT" in message  # says how to fix it

    # The explicit, dangerous opt-in is accepted in development mode only.
    settings = load_settings(None, {**env, "INTEGRATIONS_INSECURE_PLAINTEXT_ANY_ADDRESS": "true"})
    assert (settings.listen_address, settings.tls) == (address, None)
    message = configuration_error(
        {**env, "INTEGRATIONS_INSECURE_PLAINTEXT_ANY_ADDRESS": "true", "INTEGRATIONS_MODE": "production"}
    )
    assert "INTEGRATIONS_INSECURE_PLAINTEXT_ANY_ADDRESS" in message


@pytest.mark.parametrize("address", ["127.0.0.1:0", "127.0.0.2:0", "[::1]:0", "localhost:0"])
def test_plaintext_on_loopback_is_accepted(tmp_path: Path, address: str) -> None:
    settings = load_settings(None, base_env(tmp_path, INTEGRATIONS_LISTEN_ADDRESS=address))
    assert (settings.listen_address, settings.tls) == (address, None)


def test_tls_listens_anywhere(tmp_path: Path, dev_certs: dict[str, Issued]) -> None:
    settings = load_settings(
        None, base_env(tmp_path, INTEGRATIONS_LISTEN_ADDRESS="0.0.0.0:50051", **tls_env(dev_certs))
    )
    assert settings.tls is not None
    assert settings.tls.cert == dev_certs["server"].cert


async def test_plaintext_on_another_loopback_address_serves(tmp_path: Path) -> None:
    running = await start_service(
        f"sqlite:///{tmp_path / 'store.sqlite3'}", tmp_path / "data", {"INTEGRATIONS_LISTEN_ADDRESS": "127.0.0.2:0"}
    )
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.2:{running.service.port}")
        try:
            reply = await pb_grpc.IntegrationServiceStub(channel).ListProviders(
                pb.ListProvidersRequest(), timeout=CALL_TIMEOUT
            )
            assert reply.providers
        finally:
            await channel.close()
    finally:
        await running.close()
