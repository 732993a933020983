"""`integrations-service healthcheck`: exit 0 when the local service answers SERVING.

Without `--ready` it asks for the overall status `""` (liveness: the process
serves); with `--ready`, for `integrations.v1.IntegrationService` (readiness:
NOT_SERVING while the credential store is unreachable).

The container's HEALTHCHECK runs it, so no extra binary is needed. It reads
the same environment as the service: INTEGRATIONS_LISTEN_ADDRESS (a wildcard
host is reached on loopback) and, when the service serves mutual TLS, a
client certificate of its own from INTEGRATIONS_HEALTHCHECK_CERT / _KEY and
the CA of the server's certificate from INTEGRATIONS_HEALTHCHECK_CA. Health
checking is open to any authenticated caller, so that certificate needs no
role in the policy. The name it verifies is INTEGRATIONS_HEALTHCHECK_SERVER_NAME
or, unset, the first DNS name of the service's own certificate
(INTEGRATIONS_TLS_CERT): a production certificate names `integrations.internal`
or the like, never the loopback address the check dials.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2

from integrations_service.config import LISTEN_ADDRESS, TLS_CERT, split_address

HEALTHCHECK_FILES = ("INTEGRATIONS_HEALTHCHECK_CA", "INTEGRATIONS_HEALTHCHECK_CERT", "INTEGRATIONS_HEALTHCHECK_KEY")
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}  # noqa: S104 (mapped away from)


def target_of(address: str) -> str:
    host, port = split_address(address)
    return f"{_WILDCARDS.get(host, host)}:{port}"


def _channel(target: str, environ: Mapping[str, str]) -> grpc.Channel:
    if not environ.get(TLS_CERT.env):
        return grpc.insecure_channel(target)
    missing = [name for name in HEALTHCHECK_FILES if not environ.get(name)]
    if missing:
        raise SystemExit(f"healthcheck: the service serves TLS; set {', '.join(missing)}")
    ca, cert, key = (Path(environ[name]).read_bytes() for name in HEALTHCHECK_FILES)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = []
    if name := environ.get("INTEGRATIONS_HEALTHCHECK_SERVER_NAME") or server_dns_name(Path(environ[TLS_CERT.env])):
        options.append(("grpc.ssl_target_name_override", name))
    return grpc.secure_channel(target, credentials, options=options)


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


def check(environ: Mapping[str, str], address: str | None, timeout: float, service: str = "") -> int:
    target = target_of(address or environ.get(LISTEN_ADDRESS.env) or str(LISTEN_ADDRESS.default))
    with _channel(target, environ) as channel:
        try:
            reply = _check_method(channel)(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            print(f"healthcheck: {target}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"healthcheck: {target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
