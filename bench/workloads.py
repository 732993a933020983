"""The gRPC calls the benchmark sends, as protobuf requests, h2load bodies and real checks.

Every call here is sent two ways: by h2load (the serialized request in a gRPC frame, in a
file) and once by a real grpc.aio stub before and after each load, which raises unless the
server answers OK. The requests carry no secret: saves set `publishableKey`, a public field,
to a fixed test-shaped value.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from h2load import grpc_frame

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["IntegrationService"].full_name
PROVIDER = "stripe"
SAVED_VALUE = "pk_test_bench_h2load_0000000000"
CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class GrpcCall:
    method: str
    request: Callable[[str], Any]  # organization id -> request message

    def body(self, organization_id: str) -> bytes:
        message: bytes = self.request(organization_id).SerializeToString()
        return grpc_frame(message)

    def write_body(self, organization_id: str, directory: Path, name: str) -> Path:
        path = directory / f"{name}.grpc"
        path.write_bytes(self.body(organization_id))
        return path

    async def check(self, target: str, organization_id: str) -> int:
        """One real call: the size of its reply's gRPC frame; grpc.aio.AioRpcError unless the server answers OK."""
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.IntegrationServiceStub(channel)
            invoke: Callable[..., Awaitable[Any]] = getattr(stub, self.method)
            reply = await invoke(self.request(organization_id), timeout=CHECK_TIMEOUT_S)
        return len(grpc_frame(reply.SerializeToString()))


CALLS = {
    "get": GrpcCall(
        "GetProviderConfig",
        lambda org: pb.GetProviderConfigRequest(organization_id=org, provider=PROVIDER, view=pb.CONFIG_VIEW_DECRYPTED),
    ),
    "masked": GrpcCall(
        "GetProviderConfig",
        lambda org: pb.GetProviderConfigRequest(organization_id=org, provider=PROVIDER, view=pb.CONFIG_VIEW_MASKED),
    ),
    "list": GrpcCall("ListProviders", lambda org: pb.ListProvidersRequest(organization_id=org)),
    "save": GrpcCall(
        "SaveIntegration",
        lambda org: pb.SaveIntegrationRequest(
            organization_id=org, provider=PROVIDER, values={"publishableKey": SAVED_VALUE}
        ),
    ),
}
