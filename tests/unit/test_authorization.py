"""The role matrix: which role may make which call (and, for GetProviderConfig, which view)."""

from __future__ import annotations

from typing import Any

import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_service.api.auth import SERVICE_PREFIX, Authorizer, Identified, Policy
from integrations_service.api.identity import DEVELOPMENT, CallerName, common_name, spiffe_name
from integrations_service.errors import PermissionDenied

NO_ROLE = "no role"
CALLERS: dict[str, CallerName] = {
    "dashboard": spiffe_name("spiffe://shop.example/dashboard"),
    "commerce": spiffe_name("spiffe://shop.example/commerce"),
    "admin": spiffe_name("spiffe://shop.example/admin"),
    NO_ROLE: common_name("someone the policy does not name"),
}
POLICY = Policy({name: role for role, name in CALLERS.items() if role != NO_ROLE})
SERVICE = pb.DESCRIPTOR.services_by_name["IntegrationService"]

# (label, full method, request, the roles that may make the call).
CALLS: list[tuple[str, str, Any, set[str]]] = [
    ("ListProviders", "ListProviders", pb.ListProvidersRequest(), {"dashboard", "commerce", "admin"}),
    (
        "GetProviderConfig masked",
        "GetProviderConfig",
        pb.GetProviderConfigRequest(view=pb.CONFIG_VIEW_MASKED),
        {"dashboard", "commerce", "admin"},
    ),
    (
        "GetProviderConfig view unset",  # treated as masked
        "GetProviderConfig",
        pb.GetProviderConfigRequest(),
        {"dashboard", "commerce", "admin"},
    ),
    (
        "GetProviderConfig decrypted",
        "GetProviderConfig",
        pb.GetProviderConfigRequest(view=pb.CONFIG_VIEW_DECRYPTED),
        {"commerce", "admin"},
    ),
    ("SaveIntegration", "SaveIntegration", pb.SaveIntegrationRequest(), {"dashboard", "admin"}),
    ("DeleteIntegration", "DeleteIntegration", pb.DeleteIntegrationRequest(), {"dashboard", "admin"}),
    ("ListAuditEvents", "ListAuditEvents", pb.ListAuditEventsRequest(), {"admin"}),
    (
        "WatchConfigChanges",
        "WatchConfigChanges",
        pb.WatchConfigChangesRequest(),
        {"dashboard", "commerce", "admin"},
    ),
    # A method the table does not list yet needs the strictest permission.
    ("an unlisted method", "SomeFutureMethod", None, {"admin"}),
]
MATRIX = [
    pytest.param(SERVICE_PREFIX + method, request, role, role in allowed, id=f"{label}-{role}")
    for label, method, request, allowed in CALLS
    for role in CALLERS
]


@pytest.mark.parametrize(("method", "request_message", "role", "allowed"), MATRIX)
def test_the_role_matrix(method: str, request_message: Any, role: str, allowed: bool) -> None:
    authorizer = Authorizer(POLICY)
    caller = authorizer.identify([CALLERS[role]])
    if allowed:
        authorizer.check(caller, method, request_message)
        return
    with pytest.raises(PermissionDenied) as denied:
        authorizer.check(caller, method, request_message)
    assert method.removeprefix(SERVICE_PREFIX) in denied.value.message
    assert str(CALLERS[role]) in denied.value.message


def test_the_matrix_covers_every_rpc_of_the_service() -> None:
    assert {m.name for m in SERVICE.methods} <= {method for _, method, _, _ in CALLS}


@pytest.mark.parametrize("role", list(CALLERS))
@pytest.mark.parametrize("method", ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/Info"])
def test_health_and_reflection_are_open_to_every_authenticated_caller(method: str, role: str) -> None:
    authorizer = Authorizer(POLICY)
    authorizer.check(authorizer.identify([CALLERS[role]]), method, None)


@pytest.mark.parametrize(("label", "method", "request_message", "_"), CALLS, ids=[c[0] for c in CALLS])
def test_without_a_policy_the_plaintext_development_caller_may_do_everything(
    label: str, method: str, request_message: Any, _: set[str]
) -> None:
    authorizer = Authorizer(None)
    caller = authorizer.identify([])
    assert caller == Identified(DEVELOPMENT)
    authorizer.check(caller, SERVICE_PREFIX + method, request_message)


@pytest.mark.parametrize(("label", "method", "request_message", "_"), CALLS, ids=[c[0] for c in CALLS])
def test_with_a_policy_a_connection_without_certificate_gets_no_permission(
    label: str, method: str, request_message: Any, _: set[str]
) -> None:
    authorizer = Authorizer(POLICY)
    with pytest.raises(PermissionDenied):
        authorizer.check(authorizer.identify([]), SERVICE_PREFIX + method, request_message)
