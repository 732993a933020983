"""Python client of the integrations credential service (integrations.v1).

```python
from integrations_client import IntegrationsClient

async with IntegrationsClient.from_env() as client:
    creds = await client.get_config(org_id, "stripe")
```

`IntegrationsClient` (asyncio) and `IntegrationsClientSync` (blocking) have
the same methods. With caching on, each keeps one WatchConfigChanges stream
and evicts cached configs the moment they change; `watch_changes()` yields
the same events to the caller. The generated protobuf and gRPC code of `integrations.v1`
ships beside this package as `integrations.v1.integrations_pb2` and
`integrations_pb2_grpc`.
"""

from integrations_client._cache import CacheStats
from integrations_client.aio import ChangeStream, IntegrationsClient
from integrations_client.config import TlsConfig
from integrations_client.errors import (
    ClientClosed,
    ConfigurationError,
    Conflict,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    IntegrationsError,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProviderNotFound,
    Unauthenticated,
    Unavailable,
    error_from_rpc,
)
from integrations_client.models import (
    Category,
    ChangeKind,
    ConfigChangeEvent,
    ConfigValue,
    Provider,
    ProviderConfig,
    ProviderCredentials,
    ProviderField,
    ValueSource,
    WatchEvent,
    WatchResync,
    WatchStarted,
)
from integrations_client.sync import ChangeStreamSync, IntegrationsClientSync

__all__ = [
    "CacheStats",
    "Category",
    "ChangeKind",
    "ChangeStream",
    "ChangeStreamSync",
    "ClientClosed",
    "ConfigChangeEvent",
    "ConfigValue",
    "ConfigurationError",
    "Conflict",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "IntegrationsClient",
    "IntegrationsClientSync",
    "IntegrationsError",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Provider",
    "ProviderConfig",
    "ProviderCredentials",
    "ProviderField",
    "ProviderNotFound",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
    "ValueSource",
    "WatchEvent",
    "WatchResync",
    "WatchStarted",
    "error_from_rpc",
]
