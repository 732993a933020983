"""`integrations-service healthcheck`: exit 0 when the local service answers SERVING.

Without `--ready` it asks for the overall status `""` (liveness: the process
serves); with `--ready`, for `integrations.v1.IntegrationService` (readiness:
NOT_SERVING while the credential store is unreachable).

The container's HEALTHCHECK runs it, so no extra binary is needed. It reads
the same environment as the service (through `config.load_healthcheck_settings`):
INTEGRATIONS_LISTEN_ADDRESS (a wildcard host is reached on loopback) and, when
the service serves mutual TLS, a client certificate of its own from
INTEGRATIONS_HEALTHCHECK_CERT / _KEY and the CA of the server's certificate
from INTEGRATIONS_HEALTHCHECK_CA. Health checking is open to any authenticated
caller, so that certificate needs no role in the policy. The name it verifies
is INTEGRATIONS_HEALTHCHECK_SERVER_NAME or, unset, the first DNS name of the
service's own certificate (INTEGRATIONS_TLS_CERT): a production certificate
names `integrations.internal` or the like, never the loopback address the
check dials.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2

from integrations_service.config import (
    HEALTHCHECK_CA_ENV,
    HEALTHCHECK_CERT_ENV,
    HEALTHCHECK_KEY_ENV,
    HealthcheckSettings,
    HealthcheckTls,
    split_address,
)
from integrations_service.errors import ConfigurationError

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}  # noqa: S104 (mapped away from)
# Not 2: Docker reserves that exit code of a HEALTHCHECK; 1 is "unhealthy".
UNHEALTHY = 1


def target_of(address: str) -> str:
    host, port = split_address(address)
    return f"{_WILDCARDS.get(host, host)}:{port}"


def _channel(target: str, tls: HealthcheckTls | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target)
    ca, cert, key = (
        _read(env, path)
        for env, path in (
            (HEALTHCHECK_CA_ENV, tls.ca),
            (HEALTHCHECK_CERT_ENV, tls.cert),
            (HEALTHCHECK_KEY_ENV, tls.key),
        )
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = []
    if name := tls.server_name or server_dns_name(tls.server_cert):
        options.append(("grpc.ssl_target_name_override", name))
    return grpc.secure_channel(target, credentials, options=options)


def _read(env: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"{env} names {path}, which cannot be read: {error.strerror}") from None


def server_dns_name(cert_path: Path) -> str | None:
    """The first DNS subject alternative name of the (leaf) certificate in `cert_path`, if any."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None  # then the dialled host is verified, as before
    dns = names.get_values_for_type(x509.DNSName)
    if not dns:
        return None
    # A wildcard is not a host name: any one label under it is what the certificate stands for.
    return "healthcheck" + dns[0][1:] if dns[0].startswith("*.") else dns[0]


def _check_method(
    channel: grpc.Channel,
) -> grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]:
    # Built by hand: the grpc_health stubs do not declare HealthStub's methods.
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def check(settings: HealthcheckSettings, timeout: float, service: str = "") -> int:
    """0 when `service` is SERVING; UNHEALTHY otherwise, also when the health checker's own files are unreadable."""
    target = target_of(settings.address)
    try:
        channel = _channel(target, settings.tls)
    except ConfigurationError as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return UNHEALTHY
    with channel:
        try:
            reply = _check_method(channel)(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            print(f"healthcheck: {target}: {error.code().name}", file=sys.stderr)
            return UNHEALTHY
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"healthcheck: {target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else UNHEALTHY
