"""The development encryption key: generated once into a 0600 file when no key is configured.

Never used in production mode (the settings reader refuses to start without a
dedicated key there); `make run` and tests rely on it so that restarts can read
what was written before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from integrations_service.crypto import EncryptionKey, InvalidKey, Keyring
from integrations_service.errors import ConfigurationError

log = logging.getLogger("integrations.app")


def load_or_create_dev_key(path: Path) -> Keyring:
    """A development key kept in a 0600 file, so restarts can read what was written before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(EncryptionKey.generate().to_text() + "\n")
        log.warning(
            "no encryption key set: generated a development key file; never use it in production",
            extra={"event": "dev_key_generated", "path": str(path)},
        )
    if path.stat().st_mode & 0o077:
        raise ConfigurationError(f"development key file {path} must not be readable by others (chmod 600)")
    try:
        return Keyring.parse(path.read_text())
    except InvalidKey as error:
        raise ConfigurationError(f"development key file {path} is invalid: {error}") from None
