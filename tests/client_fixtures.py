"""Helpers for the client tests: a fake clock, server-side RPC counting, a scripted fake server, mTLS files.

The client is always tested against a server on a real socket: the real
service (in-process via tests.harness, or as a process via tests.processes),
or, for behaviour the real service cannot be made to show on demand (a
status it never sends, an UNAVAILABLE that goes away on retry, a slow
answer), `FakeServer`, a grpc.aio server running the generated servicer base
with scripted answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trustme

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc

SK = "sk_test_51ClientSecretKey000004242"
SK_2 = "sk_test_51ClientSecretKeyNew0009999"
PK = "pk_test_51ClientPublishable0001"
WEBHOOK_DEFAULT = "whsec_client_environment_default_7777"
ENV_DEFAULTS = {"STRIPE_WEBHOOK_SECRET": WEBHOOK_DEFAULT, "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY": PK}
SECRETS = (SK, SK_2, WEBHOOK_DEFAULT)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- server-side counting: the service's one log line per RPC -------------------------------------------


class RpcLog(logging.Handler):
    """Collects the in-process service's "rpc finished" records (logger integrations.rpc)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, str, str | None]] = []  # (method, code, organization_id)

    def emit(self, record: logging.LogRecord) -> None:
        method = getattr(record, "rpc", None)
        if method and record.getMessage() == "rpc finished":
            self.records.append(
                (
                    str(method).rsplit("/", 1)[-1],
                    str(getattr(record, "code", "")),
                    getattr(record, "organization_id", None),
                )
            )

    def count(self, method: str, organization_id: str | None = None) -> int:
        return sum(1 for m, _, org in self.records if m == method and organization_id in (None, org))


@contextmanager
def rpc_log() -> Iterator[RpcLog]:
    logger = logging.getLogger("integrations.rpc")
    handler, level = RpcLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def served_rpcs(stderr: Callable[[], str], method: str, organization_id: str, settle: float = 0.5) -> int:
    """RPCs a service process logged (text format) for one organization.

    The service writes its line just after answering, so the count is read
    again until it has not changed for `settle` seconds.
    """

    def count() -> int:
        return sum(
            1
            for line in stderr().splitlines()
            if "rpc finished" in line
            and f"IntegrationService/{method} " in line
            and f"organization_id={organization_id} " in line
        )

    seen, stable_since = count(), time.monotonic()
    while time.monotonic() - stable_since < settle:
        time.sleep(0.05)
        if (now := count()) != seen:
            seen, stable_since = now, time.monotonic()
    return seen


