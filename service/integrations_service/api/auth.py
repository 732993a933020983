"""Who is calling, and what they may do.

The caller is named only by the TLS auth context of the connection: the
typed names of its verified client certificate (`api.identity`: a SPIFFE ID
from its one URI SAN, its DNS SANs, its common name, its fingerprint). A TOML
policy maps names of a stated kind to built-in roles; a role is a set of
permissions, and each RPC (and, for GetProviderConfig, each view) needs one.

Matching: the policy roles of all the certificate's names are collected. One
distinct role is the caller's role, and the name that matched first (SPIFFE
ID, then DNS, then common name, then fingerprint) is how the caller is
shown; no role means no permission (shown by its first name); names that the
policy gives different roles make the caller ambiguous, and it is refused
every permission rather than given the "best" one.
"""

from __future__ import annotations

import enum
import json
import logging
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from integrations.v1 import integrations_pb2 as pb
from integrations_service.api.identity import (
    DEVELOPMENT,
    CallerName,
    common_name,
    common_name_problem,
    dns_name,
    dns_name_problem,
    fingerprint_name,
    fingerprint_problem,
    names_from_pem,
    spiffe_id_problem,
    spiffe_name,
)
from integrations_service.errors import ConfigurationError, PermissionDenied
from integrations_service.untrusted import bounded

log = logging.getLogger("integrations.auth")

SERVICE_PREFIX = "/integrations.v1.IntegrationService/"


class Permission(enum.Enum):
    LIST_PROVIDERS = "list_providers"
    READ_MASKED = "read_masked"
    READ_DECRYPTED = "read_decrypted"
    WRITE = "write"
    READ_AUDIT = "read_audit"
    WATCH_CHANGES = "watch_changes"


ROLES: Mapping[str, frozenset[Permission]] = {
    "dashboard": frozenset(
        {Permission.LIST_PROVIDERS, Permission.READ_MASKED, Permission.WRITE, Permission.WATCH_CHANGES}
    ),
    "commerce": frozenset(
        {Permission.LIST_PROVIDERS, Permission.READ_MASKED, Permission.READ_DECRYPTED, Permission.WATCH_CHANGES}
    ),
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
    "WatchConfigChanges": Permission.WATCH_CHANGES,
}


# The policy key of each kind of name: its value's check, and the name it stands for.
_POLICY_KINDS: Mapping[str, tuple[Callable[[str], str | None], Callable[[str], CallerName]]] = {
    "spiffe": (spiffe_id_problem, spiffe_name),
    "dns": (dns_name_problem, dns_name),
    "common_name": (common_name_problem, common_name),
    "fingerprint": (fingerprint_problem, fingerprint_name),
}
_LEGACY_KEY = "identity"  # before names were typed; now a SPIFFE ID only
_MAX_SHOWN_MATCHES = 3


@dataclass(frozen=True)
class Identified:
    """A caller as the policy sees it: the name it is shown by, its role, and any conflicting entries."""

    name: CallerName
    role: str | None = None
    conflicts: tuple[tuple[CallerName, str], ...] = field(default=())


@dataclass(frozen=True)
class Policy:
    """Typed name → role. A caller none of whose names the policy names has no permission at all."""

    roles_by_name: Mapping[CallerName, str]

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
        roles: dict[CallerName, str] = {}
        for index, entry in enumerate(callers):
            where = f"INTEGRATIONS_AUTHZ_POLICY: {source}: callers[{index}]"
            if not isinstance(entry, dict):
                raise ConfigurationError(f"{where} must be a table")
            name, role = _entry_name(entry, where), entry.get("role")
            if not isinstance(role, str) or role not in ROLES:
                known = ", ".join(ROLES)
                raise ConfigurationError(f"{where} has role {role!r}; roles: {known}")
            if name in roles and roles[name] != role:
                raise ConfigurationError(f"{where}: {name} is given two roles")
            roles[name] = role
        return cls(roles)

    def identify(self, names: Sequence[CallerName]) -> Identified:
        """`names` in precedence order, never empty (a certificate always has its fingerprint)."""
        matches = tuple((name, self.roles_by_name[name]) for name in names if name in self.roles_by_name)
        if not matches:
            return Identified(names[0])
        if len({role for _, role in matches}) == 1:
            return Identified(*matches[0])
        return Identified(names[0], conflicts=matches)


