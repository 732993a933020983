"""What the async and the sync client share: settings, the cache, request building."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from integrations.v1 import integrations_pb2 as pb
from integrations_client._cache import CacheStats, CredentialCache, Key
from integrations_client.config import ReloadingTls, TlsConfig, channel_options
from integrations_client.errors import DeadlineExceeded, IntegrationsError, error_from_rpc
from integrations_client.models import Category, category_to_pb

DEFAULT_TIMEOUT = 2.0
DEFAULT_CACHE_TTL = 30.0
DEFAULT_CACHE_MAX_ENTRIES = 1024
DEFAULT_STALE_IF_ERROR = 300.0


class ClientCore:
    """Settings and cache of one client; the I/O lives in the subclasses."""

    def __init__(
        self,
        target: str,
        *,
        tls: TlsConfig | None,
        cache_ttl: float,
        cache_max_entries: int,
        stale_if_error: float,
        timeout: float,
        wait_for_ready: bool,
        clock: Callable[[], float],
        extra_channel_options: Sequence[tuple[str, Any]],
    ) -> None:
        if not target:
            raise ValueError("target is required (host:port of the integrations service)")
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self._target = target
        self._tls = tls
        self._timeout = timeout
        self._wait_for_ready = wait_for_ready
        # Read the TLS files now, so a wrong path fails at start-up rather than on the first call.
        self._tls_files = ReloadingTls(tls) if tls else None
        self._options = [*channel_options(tls), *extra_channel_options]
        self._cache = CredentialCache(cache_ttl, cache_max_entries, stale_if_error, clock)

    @property
    def target(self) -> str:
        return self._target

    @property
    def tls(self) -> TlsConfig | None:
        return self._tls

    @property
    def cache_stats(self) -> CacheStats:
        """A snapshot of the `get_config` cache counters."""
        return self._cache.stats()

    def _credentials(self) -> grpc.ChannelCredentials | None:
        """The newest TLS files that loaded; None for plaintext."""
        return self._tls_files.credentials if self._tls_files else None

    def _tls_changed(self) -> bool:
        """True when new TLS files have loaded since the channel was opened: open a new one."""
        return self._tls_files is not None and self._tls_files.changed()

    def _deadline(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else timeout

    def _error(self, error: grpc.RpcError, method: str, timeout: float | None) -> IntegrationsError:
        converted = error_from_rpc(error, method=method)
        if isinstance(converted, DeadlineExceeded):
            converted.message = (
                f"{converted.message}: no answer from {self._target} within {self._deadline(timeout):g} s ({method})"
            )
        return converted

    @staticmethod
    def _list_request(organization_id: str | None, category: Category | str | None) -> pb.ListProvidersRequest:
        return pb.ListProvidersRequest(organization_id=organization_id or "", category=category_to_pb(category))

    @staticmethod
    def _get_request(organization_id: str, provider: str, view: pb.ConfigView.ValueType) -> pb.GetProviderConfigRequest:
        return pb.GetProviderConfigRequest(organization_id=organization_id, provider=provider, view=view)

    @staticmethod
    def _save_request(
        organization_id: str, provider: str, values: Mapping[str, str] | None, clear_fields: Iterable[str], etag: str
    ) -> pb.SaveIntegrationRequest:
        if isinstance(clear_fields, str):
            raise TypeError("clear_fields is a list of field keys, not a string")
        return pb.SaveIntegrationRequest(
            organization_id=organization_id,
            provider=provider,
            values=dict(values or {}),
            clear_fields=list(clear_fields),
            etag=etag,
        )

    @staticmethod
    def _delete_request(
        organization_id: str, provider: str, allow_missing: bool, etag: str
    ) -> pb.DeleteIntegrationRequest:
        return pb.DeleteIntegrationRequest(
            organization_id=organization_id, provider=provider, allow_missing=allow_missing, etag=etag
        )


def invalidation_matches(key: Key, organization_id: str | None, provider: str | None) -> bool:
    if organization_id is None:
        return True
    return key[0] == organization_id and (provider is None or key[1] == provider)
