"""Mutual TLS server credentials that follow the certificate files on disk.

gRPC asks `fetch` before every new client handshake; it looks at the files'
modification times and sizes, and only when they changed reads and checks
them. A new set that does not load (half-written file, key not matching the
certificate) is refused with a log line, and the previous one stays in use:
connections keep working through a botched certificate rollout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from integrations_service.config import TLS_CERT, TLS_CLIENT_CA, TLS_KEY, TlsFiles
from integrations_service.errors import ConfigurationError

log = logging.getLogger("integrations.tls")

_Signature = tuple[tuple[int, int, int], ...]


class InvalidTlsFiles(ValueError):
    """The files do not form a usable server identity. Never carries key bytes."""


def load_configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """Read and check the PEM files; raise InvalidTlsFiles naming the setting at fault."""
    cert_pem = _read(files.cert, TLS_CERT.env)
    key_pem = _read(files.key, TLS_KEY.env)
    ca_pem = _read(files.client_ca, TLS_CLIENT_CA.env)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise InvalidTlsFiles(f"{TLS_CERT.env}: {files.cert} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise InvalidTlsFiles(f"{TLS_KEY.env}: {files.key} is not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(*_SPKI) != chain[0].public_key().public_bytes(*_SPKI):
        raise InvalidTlsFiles(f"{TLS_KEY.env}: {files.key} does not match the certificate in {files.cert}")
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise InvalidTlsFiles(f"{TLS_CLIENT_CA.env}: {files.client_ca} is not a PEM certificate bundle") from None
    return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: Path, env: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InvalidTlsFiles(f"{env}: cannot read {path}: {error.strerror}") from None


class ReloadingCredentials:
    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._signature = self._current_signature()
        try:
            self._initial = load_configuration(files)
        except InvalidTlsFiles as error:
            raise ConfigurationError(str(error)) from None

    def server_credentials(self) -> grpc.ServerCredentials:
        # The stubs say the fetcher must return a configuration; gRPC documents None as "no change".
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(self._initial, fetch, require_client_authentication=True)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """None keeps the current configuration; called by gRPC before each handshake."""
        signature = self._current_signature()
        if signature == self._signature:
            return None
        self._signature = signature
        try:
            configuration = load_configuration(self._files)
        except InvalidTlsFiles as error:
            log.error(
                "new TLS files refused, still serving the previous ones: %s",
                error,
                extra={"event": "tls_reload_failed"},
            )
            return None
        log.info("TLS files reloaded", extra={"event": "tls_reloaded"})
        return configuration

    def _current_signature(self) -> _Signature:
        def stat(path: Path) -> tuple[int, int, int]:
            try:
                info = os.stat(path)
            except OSError:
                return (0, 0, 0)
            return (info.st_mtime_ns, info.st_size, info.st_ino)

        return tuple(stat(p) for p in (self._files.cert, self._files.key, self._files.client_ca))
