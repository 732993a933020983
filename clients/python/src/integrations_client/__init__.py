"""Python client of the integrations credential service (integrations.v1).

```python
from integrations_client import IntegrationsClient

async with IntegrationsClient.from_env() as client:
    creds = await client.get_config(org_id, "stripe")
```

`IntegrationsClient` (asyncio) and `IntegrationsClientSync` (blocking) have
the same methods. The generated protobuf and gRPC code of `integrations.v1`
ships beside this package as `integrations.v1.integrations_pb2` and
`integrations_pb2_grpc`.
"""

from integrations_client._cache import CacheStats
from integrations_client.aio import IntegrationsClient
from integrations_client.config import TlsConfig
from integrations_client.errors import (
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
    ConfigValue,
    Provider,
    ProviderConfig,
    ProviderCredentials,
    ProviderField,
    ValueSource,
)
from integrations_client.sync import IntegrationsClientSync

__all__ = [
    "CacheStats",
    "Category",
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
    "error_from_rpc",
]
