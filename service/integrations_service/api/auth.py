"""Who is calling, and what they may do.

The identity comes only from the TLS auth context of the connection: the
SPIFFE (URI) SAN of the client certificate when there is one, else its first
DNS SAN, else its common name. A TOML policy maps identities to built-in
roles; a role is a set of permissions, and each RPC (and, for
GetProviderConfig, each view) needs one.
"""

from __future__ import annotations

import enum
import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from integrations.v1 import integrations_pb2 as pb
from integrations_service.errors import ConfigurationError, PermissionDenied

SERVICE_PREFIX = "/integrations.v1.IntegrationService/"
# Callers over plaintext loopback in development mode: there is no certificate to name them.
DEVELOPMENT_IDENTITY = "development-plaintext"


class Permission(enum.Enum):
    LIST_PROVIDERS = "list_providers"
    READ_MASKED = "read_masked"
    READ_DECRYPTED = "read_decrypted"
    WRITE = "write"
    READ_AUDIT = "read_audit"


ROLES: Mapping[str, frozenset[Permission]] = {
    "dashboard": frozenset({Permission.LIST_PROVIDERS, Permission.READ_MASKED, Permission.WRITE}),
    "commerce": frozenset({Permission.LIST_PROVIDERS, Permission.READ_MASKED, Permission.READ_DECRYPTED}),
    "admin": frozenset(Permission),
}


def required_permission(method: str, request: Any) -> Permission | None:
    """The permission an IntegrationService call needs; None for methods open to every authenticated caller."""
    name = method.removeprefix(SERVICE_PREFIX)
    if name == method:
        return None  # health checking and reflection
    if name == "GetProviderConfig":
        decrypted = request.view == pb.CONFIG_VIEW_DECRYPTED
        return Permission.READ_DECRYPTED if decrypted else Permission.READ_MASKED
    return _METHOD_PERMISSIONS.get(name, Permission.READ_AUDIT)  # an unlisted method: the strictest


_METHOD_PERMISSIONS = {
    "ListProviders": Permission.LIST_PROVIDERS,
    "SaveIntegration": Permission.WRITE,
    "DeleteIntegration": Permission.WRITE,
    "ListAuditEvents": Permission.READ_AUDIT,
}


@dataclass(frozen=True)
class Policy:
    """Identity → role. An identity the policy does not name has no permission at all."""

    roles_by_identity: Mapping[str, str]

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigurationError(f"INTEGRATIONS_AUTHZ_POLICY: cannot read {path}: {error}") from None
        return cls.from_document(document, str(path))

    @classmethod
    def from_document(cls, document: Mapping[str, Any], source: str = "policy") -> Policy:
        callers = document.get("callers", [])
        if not isinstance(callers, list):
            raise ConfigurationError(f"INTEGRATIONS_AUTHZ_POLICY: {source}: [[callers]] must be an array of tables")
        roles: dict[str, str] = {}
        for index, entry in enumerate(callers):
            where = f"{source}: callers[{index}]"
            identity, role = entry.get("identity"), entry.get("role")
            if not isinstance(identity, str) or not identity:
                raise ConfigurationError(f"INTEGRATIONS_AUTHZ_POLICY: {where} needs an identity")
            if role not in ROLES:
                known = ", ".join(ROLES)
                raise ConfigurationError(f"INTEGRATIONS_AUTHZ_POLICY: {where} has role {role!r}; roles: {known}")
            if identity in roles and roles[identity] != role:
                raise ConfigurationError(f"INTEGRATIONS_AUTHZ_POLICY: {where}: {identity!r} is given two roles")
            roles[identity] = role
        return cls(roles)

    def role_of(self, identity: str) -> str | None:
        return self.roles_by_identity.get(identity)


class Authorizer:
    """Checks a caller against the policy; `policy=None` trusts everyone (plaintext development only)."""

    def __init__(self, policy: Policy | None) -> None:
        self._policy = policy

    def check(self, identity: str, method: str, request: Any) -> None:
        needed = required_permission(method, request)
        if needed is None or self._policy is None:
            return
        role = self._policy.role_of(identity)
        if role is None or needed not in ROLES[role]:
            as_role = f"role {role!r}" if role else "no role in the policy"
            raise PermissionDenied(
                f"caller {identity!r} ({as_role}) may not {needed.value.replace('_', ' ')} "
                f"({method.removeprefix(SERVICE_PREFIX)})"
            )


def identity_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's identity from the TLS auth context; empty when the connection has no client certificate."""
    auth = context.auth_context()
    pem = next(iter(auth.get("x509_pem_cert", ())), b"")
    return identity_from_pem(pem) if pem else ""


@functools.lru_cache(maxsize=256)
def identity_from_pem(pem: bytes) -> str:
    """Parsed once per certificate, not per call."""
    certificate = x509.load_pem_x509_certificate(pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is not None:
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
        if spiffe := [u for u in uris if u.startswith("spiffe://")]:
            return spiffe[0]
        if dns := names.get_values_for_type(x509.DNSName):
            return dns[0]
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common_names and common_names[0].value:
        return str(common_names[0].value)
    # A verified certificate that names nobody: never "" (that would read as a plaintext development caller),
    # but its fingerprint, which no policy names unless it pins this very certificate.
    return f"x509-sha256:{certificate.fingerprint(hashes.SHA256()).hex()}"