async def until(condition: Callable[[], bool], what: str, within: float = 15.0) -> None:
    """Waits (polling every 10 ms) until `condition()` holds; fails naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --- a scripted fake server ------------------------------------------------------------------------------


@dataclass
class Script:
    """What FakeService does: per method, a delay and status codes to fail with (one per call, in order)."""

    calls: Counter[str] = field(default_factory=Counter)
    failures: dict[str, list[grpc.StatusCode]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    peers: list[tuple[str, str]] = field(default_factory=list)  # (method, client certificate common name)
    # WatchConfigChanges: None answers UNIMPLEMENTED (an older server); a queue streams what the test puts in
    # it, a status code ends the stream with that status, None ends it cleanly. Each call reads the queue that was
    # here when it arrived.
    watch: asyncio.Queue[pb.WatchConfigChangesResponse | grpc.StatusCode | None] | None = None

    def fail(self, method: str, *codes: grpc.StatusCode) -> None:
        self.failures.setdefault(method, []).extend(codes)


class FakeService(pb_grpc.IntegrationServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def _play(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.script.calls[method] += 1
        auth = context.auth_context()
        self.script.peers.append((method, b"".join(auth.get("x509_common_name", ())).decode()))
        if delay := self.script.delays.get(method):
            await asyncio.sleep(delay)
        if planned := self.script.failures.get(method):
            code = planned.pop(0)
            await context.abort(code, f"injected {code.name}")

    async def ListProviders(self, request: pb.ListProvidersRequest, context: Any) -> pb.ListProvidersResponse:
        await self._play("ListProviders", context)
        return pb.ListProvidersResponse(providers=[pb.Provider(id="stripe", category=pb.CATEGORY_PAYMENTS)])

    async def GetProviderConfig(
        self, request: pb.GetProviderConfigRequest, context: Any
    ) -> pb.GetProviderConfigResponse:
        await self._play("GetProviderConfig", context)
        value = SK if request.view == pb.CONFIG_VIEW_DECRYPTED else "••••••••4242"
        config = pb.ProviderConfig(
            organization_id=request.organization_id,
            provider=request.provider,
            values={"secretKey": pb.ConfigValue(value=value, source=pb.VALUE_SOURCE_ORGANIZATION, secret=True)},
            etag="fake-etag",
        )
        return pb.GetProviderConfigResponse(config=config)

    async def SaveIntegration(self, request: pb.SaveIntegrationRequest, context: Any) -> pb.SaveIntegrationResponse:
        await self._play("SaveIntegration", context)
        return pb.SaveIntegrationResponse(
            config=pb.ProviderConfig(
                organization_id=request.organization_id, provider=request.provider, etag="fake-etag-2"
            )
        )

    async def DeleteIntegration(
        self, request: pb.DeleteIntegrationRequest, context: Any
    ) -> pb.DeleteIntegrationResponse:
        await self._play("DeleteIntegration", context)
        return pb.DeleteIntegrationResponse()

    async def WatchConfigChanges(
        self, request: pb.WatchConfigChangesRequest, context: Any
    ) -> AsyncIterator[pb.WatchConfigChangesResponse]:
        await self._play("WatchConfigChanges", context)
        queue = self.script.watch  # this call's: a test that swaps in another queue feeds only the calls after
        if queue is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
            return
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, grpc.StatusCode):
                await context.abort(item, f"injected {item.name}")
            yield item

    async def ListAuditEvents(self, request: Any, context: Any) -> Any:  # not used by the client
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")


@dataclass
class FakeServer:
    server: grpc.aio.Server
    target: str
    script: Script

    async def stop(self) -> None:
        await self.server.stop(0)


async def start_fake_server(credentials: grpc.ServerCredentials | None = None) -> FakeServer:
    script = Script()
    server = grpc.aio.server()
    pb_grpc.add_IntegrationServiceServicer_to_server(FakeService(script), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return FakeServer(server, f"127.0.0.1:{port}", script)


# --- mutual TLS files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA both sides trust
    server_cert: Path  # names 127.0.0.1, localhost and integrations.internal
    server_key: Path
    commerce_cert: Path  # client certificate of commerce.internal
    commerce_key: Path
    dashboard_cert: Path  # client certificate of dashboard.internal
    dashboard_key: Path
    rogue_cert: Path  # client certificate of commerce.internal, signed by another CA
    rogue_key: Path


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue_ca = trustme.CA(), trustme.CA()

    def write(name: str, blob: bytes) -> Path:
        path = folder / name
        path.write_bytes(blob)
        return path

    def issue(name: str, authority: trustme.CA, *identities: str) -> tuple[Path, Path]:
        cert = authority.issue_cert(*identities, common_name=identities[0])
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        return write(f"{name}.pem", chain), write(f"{name}.key", cert.private_key_pem.bytes())

    server = issue("server", ca, "integrations.internal", "127.0.0.1", "localhost")
    commerce = issue("commerce", ca, "commerce.internal")
    dashboard = issue("dashboard", ca, "dashboard.internal")
    rogue = issue("rogue", rogue_ca, "commerce.internal")
    return Pki(write("ca.pem", ca.cert_pem.bytes()), *server, *commerce, *dashboard, *rogue)


def server_credentials(pki: Pki) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
