"""Wiring: builds the whole service from `Settings`, and takes it down again.

The only module that knows every layer; the layers themselves only know the
ones below them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1._async import HealthServicer

from integrations_service.api.server import build_server, mark_serving
from integrations_service.config import Mode, Settings
from integrations_service.crypto import EncryptionKey, InvalidKey, ValueCipher
from integrations_service.domain.service import CredentialService
from integrations_service.errors import ConfigurationError
from integrations_service.store import IntegrationStore
from integrations_service.store.factory import open_store

log = logging.getLogger("integrations.app")


@dataclass
class RunningService:
    server: grpc.aio.Server
    health: HealthServicer
    store: IntegrationStore
    port: int

    async def stop(self, grace: float) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight ones get `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.store.close()
        log.info("stopped", extra={"event": "stopped"})


def resolve_key(settings: Settings) -> EncryptionKey:
    if settings.encryption_key is not None:
        return settings.encryption_key
    if settings.mode is Mode.PRODUCTION:  # load_settings already refuses this; belt and braces
        raise ConfigurationError("INTEGRATION_ENCRYPTION_KEY is required in production mode")
    return load_or_create_dev_key(settings.dev_key_path)


def load_or_create_dev_key(path: Path) -> EncryptionKey:
    """A development key kept in a 0600 file, so restarts can read what was written before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(EncryptionKey.generate().to_text() + "\n")
        log.warning(
            "no INTEGRATION_ENCRYPTION_KEY set: generated a development key file; "
            "never use it in production",
            extra={"event": "dev_key_generated", "path": str(path)},
        )
    if path.stat().st_mode & 0o077:
        raise ConfigurationError(f"development key file {path} must not be readable by others (chmod 600)")
    try:
        return EncryptionKey.from_text(path.read_text())
    except InvalidKey as error:
        raise ConfigurationError(f"development key file {path} is invalid: {error}") from None


def _listen(server: grpc.aio.Server, address: str) -> int:
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigurationError(f"INTEGRATIONS_LISTEN_ADDRESS: cannot listen on {address} (address in use?)")
    return port


async def start(settings: Settings) -> RunningService:
    cipher = ValueCipher(resolve_key(settings))
    store = await open_store(settings.database_url, settings.data_dir, timeout=settings.db_timeout,
                             pool_size=settings.db_pool_size)
    try:
        service = CredentialService(store, cipher, settings.provider_defaults)
        server, health_servicer = build_server(service, reflection_enabled=settings.reflection)
        port = _listen(server, settings.listen_address)
        await server.start()
    except BaseException:
        await store.close()
        raise
    await mark_serving(health_servicer)
    log.info("serving", extra={"event": "serving", "address": settings.listen_address,
                               "mode": settings.mode.value, "store": type(store).__name__})
    return RunningService(server, health_servicer, store, port)
