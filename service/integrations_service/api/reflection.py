"""Server reflection that answers with the documented descriptors, so `grpcurl describe` shows the proto comments.

grpcio-reflection serializes descriptors from a pool, and the upb pool drops
`source_code_info` (the comments) whatever it was built from. So the answers
are the stock servicer's, with each file of ours swapped for its copy from the
descriptor set that `make gen` writes next to the generated code (built with
`--include_source_info`). Files not in the set (health, reflection) pass as
they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from importlib import resources
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

DESCRIPTOR_SET = "integrations_descriptor_set.binpb"


def documented_files() -> dict[str, bytes]:
    """The served descriptors of our files plus their comments, serialized, by file name.

    Only `source_code_info` is taken from the set: the rest is the pool's own
    (protoc's set also adds `json_name`s, which would change how grpcurl
    prints JSON).
    """
    blob = resources.files("integrations.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    pool = descriptor_pool.Default()
    documented = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(blob).file:
        served = descriptor_pb2.FileDescriptorProto()
        pool.FindFileByName(file.name).CopyToProto(served)
        served.source_code_info.CopyFrom(file.source_code_info)
        documented[file.name] = served.SerializeToString()
    return documented


class DocumentedReflection(reflection.aio.ReflectionServicer):
    def __init__(self, service_names: Iterable[str], documented: Mapping[str, bytes]) -> None:
        super().__init__(service_names)
        self._documented = dict(documented)

    async def ServerReflectionInfo(  # type: ignore[override]  # the stubs call it a coroutine; it is a generator
        self, request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        stock = super().ServerReflectionInfo(request_iterator, context)
        async for response in cast(AsyncIterator[reflection_pb2.ServerReflectionResponse], stock):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                files[:] = [self._documented_copy(serialized) for serialized in files]
            yield response

    def _documented_copy(self, serialized: bytes) -> bytes:
        name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
        return self._documented.get(name, serialized)


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        DocumentedReflection(service_names, documented_files()), server
    )