def _entry_name(entry: Mapping[str, Any], where: str) -> CallerName:
    keys = [key for key in entry if key != "role"]
    allowed = ", ".join(_POLICY_KINDS)
    if unknown := [key for key in keys if key not in _POLICY_KINDS and key != _LEGACY_KEY]:
        raise ConfigurationError(
            f"{where} has unknown keys {', '.join(map(repr, unknown))}; a caller is named by exactly one of "
            f"{allowed}, and has a role"
        )
    if len(keys) != 1:
        raise ConfigurationError(f"{where} needs exactly one of {allowed} (it has {len(keys)}), and a role")
    key, value = keys[0], entry[keys[0]]
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{where}: {key} must be a non-empty string")
    if key == _LEGACY_KEY:
        return _legacy_name(value, where)
    problem, make = _POLICY_KINDS[key]
    if reason := problem(value):
        raise ConfigurationError(f"{where}: {key} = {_toml(value)} is invalid: {reason}")
    return make(value)


def _legacy_name(value: str, where: str) -> CallerName:
    """`identity = "spiffe://…"` (the shape before typed names) is a SPIFFE ID; anything else is refused."""
    shown = f"identity = {_toml(value)}"
    if value.lower().startswith("spiffe:"):
        if reason := spiffe_id_problem(value):
            raise ConfigurationError(f"{where}: {shown} is not a valid SPIFFE ID: {reason}")
        return spiffe_name(value)
    raise ConfigurationError(
        f"{where}: {shown} is not a SPIFFE ID, and identity names SPIFFE IDs (URI SANs) only: {_legacy_advice(value)}"
    )


def _legacy_advice(value: str) -> str:
    """Which typed key an old `identity` meant: it matched a DNS SAN, a common name or a fingerprint alike."""
    if value == str(DEVELOPMENT):
        return "plaintext development callers are trusted without a policy, and no certificate is named so: remove it"
    pinned = value.replace("x509-sha256:", "sha256:", 1)
    if value.startswith("x509-sha256:") and fingerprint_problem(pinned) is None:
        return f"to pin that certificate write fingerprint = {_toml(pinned)}"
    common = f"common_name = {_toml(value)} for a certificate with that subject common name"
    if dns_name_problem(value) is None:
        return f"write dns = {_toml(value)} for a certificate with that DNS SAN, or {common}"
    return f"write {common}"


def _toml(value: str) -> str:
    """`value` as a TOML basic string, bounded: policy text is shown in start-up errors."""
    return json.dumps(bounded(value), ensure_ascii=False)


class Authorizer:
    """Checks a caller against the policy; `policy=None` trusts everyone (plaintext development only)."""

    def __init__(self, policy: Policy | None) -> None:
        self._policy = policy

    def identify(self, names: Sequence[CallerName]) -> Identified:
        """The caller of a connection whose certificate has `names` (none: a plaintext development caller)."""
        if not names:
            return Identified(DEVELOPMENT)
        return self._policy.identify(names) if self._policy else Identified(names[0])

    def check(self, caller: Identified, method: str, request: Any) -> None:
        needed = required_permission(method, request)
        if needed is None or self._policy is None:
            return
        action = f"{needed.value.replace('_', ' ')} ({method.removeprefix(SERVICE_PREFIX)})"
        if caller.conflicts:
            log.warning(
                "caller refused: the policy gives its names different roles",
                extra={"event": "ambiguous_caller", "caller": str(caller.name)},
            )
            shown = ", ".join(f"{name} as {role!r}" for name, role in caller.conflicts[:_MAX_SHOWN_MATCHES])
            more = len(caller.conflicts) - _MAX_SHOWN_MATCHES
            raise PermissionDenied(
                f"caller {str(caller.name)!r} is ambiguous: the policy gives its names different roles "
                f"({shown}{f' and {more} more' if more > 0 else ''}); it may not {action}"
            )
        if caller.role is None or needed not in ROLES[caller.role]:
            as_role = f"role {caller.role!r}" if caller.role else "no role in the policy"
            raise PermissionDenied(f"caller {str(caller.name)!r} ({as_role}) may not {action}")


def peer_names(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[CallerName, ...]:
    """The typed names of the connection's verified client certificate; none without a certificate."""
    auth = context.auth_context()
    pem = next(iter(auth.get("x509_pem_cert", ())), b"")
    return names_from_pem(pem) if pem else ()
